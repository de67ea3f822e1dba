"""Step 1's work: a .jsonl file to binidx (.bin + .idx) beside it, repeated and shuffled, with a report.

    result = tokenize_jsonl(src, repeat=4, max_tokens=None, seed=42, eof=True, log=print)

Used by ``make_tokenize.sh`` (tools/make_tokenize.py parses its arguments) and by the web page.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError

DEFAULT_SEED = 42


@dataclass
class Tokenized:
    prefix: Path                  # data/NAME: NAME.bin and NAME.idx were written
    lengths: np.ndarray           # tokens of every written item, in file order (repeats included)


def positive_int(name: str, value: str | int | None, default: int | None) -> int | None:
    """REPEAT / MAX_TOKENS as typed by a user: a positive whole number, else a UserError."""
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


def tokenize_jsonl(src: Path, repeat: int = 1, max_tokens: int | None = None, seed: int = DEFAULT_SEED,
                   eof: bool = True, log: Callable[[str], None] = print, seed_given: bool = True) -> Tokenized:
    from .binidx import paths, write_binidx
    from .jsonl import read_items
    from .stats import report_lines
    from .tokenizer import get_tokenizer

    src = Path(src)
    if src.suffix != ".jsonl":
        raise UserError(f"{src} is not a .jsonl file.",
                        "give the name of a .jsonl file (one JSON object per line, e.g. sample.jsonl); "
                        "if yours is one under another name, rename it to end in .jsonl")
    prefix = src.with_suffix("")
    from ..files import sweep_temps
    for p in sweep_temps(prefix.parent):
        log(f"removed {p.name}, a temporary file left by a tokenizer that was killed while writing")
    t0 = time.perf_counter()
    texts = read_items(src)
    n_bytes = src.stat().st_size
    log(f"read {len(texts)} items from {src} ({n_bytes / 1e6:.2f} MB)")
    tok = get_tokenizer()
    flat, offsets = tok.encode_flat(texts, eof=eof, progress=None)
    del texts
    lengths = np.diff(offsets)
    keep = np.arange(len(lengths))
    if max_tokens is not None:
        keep = np.flatnonzero(lengths <= max_tokens)
        dropped = len(lengths) - len(keep)
        log(f"MAX_TOKENS={max_tokens}: dropped {dropped} of {len(lengths)} items longer than that"
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

    write_binidx(prefix, items(), need=2 * int(lengths[order].sum()) + 20 * len(order) + 64)
    bin_path, idx_path = paths(prefix)
    out_lengths = lengths[order]
    log(f"wrote {bin_path} and {idx_path.name}: {len(order)} items "
        f"({len(keep)} x REPEAT={repeat}, each copy shuffled with seed {seed}"
        f"{'' if seed_given else ', set it with --seed'}), "
        f"{'each ending with token 0' if eof else 'no end token'}, "
        f"in {time.perf_counter() - t0:.1f} s")
    log("")
    log("\n".join(report_lines(out_lengths)))
    return Tokenized(prefix, out_lengths)
