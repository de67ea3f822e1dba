"""Step 1: turn your data (data/FILE.jsonl, .json, .csv, .parquet, .arrow, .txt, .md, or a folder of them, or a
``datasets`` save_to_disk folder) into data/FILE.bin + data/FILE.idx for training.

    python -m tools.make_tokenize FILE [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S] [--column NAME] [--valid F]
                                  [--data-dir DIR]

A bare FILE name is looked up in the data folder (``data/`` in the current folder, or --data-dir); a
name with a folder in it is used as given. A name without an ending that is not there is tried with each
data ending (.jsonl first). The output goes beside the input. With --valid F that share of the distinct items is
held out, before REPEAT, into FILE.valid.bin + FILE.valid.idx (each item once), for training.sh's VALID_DATA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.data.prepare import DEFAULT_SEED, column_name, positive_int, seed_int, tokenize_data
from trainer.data.sources import ENDINGS
from trainer.data.split import valid_fraction
from trainer.errors import UserError, check_name_lengths, run_cli


def _resolve(name: str, data_dir: Path) -> Path:
    check_name_lengths("FILE", name, "rename the file to a shorter name")
    check_name_lengths("--data-dir", data_dir, "give a folder with a shorter name")
    p = Path(name)
    if not p.name:
        raise UserError(f"{name!r} is not a file name.", "give your data file's name, e.g. "
                        "./make_tokenize.sh sample.jsonl")
    if len(p.parts) > 1 or p.is_absolute():
        return p
    if not p.suffix and not (data_dir / p).exists():
        return next((data_dir / (p.name + e) for e in ENDINGS if (data_dir / (p.name + e)).is_file()),
                    data_dir / (p.name + ".jsonl"))
    return data_dir / p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="make_tokenize.sh",
        description="Tokenize your data (.jsonl, .json, .csv, .parquet, .arrow, .txt, .md, a folder of them, or a "
                    "datasets save_to_disk folder) into binidx (.bin + .idx) for training.")
    ap.add_argument("file", help="FILE in the data folder (or a path with a folder in it): a data file or a folder")
    ap.add_argument("repeat", nargs="?", help="write the data this many times, each copy shuffled (default 1)")
    ap.add_argument("max_tokens", nargs="?", help="drop items longer than this many tokens, end token included")
    ap.add_argument("--no-eof", action="store_true", help="do not end each item with token 0")
    ap.add_argument("--seed", default=None, help=f"shuffle seed (default {DEFAULT_SEED})")
    ap.add_argument("--column", default=None, metavar="NAME",
                    help="the field that holds the text, when it is not text, messages, conversations or "
                         "instruction+output (make_tokenize.sh: COLUMN=NAME)")
    ap.add_argument("--valid", default=None, metavar="F",
                    help="hold this share of the items out for validation (e.g. 0.05), written once to "
                         "FILE.valid.bin + .idx and never into FILE.bin (make_tokenize.sh: VALID_FRACTION=F)")
    ap.add_argument("--data-dir", default="data",
                    help="where bare file names are looked up (default: data/ in the current folder, as for "
                         "training and merging; make_tokenize.sh passes its own data/)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeat = positive_int("REPEAT", args.repeat, 1)
    max_tokens = positive_int("MAX_TOKENS", args.max_tokens, None)
    seed = seed_int(args.seed)
    column = column_name(args.column)
    valid = valid_fraction(args.valid, "--valid")
    src = _resolve(args.file, Path(args.data_dir))
    tokenize_data(src, repeat=repeat, max_tokens=max_tokens, seed=seed, eof=not args.no_eof, log=print,
                  seed_given=args.seed is not None, column=column, valid=valid, valid_name="--valid")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
