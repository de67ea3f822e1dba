"""Step 1's work: a data file or folder to binidx (.bin + .idx) beside it, repeated and shuffled, with a report.

    result = tokenize_data(src, repeat=4, max_tokens=None, seed=42, eof=True, log=print, column=None, valid=0.05)

With ``valid`` a share of the distinct items is held out (trainer/data/split.py's rule) into NAME.valid.bin + .idx.

What ``src`` may be is trainer/data/sources.py's; the item shapes are trainer/data/shapes.py's.

Used by ``make_tokenize.sh`` (tools/make_tokenize.py parses its arguments) and by the web page.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import MAX_SEED
from ..errors import UserError

DEFAULT_SEED = 42
MAX_ITEM_TOKENS = 2**31 - 1     # binidx stores an item's length as int32
_IDX_BYTES_PER_ITEM = 4 + 8 + 8  # .idx: size (int32), pointer (int64), document index (int64)
_RAM_BYTES_PER_ITEM = 100        # while writing: order, lengths, the sizes list, index arrays and their copies (counted)


@dataclass
class Tokenized:
    prefix: Path                  # data/NAME: NAME.bin and NAME.idx were written
    lengths: np.ndarray           # tokens of every written training item, in file order (repeats included)
    valid_prefix: Path | None = None        # data/NAME.valid, when items were held out for validation
    valid_lengths: np.ndarray | None = None  # tokens of every held-out item, in file order (each once)


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
    if name == "MAX_TOKENS" and n > MAX_ITEM_TOKENS:
        raise UserError(f"MAX_TOKENS={n} is more than any item can hold ({MAX_ITEM_TOKENS} tokens, the most a "
                        "binidx item stores).", "leave MAX_TOKENS out to keep every item, or give a length such "
                        "as 4096")
    return n


def seed_int(value: str | int | None) -> int:
    """--seed as typed by a user: a whole number from 0 to MAX_SEED, else a UserError."""
    if value is None:
        return DEFAULT_SEED
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {str(value)[:40]!r}.",
                        "e.g. --seed 1")
    return seed


def column_name(value: str | None) -> str | None:
    """COLUMN as typed (--column, the web page's field): the field's name without spaces at its ends, or None
    (empty: the item's shape says where the text is)."""
    return (value or "").strip() or None


def output_prefix(src: Path) -> Path:
    """Where the tokenized data of ``src`` goes: beside it, data/NAME.jsonl or the folder data/NAME -> data/NAME."""
    src = Path(src)
    return src.parent / src.name if src.is_dir() else src.with_suffix("")


def valid_prefix_of(prefix: Path) -> Path:
    """Where the held-out items of data/NAME go: data/NAME.valid (.bin + .idx)."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".valid")


def tokenize_data(src: Path, repeat: int = 1, max_tokens: int | None = None, seed: int = DEFAULT_SEED,
                  eof: bool = True, log: Callable[[str], None] = print, seed_given: bool = True,
                  column: str | None = None, valid: float | str | None = None,
                  valid_name: str = "--valid") -> Tokenized:
    """Tokenize ``src`` into data/NAME.bin + .idx; with ``valid`` (a share, as typed or a number), hold that share of
    the distinct items out (split.held_out, before the REPEAT copies) into data/NAME.valid.bin + .idx, written
    once. Both pairs change together or not at all. ``valid_name`` is the setting the messages name."""
    from ..files import sweep_temps
    from .binidx import paths, write_binidx_set
    from .split import held_out, keys_of, setting, valid_fraction
    from .stats import report_lines

    valid = valid_fraction(valid, valid_name)
    src = Path(src)
    prefix = output_prefix(src)
    for p in sweep_temps(prefix.parent):
        log(f"removed {p.name}, a temporary file left by a tokenizer that was killed while writing")
    t0 = time.perf_counter()
    flat, offsets, keep = _encode(src, column, eof, max_tokens, log)
    lengths = np.diff(offsets)
    held = np.zeros(0, dtype=np.int64)
    if valid is not None:
        train_pos, valid_pos = held_out(keys_of(flat, offsets, keep), valid, seed, name=valid_name)
        keep, held = keep[train_pos], keep[valid_pos]
        if int(lengths[keep].max()) < 2:
            raise UserError(f"every item left for training after {setting(valid_name, valid)} has at most 1 token: "
                            "there is nothing to train on; nothing was written.",
                            f"lower {valid_name}, or put the training text in the items")
    vprefix = valid_prefix_of(prefix)
    need = _check_room(src, prefix, int(lengths[keep].sum()), len(keep), repeat,
                       int(lengths[held].sum()), len(held))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(keep) for _ in range(repeat)])
    held_order = rng.permutation(held)
    pairs = [(vprefix, _items(flat, offsets, held_order))] if valid is not None else []
    write_binidx_set(pairs + [(prefix, _items(flat, offsets, order))], need=need)
    bin_path, idx_path = paths(prefix)
    log(f"wrote {bin_path} and {idx_path.name}: {len(order)} items "
        f"({len(keep)} x REPEAT={repeat}, each copy shuffled with seed {seed}"
        f"{'' if seed_given else ', set it with --seed'}), "
        f"{'each ending with token 0' if eof else 'no end token'}, "
        f"in {time.perf_counter() - t0:.1f} s")
    if valid is not None:
        _log_held_out(vprefix, lengths[held_order], len(keep) + len(held), valid, valid_name, log)
    else:
        _warn_stale_valid(vprefix, valid_name, log)
    out_lengths = lengths[order]
    log("")
    log("\n".join(report_lines(out_lengths)))
    if valid is None:
        return Tokenized(prefix, out_lengths)
    return Tokenized(prefix, out_lengths, vprefix, lengths[held_order])


def _encode(src: Path, column: str | None, eof: bool, max_tokens: int | None,
            log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and tokenize ``src``: (flat, offsets, keep), item i being flat[offsets[i]:offsets[i+1]] and ``keep`` the
    items not longer than MAX_TOKENS. Refuses data with nothing to train on."""
    from .sources import read_source
    from .tokenizer import get_tokenizer
    source = read_source(src, column=column, log=log)
    texts, n_files, n_bytes = source.texts, source.files, source.n_bytes
    del source
    files = f"{n_files} file{'s' * (n_files != 1)}, " if src.is_dir() else ""
    log(f"read {len(texts)} items from {src}{'/' if src.is_dir() else ''} ({files}{n_bytes / 1e6:.2f} MB)")
    flat, offsets = get_tokenizer().encode_flat(texts, eof=eof, progress=None)
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
    longest = int(lengths[keep].max())
    if longest < 2:
        cut = f" of at most MAX_TOKENS={max_tokens}" if max_tokens is not None and len(keep) < len(lengths) else ""
        raise UserError(f"every item{cut} of {src} has {'no token' if longest == 0 else 'at most 1 token'} after "
                        f"tokenizing{' (no end token: --no-eof)' if not eof else ''}: there is nothing to train on; "
                        "nothing was written.",
                        "put the training text in the items"
                        + (", or leave out --no-eof" if not eof else "")
                        + (", or raise MAX_TOKENS" if cut else ""))
    return flat, offsets, keep


def _items(flat: np.ndarray, offsets: np.ndarray, order: np.ndarray):
    for i in order:
        yield flat[offsets[i]:offsets[i + 1]]


def _log_held_out(vprefix: Path, lengths: np.ndarray, total: int, valid: float, valid_name: str,
                  log: Callable[[str], None]) -> None:
    from .binidx import paths
    from .split import setting
    vbin, vidx = paths(vprefix)
    log(f"held out {len(lengths)} of the {total} items ({int(lengths.sum())} tokens; {setting(valid_name, valid)}, "
        f"copies of an item kept together) for validation: wrote {vbin} and {vidx.name}, each item once, shuffled")
    log(f'for validation, put in training.sh:  VALID_DATA="{vprefix.name}"')
    log("the statistics below are of the training items only")


def _warn_stale_valid(vprefix: Path, valid_name: str, log: Callable[[str], None]) -> None:
    """A NAME.valid pair from an earlier run with --valid: its items may be in the training data written now."""
    from .binidx import paths
    from .split import setting
    vbin, vidx = paths(vprefix)
    if vbin.exists() or vidx.exists():
        log(f"warning: {vbin} is from an earlier run that held items out for validation: those items may now be in "
            f"the training data, so a validation loss on it would be too good. Fix: delete {vbin} and {vidx.name}, "
            f"or tokenize again with a share held out (e.g. {setting(valid_name, 0.05)})")


def _gb(n: float) -> str:
    """Bytes in words: 1.23 MB, 4.56 GB, 7,890 TB."""
    if n >= 1e12:
        return f"{n / 1e12:,.0f} TB"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_room(src: Path, prefix: Path, tokens: int, items: int, repeat: int, valid_tokens: int = 0,
                valid_items: int = 0) -> int:
    """Refuse, before anything is written, output that cannot be written: a folder in the way of NAME.bin / .idx (or
    NAME.valid.bin / .idx when items are held out), more bytes than the data folder has free, or more items than
    memory can index while writing. Returns the bytes all files take."""
    from ..files import free_bytes
    from .binidx import paths
    bin_path, idx_path = paths(prefix)
    outputs = [bin_path, idx_path] + (list(paths(valid_prefix_of(prefix))) if valid_items else [])
    for p in outputs:
        if p.is_dir():
            raise UserError(f"{p} is a folder, so the tokenized data cannot be written there; nothing was written.",
                            f"move or rename the folder {p}, or rename {src.name}")
    folder = bin_path.parent
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder, so {bin_path.name} cannot be written there.",
                        "give a data file inside a folder you can write to")
    per_copy = 2 * tokens + _IDX_BYTES_PER_ITEM * items
    held = 2 * valid_tokens + _IDX_BYTES_PER_ITEM * valid_items + 34 if valid_items else 0
    need = per_copy * repeat + 34 + held
    free = free_bytes(folder)
    if free is not None and need > free:
        most = (free - 34 - held) // per_copy
        also = f" and the {valid_items} held-out items once" if valid_items else ""
        raise UserError(f"REPEAT={repeat} would write {_gb(need)} ({repeat} copies of {items} items, {tokens} tokens "
                        f"each copy, 2 bytes a token{also}), but {folder}/ has only {_gb(free)} free; nothing was "
                        "written.",
                        f"lower REPEAT to at most {most}" if most >= 1 else f"free some disk space in {folder}/")
    from ..device import host_available
    ram = host_available()
    need_ram = _RAM_BYTES_PER_ITEM * (items * repeat + valid_items)
    if ram is not None and need_ram > ram:
        most = (ram - _RAM_BYTES_PER_ITEM * valid_items) // (_RAM_BYTES_PER_ITEM * items)
        raise UserError(f"REPEAT={repeat} makes {items * repeat} items, whose index needs about {_gb(need_ram)} of "
                        f"memory while it is written, but only {_gb(ram)} is available; nothing was written.",
                        f"lower REPEAT to at most {most}" if most >= 1 else "close other programs, or use fewer items")
    return need
