"""Step 1: turn data/FILE.jsonl into data/FILE.bin + data/FILE.idx for training.

    python -m tools.make_tokenize FILE.jsonl [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S] [--data-dir DIR]

A bare FILE name is looked up in the data folder (``data/`` in the current folder, or --data-dir); a
name with a folder in it is used as given. The output goes beside the input.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from trainer.errors import UserError, run_cli

DEFAULT_SEED = 42


def _positive_int(name: str, value: str | None, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise UserError(f"{name} must be a positive whole number, got {value!r}.",
                        "e.g. ./make_tokenize.sh data.jsonl 2 4096  (REPEAT=2, MAX_TOKENS=4096)")
    return n


def _resolve(name: str, data_dir: Path) -> Path:
    p = Path(name)
    if len(p.parts) > 1 or p.is_absolute():
        return p
    if not p.suffix and not (data_dir / p).is_file():
        p = p.with_name(p.name + ".jsonl")
    return data_dir / p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="make_tokenize.sh",
        description="Tokenize a .jsonl file into binidx (.bin + .idx) for training.")
    ap.add_argument("file", help="FILE.jsonl in the data folder (or a path with a folder in it)")
    ap.add_argument("repeat", nargs="?", help="write the data this many times, each copy shuffled (default 1)")
    ap.add_argument("max_tokens", nargs="?", help="drop items longer than this many tokens, end token included")
    ap.add_argument("--no-eof", action="store_true", help="do not end each item with token 0")
    ap.add_argument("--seed", default=None, help=f"shuffle seed (default {DEFAULT_SEED})")
    ap.add_argument("--data-dir", default="data",
                    help="where bare file names are looked up (default: data/ in the current folder, as for "
                         "training and merging; make_tokenize.sh passes its own data/)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeat = _positive_int("REPEAT", args.repeat, 1)
    max_tokens = _positive_int("MAX_TOKENS", args.max_tokens, None)
    seed = DEFAULT_SEED
    if args.seed is not None:
        try:
            seed = int(args.seed)
            if seed < 0:
                raise ValueError
        except ValueError:
            raise UserError(f"--seed must be a whole number >= 0, got {args.seed!r}.", "e.g. --seed 1") from None
    src = _resolve(args.file, Path(args.data_dir))
    if src.suffix != ".jsonl":
        raise UserError(f"{src} is not a .jsonl file.",
                        "give the name of a .jsonl file (one JSON object per line, e.g. sample.jsonl); "
                        "if yours is one under another name, rename it to end in .jsonl")
    prefix = src.with_suffix("")

    from trainer.data.binidx import paths, write_binidx
    from trainer.data.jsonl import read_items
    from trainer.data.stats import report_lines
    from trainer.data.tokenizer import get_tokenizer

    t0 = time.perf_counter()
    texts = read_items(src)
    n_bytes = src.stat().st_size
    print(f"read {len(texts)} items from {src} ({n_bytes / 1e6:.2f} MB)")
    tok = get_tokenizer()
    flat, offsets = tok.encode_flat(texts, eof=not args.no_eof, progress=None)
    del texts
    lengths = np.diff(offsets)
    keep = np.arange(len(lengths))
    if max_tokens is not None:
        keep = np.flatnonzero(lengths <= max_tokens)
        dropped = len(lengths) - len(keep)
        print(f"MAX_TOKENS={max_tokens}: dropped {dropped} of {len(lengths)} items longer than that"
              + (f" (the longest has {int(lengths.max())} tokens)" if dropped else ""))
        if len(keep) == 0:
            raise UserError(f"every item of {src} is longer than MAX_TOKENS={max_tokens} "
                            f"(the shortest has {int(lengths.min())} tokens); nothing was written.",
                            f"raise MAX_TOKENS to at least {int(lengths.min())}, or leave it out")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(keep) for _ in range(repeat)])

    def items():
        for i in order:
            yield flat[offsets[i]:offsets[i + 1]]

    write_binidx(prefix, items())
    bin_path, idx_path = paths(prefix)
    out_lengths = lengths[order]
    print(f"wrote {bin_path} and {idx_path.name}: {len(order)} items "
          f"({len(keep)} x REPEAT={repeat}, each copy shuffled with seed {seed}"
          f"{', set it with --seed' if args.seed is None else ''}), "
          f"{'no end token' if args.no_eof else 'each ending with token 0'}, "
          f"in {time.perf_counter() - t0:.1f} s")
    print()
    print("\n".join(report_lines(out_lengths)))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
