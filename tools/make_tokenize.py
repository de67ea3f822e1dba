"""Step 1: turn data/FILE.jsonl into data/FILE.bin + data/FILE.idx for training.

    python -m tools.make_tokenize FILE.jsonl [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S] [--data-dir DIR]

A bare FILE name is looked up in the data folder (``data/`` in the current folder, or --data-dir); a
name with a folder in it is used as given. The output goes beside the input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.data.prepare import DEFAULT_SEED, positive_int, seed_int, tokenize_jsonl
from trainer.errors import UserError, check_name_lengths, run_cli


def _resolve(name: str, data_dir: Path) -> Path:
    check_name_lengths("FILE", name, "rename the file to a shorter name")
    check_name_lengths("--data-dir", data_dir, "give a folder with a shorter name")
    p = Path(name)
    if not p.name:
        raise UserError(f"{name!r} is not a file name.", "give your .jsonl file's name, e.g. "
                        "./make_tokenize.sh sample.jsonl")
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
    repeat = positive_int("REPEAT", args.repeat, 1)
    max_tokens = positive_int("MAX_TOKENS", args.max_tokens, None)
    seed = seed_int(args.seed)
    src = _resolve(args.file, Path(args.data_dir))
    tokenize_jsonl(src, repeat=repeat, max_tokens=max_tokens, seed=seed, eof=not args.no_eof, log=print,
                   seed_given=args.seed is not None)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
