"""Evaluate a model on tokenized data: the mean next-token loss (cross-entropy, nats) and perplexity.

    python -m tools.evaluate --model model/M.pth --data data/NAME [--items K] [--ctx-len L] [--op OP]
                             [--adapter output/rwkv-N.pth | --state merge/M-state-N.pth]

Reads data/NAME.bin + .idx (made by make_tokenize.sh). Each of the first K documents (default: all) is
cut to its first L tokens (default: whole), starts from the zero state, and every token after the first
is predicted, the end-of-document token included. The last line printed is JSON:
{"loss": ..., "tokens": ..., "ppl": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import time

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
    if args.state:
        from trainer.checkpoint import attach_state_file
        attach_state_file(model, args.state)
        print(f"initial state from {args.state}", file=sys.stderr)
    model.op = ops.resolve(args.op, device, model.cfg.version)
    n = len(data) if args.items is None else min(args.items, len(data))
    docs = (data[i] for i in range(n))
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


if __name__ == "__main__":
    run_cli(main)
