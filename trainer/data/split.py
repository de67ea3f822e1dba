"""A validation set held out of the data: which items go there (by their content), and a view of some items of a
binidx that the training datasets read as if it were a binidx of its own.

    keys = content_keys(BinIdx("data/chat"))        # one 16-byte key per item, equal exactly when the token ids are
    keys = keys_of(flat, offsets, which)            # the same, for make_tokenize's arrays in memory
    train, valid = held_out(keys, 0.05, seed=42)    # sorted item positions; copies of one content stay on one side
    view = ItemView(BinIdx("data/chat"), valid)     # len, view[i], get, sizes, tokens, pointers: as a BinIdx
    fraction = valid_fraction("0.05", "--valid")    # as typed (None or "" = none), else a one-line UserError

make_tokenize (trainer/data/prepare.py) holds items out before it repeats and shuffles them and writes them to
NAME.valid.bin/.idx; the trainer can hold items out of one binidx with held_out and ItemView. The rule is the same:
``max(1, round(fraction * distinct contents))`` contents, chosen by a permutation seeded with the seed and a salt of
its own (so the choice does not follow any other shuffle seeded with the same SEED), the same on every machine.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from ..errors import UserError

KEY_DTYPE = np.dtype("V16")           # blake2b-128 of the item's token ids (little-endian uint16) and its length
_SALT = int.from_bytes(b"held out", "big")
_KEY_CHUNK = 1 << 20                  # items hashed before their digests are packed into the key array
_READ_CHUNK = 1 << 22                 # tokens read at a time by ItemTokens.max()


# ------------------------------------------------------------------------------------------ keys
def content_keys(data) -> np.ndarray:
    """One key per item of ``data`` (a BinIdx, an ItemView, or any sequence of token arrays), in item order."""
    if isinstance(data, ItemView):
        return _keys(data.source.tokens, data.starts, np.asarray(data.sizes, np.int64))
    if hasattr(data, "tokens") and hasattr(data, "pointers"):
        itemsize = np.dtype(data.tokens.dtype).itemsize
        return _keys(data.tokens, np.asarray(data.pointers, np.int64) // itemsize, np.asarray(data.sizes, np.int64))
    out = np.empty(len(data), dtype=KEY_DTYPE)
    for i in range(len(data)):
        out[i] = np.frombuffer(_digest(np.asarray(data[i])), dtype=KEY_DTYPE)[0]
    return out


def keys_of(flat: np.ndarray, offsets: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
    """Keys of the items ``which`` (all when None) of ``flat``, item i being ``flat[offsets[i]:offsets[i+1]]``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    which = np.arange(len(offsets) - 1) if which is None else np.asarray(which, dtype=np.int64)
    starts = offsets[which]
    return _keys(np.asarray(flat), starts, offsets[which + 1] - starts)


def _keys(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Keys of the items ``tokens[starts[j] : starts[j] + lengths[j]]``."""
    n = len(starts)
    out = np.empty(n, dtype=KEY_DTYPE)
    fast = tokens.dtype == np.dtype("<u2") and tokens.ndim == 1 and tokens.flags.c_contiguous
    raw = memoryview(np.ascontiguousarray(tokens).view(np.uint8)) if fast else None
    blake = hashlib.blake2b
    for c in range(0, n, _KEY_CHUNK):
        s_list = starts[c:c + _KEY_CHUNK].tolist()
        k_list = lengths[c:c + _KEY_CHUNK].tolist()
        if fast:      # the bytes are already the canonical form: hash them where they lie
            digests = [blake(raw[2 * s: 2 * (s + k)], digest_size=16, person=b"u2" + k.to_bytes(8, "little")).digest()
                       for s, k in zip(s_list, k_list)]
        else:
            digests = [_digest(np.asarray(tokens[s: s + k])) for s, k in zip(s_list, k_list)]
        out[c:c + len(digests)] = np.frombuffer(b"".join(digests), dtype=KEY_DTYPE)
    return out


def _digest(arr: np.ndarray) -> bytes:
    """The key of one item: its ids as little-endian uint16 when they fit (as binidx stores them), else as 8-byte
    numbers, marked so that the two forms never meet; the item's length goes in too."""
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind in "iub" and (arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= 0xFFFF)):
        raw, mark = arr.astype("<u2").tobytes(), b"u2"
    elif arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
        raw, mark = arr.astype("<u8").tobytes(), b"u8"
    elif arr.dtype.kind in "iu":
        raw, mark = arr.astype("<i8").tobytes(), b"i8"
    else:
        raw, mark = arr.astype("<f8").tobytes(), b"f8"
    return hashlib.blake2b(raw, digest_size=16, person=mark + arr.size.to_bytes(8, "little")).digest()


# ------------------------------------------------------------------------------------------ the rule
def valid_fraction(value: str | float | None, name: str = "VALID_FRACTION") -> float | None:
    """The share to hold out, as a user typed it (``name``: VALID_FRACTION, --valid, ...): None when empty, else a
    number more than 0 and less than 1, or a one-line UserError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        number = math.nan
    else:
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise UserError(f"{setting(name, value)} is not a number; it is the share of the items held out for "
                            "validation, more than 0 and less than 1.", _example(name)) from None
    return _check_fraction(number, name, value)


def _check_fraction(fraction: float, name: str, shown=None) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not 0 < float(fraction) < 1:
        raise UserError(f"{setting(name, fraction if shown is None else shown)} must be more than 0 and less than 1 "
                        "(the share of the items held out for validation).", _example(name))
    return float(fraction)


def setting(name: str, value) -> str:
    """How the setting looks as typed: ``--valid 0.05`` for an option, ``VALID_FRACTION=0.05`` for a variable."""
    if isinstance(value, float):
        value = f"{value:g}"
    text = str(value).strip()[:40]
    return f"{name} {text}" if name.startswith("-") else f"{name}={text}"


def _example(name: str) -> str:
    how = f"{name} 0.05" if name.startswith("-") else f"{name}=0.05"
    return f"give a share such as {how} (5 % of the items)"


def _leave_out(name: str) -> str:
    return f"leave out {name}" if name.startswith("-") else f"leave {name} empty"


def held_out(keys: np.ndarray, fraction: float, seed: int, name: str = "VALID_FRACTION", off: str | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid): sorted int64 positions into ``keys``. Items with equal keys go to the same side; valid holds
    ``max(1, round(fraction * distinct))`` distinct contents, picked by a permutation of the distinct keys (in
    sorted order) seeded with ``seed`` and this module's salt. ``name`` is the setting the messages name, ``off``
    how to switch it off there (default: leave it out / empty; training.sh's VALID_FRACTION=0)."""
    off = off or _leave_out(name)
    fraction = _check_fraction(fraction, name)
    distinct, inverse = np.unique(np.asarray(keys), return_inverse=True)
    n = len(distinct)
    if n < 2:
        raise UserError(f"{setting(name, fraction)} holds items out for validation, but the data has "
                        f"{'no item' if n == 0 else 'only 1 distinct item'} (copies of an item count once): "
                        "none can be held out with one left to train on.",
                        f"add more items to the data, or {off}")
    k = max(1, round(fraction * n))
    if k >= n:
        most = math.floor((n - 1) / n * 100) / 100
        raise UserError(f"{setting(name, fraction)} would hold out {k} of the {n} distinct items (round({fraction:g} "
                        f"x {n})), leaving none to train on.",
                        f"lower {name} to at most {most:g}, add more items, or {off}")
    rng = np.random.default_rng([int(seed) % 2**64, _SALT])
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[:k]] = True
    is_valid = chosen[inverse.reshape(-1)]
    return np.flatnonzero(~is_valid).astype(np.int64), np.flatnonzero(is_valid).astype(np.int64)


# ------------------------------------------------------------------------------------------ the view
class ItemView:
    """Some items of a BinIdx, ``indices[i]`` being item i of the view, read as a binidx of their own: ``len``,
    ``view[i]``, ``view.get(i, offset, length)``, ``sizes``, ``total_tokens``, ``dtype``, ``tokens`` (the items back to
    back, see ItemTokens) and ``pointers`` (byte offsets in that joined layout). Nothing is copied: reads go to the
    BinIdx's memmap. A pickle holds the BinIdx's path and the indices and opens it again (DataLoader workers).
    It has no ``bin_path``: TokenDataset pickles an object with one as that path, which would be the whole data."""

    def __init__(self, data, indices):
        if isinstance(data, (str, Path)):
            from .binidx import BinIdx
            data = BinIdx(data)
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a flat array of whole numbers, not {idx.dtype} of shape {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(data)):
            raise IndexError(f"indices {int(idx.min())}..{int(idx.max())} outside the {len(data)} items of {data!r}")
        self.source = data
        self.indices = idx
        self.dtype = np.dtype(data.tokens.dtype)
        self.sizes = np.asarray(data.sizes)[idx]
        self.offsets = np.zeros(len(idx) + 1, dtype=np.int64)      # item i = tokens[offsets[i]:offsets[i+1]]
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.pointers = self.offsets[:-1] * self.dtype.itemsize
        self.starts = (np.asarray(data.pointers, np.int64) // self.dtype.itemsize)[idx]   # in the source's tokens
        self.tokens = ItemTokens(self)
        bin_path = getattr(data, "bin_path", None)
        self.prefix = None if bin_path is None else Path(str(bin_path)[: -len(".bin")])

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of the view's item ``i`` (to its end when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for the {n} items of {self!r}")
        return self.source.get(int(self.indices[i % n]), offset, length)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __reduce__(self):
        source = self.source if self.prefix is None else str(self.prefix)
        return (ItemView, (source, self.indices))

    def __repr__(self) -> str:
        where = repr(str(self.prefix)) if self.prefix is not None else repr(self.source)
        return f"ItemView({where}: {len(self)} items, {self.total_tokens} tokens)"


class ItemTokens:
    """A view's items back to back as a read-only 1-D token array: ``len``, ``dtype``, ``shape``, ``[a:b]`` (a numpy
    array, across items too), ``[i]``, an array of positions, ``max()``. Only what is asked for is read."""

    ndim = 1

    def __init__(self, view: ItemView):
        self._src = view.source.tokens
        self._starts = view.starts
        self._offsets = view.offsets
        self.dtype = view.dtype

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step == 1:
                return self._span(a, b)
            return self._at(np.arange(a, b, step, dtype=np.int64))
        if isinstance(key, (int, np.integer)):
            if not -n <= key < n:
                raise IndexError(f"token {key} out of range for {n} tokens")
            return self._at(np.array([int(key) % n]))[0]
        pos = np.asarray(key, dtype=np.int64)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"token positions out of range for {n} tokens")
        return self._at(pos % max(n, 1))

    def _span(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self._offsets, a, side="right")) - 1
        if int(self._offsets[first + 1]) >= b:          # inside one item: one plain slice of the source
            s = int(self._starts[first]) + a - int(self._offsets[first])
            return np.asarray(self._src[s: s + b - a])
        return self._at(np.arange(a, b, dtype=np.int64))

    def _at(self, pos: np.ndarray) -> np.ndarray:
        item = np.searchsorted(self._offsets, pos, side="right") - 1
        return np.asarray(self._src[self._starts[item] + (pos - self._offsets[item])])

    def max(self):
        if len(self) == 0:
            raise ValueError("max() of no tokens")
        return max(self._span(a, min(a + _READ_CHUNK, len(self))).max() for a in range(0, len(self), _READ_CHUNK))

    def __array__(self, dtype=None, copy=None):
        out = self._span(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ItemTokens({len(self)} tokens, {self.dtype})"
