"""binidx: the token files RWKV-LM and RWKV-PEFT train from (Megatron's MMapIndexedDataset layout).

``PREFIX.bin`` holds the tokens of all items back to back. ``PREFIX.idx`` (little-endian):

    b"MMIDIDX\\x00\\x00"   9 bytes magic
    u64 version = 1
    u8  dtype code         1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f64, 8 u16 (what we write);
                           newer Megatron adds 9 u32, 10 u64. (RWKV-LM's reader maps 6 to Python's
                           float, i.e. float64, not float32.)
    u64 item count n
    u64 document-index count (n + 1 when every item is one document)
    int32[n] sizes         tokens per item
    int64[n] pointers      byte offset of each item in .bin
    int64[d] document index  [0, 1, ..., n]

    write_binidx("data/chat", items)     # atomic: both files appear together or not at all
    write_binidx_set([("data/chat.valid", held), ("data/chat", rest)])   # several pairs: all or none
    ds = BinIdx("data/chat")             # len(ds), ds[i] (np.ndarray), ds.sizes, ds.tokens (memmap)
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float64, 7: np.float64, 8: np.uint16, 9: np.uint32, 10: np.uint64}
CODE_UINT16 = 8
_HEADER = struct.Struct("<9sQBQQ")    # magic, version, dtype code, item count, document-index count
_WRITE_BUFFER = 4 << 20               # bytes of tokens gathered before one write


def paths(prefix: str | Path) -> tuple[Path, Path]:
    """(``prefix.bin``, ``prefix.idx``); a prefix ending in .bin or .idx is accepted too."""
    p = Path(prefix)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    if not p.name:
        raise UserError(f"{str(prefix)!r} names a folder, not tokenized data.",
                        "give the data's path without its ending, e.g. data/sample for data/sample.bin + .idx")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


def write_binidx(prefix: str | Path, items: Iterable[Sequence[int] | np.ndarray], need: int | None = None) -> None:
    """Write ``items`` (token id sequences, each one document) as ``prefix.bin`` + ``prefix.idx``.

    Both files are written under temporary names and moved into place only when complete; on any
    error or Ctrl+C the temporaries are removed and an older pair, if any, is left untouched. The old
    ``.idx`` is removed before the new ``.bin`` moves in, so a crash between the two moves leaves a
    ``.bin`` without ``.idx`` (refused by the reader), never a mismatched pair. A full disk is one line
    (``need``: the bytes both files take, for that message; else what was written until then).
    """
    write_binidx_set([(prefix, items)], need=need)


def write_binidx_set(pairs: Sequence[tuple[str | Path, Iterable[Sequence[int] | np.ndarray]]],
                     need: int | None = None) -> None:
    """Write several binidx pairs, ``[(prefix, items), ...]``, as one change: all of them or none.

    Every pair is written to temporaries first (in the order given); only when all are complete do they
    move into place (``_commit``), with Ctrl+C held back meanwhile. On any error or Ctrl+C before that,
    every temporary is removed and the files already there are left as they were. ``need``: the bytes
    all pairs take together, for the one-line message of a full disk.
    """
    staged: list[_Staged] = []
    try:
        for prefix, items in pairs:
            staged.append(_stage(prefix, items, need))
        _commit(staged)
    finally:
        for s in staged:
            s.discard()


class _Staged:
    """One pair written under temporary names beside its final ones, waiting for ``_commit``."""

    def __init__(self, prefix: str | Path):
        from ..files import temp_path
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_tmp, self.idx_tmp = temp_path(self.bin_path), temp_path(self.idx_path)

    def discard(self) -> None:
        """Remove what is still under a temporary name (nothing, once committed)."""
        for tmp in (self.bin_tmp, self.idx_tmp):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def _stage(prefix: str | Path, items: Iterable[Sequence[int] | np.ndarray], need: int | None) -> _Staged:
    """Write ``items`` to the temporaries of ``prefix``'s pair; nothing under the final names changes."""
    from ..files import make_folder, os_error_in, write_error
    staged = _Staged(prefix)
    make_folder(staged.bin_path.parent)
    sizes: list[int] = []
    target = staged.bin_path
    try:
        with open(staged.bin_tmp, "wb") as f:
            _write_tokens(f, items, sizes)
        size_arr = np.asarray(sizes, dtype=np.int64)
        if size_arr.size and size_arr.max() > np.iinfo(np.int32).max:
            raise ValueError("an item has more than 2**31 - 1 tokens, which binidx cannot store")
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(size_arr[:-1] * 2, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        target = staged.idx_path
        with open(staged.idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_UINT16, len(sizes), len(doc_idx)))
            f.write(size_arr.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        staged.discard()
        if isinstance(err, OSError):
            need = need or 2 * int(sum(sizes)) + 20 * len(sizes) + 64
            raise write_error(os_error_in(err) or err, target, need) from None
        raise
    return staged


def _write_tokens(f, items: Iterable[Sequence[int] | np.ndarray], sizes: list[int]) -> None:
    """The tokens of ``items`` into the open file ``f``, in buffered blocks; each item's length onto ``sizes``."""
    buf: list[np.ndarray] = []
    buffered = 0
    for item in items:
        arr = _as_uint16(item, len(sizes))
        sizes.append(arr.size)
        buf.append(arr)
        buffered += arr.size
        if buffered * 2 >= _WRITE_BUFFER:
            f.write(np.concatenate(buf).tobytes())
            buf, buffered = [], 0
    if buf:
        f.write(np.concatenate(buf).tobytes())
    f.flush()
    os.fsync(f.fileno())


def _commit(staged: Sequence[_Staged]) -> None:
    """Move staged pairs into place, Ctrl+C held back until all have moved.

    Every old ``.idx`` of them goes first, then every ``.bin`` moves in, then every ``.idx``, the last
    pair's last: a crash part way leaves the pairs not yet done without an ``.idx`` (the reader refuses
    them), never a ``.bin`` beside an ``.idx`` it does not belong to, and never the last pair readable
    beside an old one of the others.
    """
    from ..errors import interrupt_deferred
    from ..files import fsync_dir, write_error
    with interrupt_deferred(what="the tokenized data"):
        target = staged[0].idx_path if staged else None
        try:
            for s in staged:
                target = s.idx_path
                if s.idx_path.exists():
                    s.idx_path.unlink()
            for s in staged:
                target = s.bin_path
                os.replace(s.bin_tmp, s.bin_path)
            for s in staged:
                target = s.idx_path
                os.replace(s.idx_tmp, s.idx_path)
        except OSError as err:
            raise write_error(err, target) from None
        for folder in {s.bin_path.parent for s in staged}:
            fsync_dir(folder)


def _as_uint16(item: Sequence[int] | np.ndarray, i: int) -> np.ndarray:
    arr = np.asarray(item)
    if arr.ndim != 1:
        raise ValueError(f"item {i} is not a flat sequence of token ids (shape {arr.shape})")
    if arr.dtype == np.uint16:
        return arr.astype("<u2", copy=False)
    if arr.size == 0:
        return np.zeros(0, dtype="<u2")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"item {i} holds {arr.dtype} values, not integer token ids")
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"item {i} has token ids outside 0..65535 (min {arr.min()}, max {arr.max()})")
    return arr.astype("<u2")


class BinIdx:
    """Read-only view of a binidx pair (ours or any written by RWKV-LM's make_data.py).

    ``len(ds)`` items; ``ds[i]`` the tokens of item i; ``ds.get(i, offset, length)`` a part of it;
    ``ds.sizes`` (int32), ``ds.pointers`` (int64 byte offsets), ``ds.doc_idx``, ``ds.total_tokens``,
    ``ds.tokens``: a memmap over the whole .bin for random-window sampling, ``ds.dtype``.
    """

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = paths(prefix)
        fix = "run ./make_tokenize.sh on your data again to rebuild both files"
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                other = self.bin_path if p == self.idx_path else self.idx_path
                raise UserError(f"{p} does not exist" + (f" (but {other.name} does)" if other.is_file()
                                                         else "") + ".", fix)
        raw = self.idx_path.read_bytes()
        if len(raw) < _HEADER.size or raw[:9] != MAGIC:
            raise UserError(f"{self.idx_path} is not a binidx index file (it does not start with "
                            f"MMIDIDX).", fix)
        _, version, code, n, n_doc = _HEADER.unpack_from(raw, 0)
        if version != VERSION:
            raise UserError(f"{self.idx_path} has binidx version {version}; only version 1 is known.", fix)
        if code not in DTYPES:
            raise UserError(f"{self.idx_path} has an unknown token dtype code {code}.", fix)
        self.dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        need = _HEADER.size + 4 * n + 8 * n + 8 * n_doc
        if len(raw) < need:
            raise UserError(f"{self.idx_path} is truncated: {len(raw)} bytes, its header needs {need} "
                            f"for {n} items.", fix)
        pos = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype="<i4", count=n, offset=pos).astype(np.int32)
        pos += 4 * n
        self.pointers = np.frombuffer(raw, dtype="<i8", count=n, offset=pos).astype(np.int64)
        pos += 8 * n
        self.doc_idx = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=pos).astype(np.int64)
        bin_bytes = self.bin_path.stat().st_size
        item = self.dtype.itemsize
        if n and (self.sizes.min() < 0 or self.pointers.min() < 0
                  or int((self.pointers + self.sizes.astype(np.int64) * item).max()) > bin_bytes):
            raise UserError(f"{self.bin_path} is truncated or does not belong to {self.idx_path.name}: "
                            f"the index points past its end ({bin_bytes} bytes).", fix)
        if bin_bytes % item:
            raise UserError(f"{self.bin_path} is {bin_bytes} bytes, not a whole number of "
                            f"{self.dtype} tokens.", fix)
        if bin_bytes:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of item ``i`` (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items in {self.bin_path.name}")
        i %= n
        size = int(self.sizes[i])
        if offset < 0 or offset > size:
            raise IndexError(f"offset {offset} out of range for item {i} of {size} tokens")
        if length is None:
            length = size - offset
        length = max(0, min(length, size - offset))
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return np.asarray(self.tokens[start:start + length])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __repr__(self) -> str:
        return f"BinIdx({str(self.bin_path)[:-4]!r}: {len(self)} items, {self.total_tokens} tokens)"
