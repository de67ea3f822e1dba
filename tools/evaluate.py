"""Evaluate a model on tokenized data: the mean next-token loss (cross-entropy, nats) and perplexity.

    python -m tools.evaluate --model model/M.pth --data data/NAME [--items K] [--ctx-len L] [--op OP]
                             [--adapter output/rwkv-N.pth [--held-out] | --state merge/M-state-N.pth]
                             [--loss-mask none|pad|qa]

Reads data/NAME.bin + .idx (made by make_tokenize.sh). Each of the first K documents (default: all) is
cut to its first L tokens (default: whole), starts from the zero state, and every token after the first
is predicted, the end-of-document token included (--loss-mask qa: only the assistant's answers count).
With --adapter the defaults are the training run's: L = its CTX_LEN + 1 and its LOSS_MASK, so that on its
validation data (VALID_DATA; --held-out: the items VALID_FRACTION held out of --data) this prints the
validation loss the run wrote to loss.csv for that checkpoint. The last line printed is JSON:
{"loss": ..., "tokens": ..., "ppl": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from trainer.choices import LOSS_MASKS
from trainer.errors import UserError, run_cli
from trainer.inference import pick_device, pick_dtype  # noqa: F401  (used below, and by tools.generate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the base model .pth")
    ap.add_argument("--data", required=True, help="binidx prefix, e.g. data/mydata (for mydata.bin/.idx)")
    ap.add_argument("--items", type=int, default=None, help="evaluate the first K documents (default all)")
    ap.add_argument("--ctx-len", type=int, default=None, help="cut each document to its first L tokens")
    ap.add_argument("--adapter", default=None, help="a checkpoint from output/ (rwkv-N.pth) to apply: any method")
    ap.add_argument("--state", default=None, help="a state file (merge/<model>-state-N.pth): start every document "
                    "from it instead of the zero state")
    ap.add_argument("--loss-mask", default=None, choices=LOSS_MASKS,
                    help="which targets count: none/pad every one (default), qa only the assistant's answers "
                         "(default with --adapter: the run's LOSS_MASK)")
    ap.add_argument("--held-out", action="store_true", help="with --adapter of a run that had VALID_FRACTION: "
                    "evaluate the items it held out of --data for validation (the same SEED gives the same items)")
    ap.add_argument("--op", default="auto", help="WKV op: auto, triton (RWKV-7), fla, rwkvfla, chunk, torch")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="compute dtype (auto: fp32 on CPU, bf16 on GPU)")
    args = ap.parse_args(argv)
    if args.items is not None and args.items < 1:
        raise UserError(f"--items must be at least 1, got {args.items}", "leave --items out to evaluate every item")
    if args.ctx_len is not None and args.ctx_len < 2:
        raise UserError(f"--ctx-len must be at least 2, got {args.ctx_len}", "leave --ctx-len out for whole items")
    if args.adapter and args.state:
        raise UserError("--adapter and --state together: give one of them",
                        "a state-tuning checkpoint works with --adapter; its merged state file with --state")
    if args.held_out and not args.adapter:
        raise UserError("--held-out needs --adapter: the items held out are named by the run's VALID_FRACTION and "
                        "SEED, which its checkpoint records", "add --adapter output/rwkv-N.pth")

    from trainer import ops
    from trainer.checkpoint import load_model
    from trainer.data.binidx import BinIdx
    from trainer.inference import evaluate_loss

    device = pick_device(args.device)
    data = BinIdx(args.data)
    model = load_model(args.model, dtype=pick_dtype(args.dtype, device), device=device)
    if args.adapter:
        from trainer.checkpoint import attach_adapter
        meta = attach_adapter(model, args.adapter, args.model)
        print(f"applied {args.adapter}: {meta['method']} after epoch {meta.get('epoch')}", file=sys.stderr)
        data = _as_the_run_did(args, meta.get("config", {}), data)
    if args.state:
        from trainer.checkpoint import attach_state_file
        attach_state_file(model, args.state)
        print(f"initial state from {args.state}", file=sys.stderr)
    model.op = ops.resolve(args.op, device, model.cfg.version)
    n = len(data) if args.items is None else min(args.items, len(data))
    docs = (data[i] for i in range(n))
    if args.loss_mask not in (None, "none", "pad"):
        from trainer.validate import masked_items
        docs = masked_items(data, (args.ctx_len or 2**62) - 1, args.loss_mask, items=n)
    cfg = model.cfg
    print(f"model {args.model}: RWKV-{cfg.version} {cfg.n_layer}x{cfg.n_embd}, op {model.op}, {device}, "
          f"{model.dtype}; data {args.data}: {n} of {len(data)} documents", file=sys.stderr)
    t0 = time.time()
    last = [t0]

    def progress(done: int, tokens: int) -> None:
        now = time.time()
        if now - last[0] > 5 or done == n:
            last[0] = now
            print(f"  {done}/{n} documents, {tokens} tokens, {tokens / max(now - t0, 1e-9):.0f} tokens/s",
                  file=sys.stderr)

    result = evaluate_loss(model, docs, ctx_len=args.ctx_len, progress=progress)
    if result["tokens"] == 0:
        raise UserError(f"no token to predict in the first {n} documents of {args.data} (each needs at "
                        "least 2 tokens)", "check the data, or raise --items / --ctx-len")
    print(json.dumps(result))
    return 0


def _as_the_run_did(args, config: dict, data):
    """--adapter: the run's CTX_LEN + 1 and LOSS_MASK where not given, and with --held-out the items its
    VALID_FRACTION held out of ``data`` (said on stderr)."""
    def number(name: str, kind):
        try:
            return kind(config[name])
        except (KeyError, TypeError, ValueError):
            return None
    ctx, mask = number("CTX_LEN", int), config.get("LOSS_MASK")
    if args.ctx_len is None and ctx:
        args.ctx_len = ctx + 1
    if args.loss_mask is None and mask in LOSS_MASKS:
        args.loss_mask = mask
    print(f"as the run validated: items cut to {args.ctx_len} tokens, LOSS_MASK={args.loss_mask} (change with "
          "--ctx-len / --loss-mask)", file=sys.stderr)
    if not args.held_out:
        return data
    fraction, seed = number("VALID_FRACTION", float), number("SEED", int)
    if not fraction:
        raise UserError(f"--held-out: {args.adapter} was trained without VALID_FRACTION, so it held no items out",
                        "leave --held-out out, and give its validation data (VALID_DATA) as --data")
    from trainer.validate import held_out_views
    _, valid = held_out_views(args.data, fraction, seed, off=None)      # the items the run held out
    print(f"--held-out: the {len(valid)} items VALID_FRACTION={fraction} (SEED={seed}) held out of {args.data}",
          file=sys.stderr)
    return valid


if __name__ == "__main__":
    run_cli(main)
