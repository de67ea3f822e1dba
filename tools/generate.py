"""Let a model continue a prompt, for a quick look at what it has learnt.

    python -m tools.generate --model model/M.pth --prompt "User: hello\n\nAssistant:" [--tokens 100]
                             [--temperature 1.0] [--top-p 0.85] [--seed 0] [--op auto]

"\n" in the prompt is a newline. Generation stops after --tokens tokens or at the end-of-text token.
"""
from __future__ import annotations

import argparse
import math
import sys

from trainer.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the model .pth")
    ap.add_argument("--prompt", required=True, help='text to continue ("\\n" is a newline)')
    ap.add_argument("--tokens", type=int, default=100, help="how many tokens to generate at most")
    ap.add_argument("--temperature", type=float, default=1.0, help="higher: more random; 0: always the likeliest")
    ap.add_argument("--top-p", type=float, default=0.85, help="sample from the likeliest tokens making up this "
                    "much probability (lower: safer text)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same text)")
    ap.add_argument("--adapter", default=None, help="a checkpoint from output/ (rwkv-N.pth) to apply: any method")
    ap.add_argument("--op", default="auto", help="WKV op: auto, triton (RWKV-7), fla, rwkvfla, chunk, torch")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    args = ap.parse_args(argv)
    from trainer.config import MAX_SEED, MAX_WHOLE
    if not 1 <= args.tokens <= MAX_WHOLE:
        raise UserError(f"--tokens must be from 1 to {MAX_WHOLE}, got {args.tokens}", "e.g. --tokens 100")
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"--temperature must be a number, 0 or more, got {args.temperature}", "e.g. --temperature 1.0")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}", "e.g. --top-p 0.85")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}", "e.g. --seed 0")

    from trainer.inference import pick_device, pick_dtype
    from trainer import ops
    from trainer.checkpoint import load_model
    from trainer.data.tokenizer import get_tokenizer
    from trainer.inference import generate

    device = pick_device(args.device)
    model = load_model(args.model, dtype=pick_dtype(args.dtype, device), device=device)
    if args.adapter:
        from trainer.checkpoint import attach_adapter
        meta = attach_adapter(model, args.adapter, args.model)
        print(f"applied {args.adapter}: {meta['method']} after epoch {meta.get('epoch')}", file=sys.stderr)
    model.op = ops.resolve(args.op, device, model.cfg.version)
    tok = get_tokenizer()
    prompt = args.prompt.replace("\\n", "\n")
    ids = generate(model, tok.encode(prompt), max_tokens=args.tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, vocab_limit=min(model.cfg.vocab_size, 65530))
    if ids and ids[-1] == 0:
        ids = ids[:-1]
    sys.stdout.write(prompt + tok.decode(ids) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
