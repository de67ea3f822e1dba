"""The RWKV world tokenizer (vocabulary ``rwkv_vocab_v20230424``, 65536 ids).

    tok = get_tokenizer()
    ids = tok.encode("User: hi\\n\\nAssistant: hello")   # list[int], same ids as rwkv's TRIE_TOKENIZER
    tok.decode(ids)                                       # str; bytes that split a character -> U+FFFD
    flat, offsets = tok.encode_flat(texts, eof=True)      # all items as one uint16 array (make_tokenize)

Encoding uses the Rust implementation in ``pyrwkv-tokenizer`` loaded with the vocabulary file that ships
inside the ``rwkv`` package, so the ids are those of ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` (greedy
longest byte match; tests/test_tokenizer.py checks it on a Unicode-heavy corpus and on every vocabulary
entry). Decoding is done here in Python from the same file: it never raises on ids that cut a UTF-8
character in half, and id 0 (end of document, not in the file) decodes to nothing.

Speed (bench/RESULTS.md): one ``encode`` call costs a few microseconds of overhead, so short items are
encoded in batches through the Rust ``encode_batch``, which also spreads the work over all cores.
"""
from __future__ import annotations

import os

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import UserError

VOCAB_SIZE = 65536          # ids 0..65535 (uint16); the file defines 1..65529, 0 is end of document
EOD = 0                     # end-of-document token appended to every item
VOCAB_NAME = "rwkv_vocab_v20230424.txt"

# encode_flat hands the Rust encode_batch slices of about this many bytes / items: large enough that the
# per-call and thread start-up costs vanish, small enough for a smooth progress bar (bench/RESULTS.md).
BATCH_BYTES = 1 << 20
BATCH_ITEMS = 1024


def vocab_file() -> Path:
    """The vocabulary file inside the installed ``rwkv`` package (found without importing it)."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the 'rwkv' package is not installed (it holds the tokenizer's vocabulary).",
                        "pip install -e .  (or: pip install 'rwkv>=0.8.28,<0.9')")
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_NAME
    if not path.is_file():
        raise UserError(f"the rwkv package has no {VOCAB_NAME} at {path}.",
                        "reinstall it: pip install --force-reinstall 'rwkv>=0.8.28,<0.9'")
    return path


def _is_fatal(err: BaseException) -> bool:
    return isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


class Tokenizer:
    """Encode / decode with the RWKV world vocabulary. Use ``get_tokenizer()`` for the shared instance."""

    vocab_size = VOCAB_SIZE
    eod = EOD

    def __init__(self, vocab_path: str | Path | None = None):
        try:
            import pyrwkv_tokenizer
        except ImportError as err:
            raise UserError("the fast tokenizer package 'pyrwkv-tokenizer' is not installed.",
                            "pip install -e .  (or: pip install 'pyrwkv-tokenizer>=0.9.1,<0.10')") from err
        self.vocab_path = Path(vocab_path) if vocab_path is not None else vocab_file()
        self._rust = pyrwkv_tokenizer.WorldTokenizer(str(self.vocab_path))
        self._table: list[bytes] | None = None

    # ------------------------------------------------------------------ encode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token)."""
        try:
            return self._rust.encode(text)
        except BaseException as err:            # pyo3's PanicException is a BaseException
            if _is_fatal(err):
                raise
            raise _encode_error(err) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in batches on all cores."""
        out: list[list[int]] = []
        for start, stop in _batches(texts):
            out.extend(x if isinstance(x, list) else x.tolist() for x in self._encode_slice(texts, start, stop))
        return out

    def _encode_slice(self, texts: Sequence[str], start: int, stop: int) -> list[list[int] | np.ndarray]:
        """Token ids of texts[start:stop]. Short items cost little to tokenize but a call each: the items
        are joined with "\x00" into one long text per core and tokenized at once, then split at its id.
        Exact, because b"\x00" is a token of its own and part of no other, so greedy longest matching
        never crosses it: each item gets exactly the ids it gets alone. Items containing "\x00"
        themselves are tokenized one by one."""
        part = list(texts[start:stop])
        joined = self._joined_ids(part)
        if joined is not None:
            out: list[np.ndarray] = []
            for arr in joined:
                bounds = np.concatenate(([-1], np.flatnonzero(arr == SEPARATOR_ID), [len(arr)]))
                out.extend(arr[a + 1: b] for a, b in zip(bounds[:-1], bounds[1:]))
            return out
        try:
            return [self._rust.encode(part[0])] if len(part) == 1 else self._rust.encode_batch(part)
        except BaseException as err:
            if _is_fatal(err):
                raise
            raise _encode_error(err) from None

    def _joined_ids(self, part: Sequence[str]) -> list[np.ndarray] | None:
        """The ids of ``part`` joined by SEPARATOR, one text per core (None: not worth it or not joinable).
        Only short items gain: long ones already amortise the call, and Rust's batch spreads them better."""
        if len(part) < 2 or sum(map(len, part)) > JOIN_BELOW_MEAN_CHARS * len(part) \
                or any(SEPARATOR in t for t in part):
            return None
        groups = [g for g in np.array_split(np.arange(len(part)), min(len(part), 2 * (os.cpu_count() or 1)))
                  if len(g)]
        try:
            encoded = self._rust.encode_batch([SEPARATOR.join(part[g[0]: g[-1] + 1]) for g in groups])
        except BaseException as err:
            if _is_fatal(err):
                raise
            raise _encode_error(err) from None
        return [np.asarray(ids, dtype=np.uint16) for ids in encoded]

    def _flat_slice(self, texts: Sequence[str], start: int, stop: int, eof: bool) -> tuple[np.ndarray, np.ndarray]:
        """texts[start:stop] as one uint16 array (each item followed by token 0 when ``eof``) and the
        length of each item in it. Joined items (see _encode_slice) are turned into this in one vectorised
        pass: each separator id becomes the end token, with no loop over items."""
        joined = self._joined_ids(texts[start:stop])
        if joined is not None:
            chunks, counts = [], []
            for arr in joined:
                cuts = np.flatnonzero(arr == SEPARATOR_ID)
                bounds = np.concatenate(([-1], cuts, [len(arr)]))
                counts.append(np.diff(bounds) - 1 + int(eof))
                if eof:
                    arr[cuts] = EOD
                    chunks.append(np.append(arr, np.uint16(EOD)))
                else:
                    chunks.append(np.delete(arr, cuts))
            return np.concatenate(chunks), np.concatenate(counts)
        ids = self._encode_slice(texts, start, stop)
        counts = np.fromiter((len(x) + int(eof) for x in ids), dtype=np.int64, count=len(ids))
        chunk = np.empty(int(counts.sum()), dtype=np.uint16)
        pos = 0
        for x in ids:
            chunk[pos:pos + len(x)] = x
            pos += len(x)
            if eof:
                chunk[pos] = EOD
                pos += 1
        return chunk, counts

    def encode_flat(self, texts: Sequence[str], eof: bool = True, progress: bool | None = False,
                    desc: str = "tokenizing") -> tuple[np.ndarray, np.ndarray]:
        """Encode many items into one uint16 array.

        Returns ``(flat, offsets)``: item i is ``flat[offsets[i]:offsets[i+1]]`` and ends with token 0
        when ``eof``. ``progress``: True shows a tqdm bar (bytes), None shows it only for inputs over
        4 MB, False never. Memory is 2 bytes per token, not a Python list per item.
        """
        n = len(texts)
        lengths = np.zeros(n, dtype=np.int64)
        pieces: list[np.ndarray] = []
        bar = None
        if progress is not False:
            total = sum(len(t) for t in texts)  # characters: cheap; close enough to bytes for a bar
            if progress or total > (4 << 20):
                from tqdm import tqdm
                bar = tqdm(total=total, unit="char", unit_scale=True, desc=desc, leave=False)
        try:
            for start, stop in _batches(texts):
                chunk, counts = self._flat_slice(texts, start, stop, eof)
                lengths[start:stop] = counts
                pieces.append(chunk)
                if bar is not None:
                    bar.update(sum(len(t) for t in texts[start:stop]))
        finally:
            if bar is not None:
                bar.close()
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
        return flat, offsets

    # ------------------------------------------------------------------ decode
    @property
    def table(self) -> list[bytes]:
        """``table[id]`` = the bytes of token id (b'' for 0 and for ids the file does not define)."""
        if self._table is None:
            self._table = load_vocab_bytes(self.vocab_path)
        return self._table

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` joined (id 0 gives none); ValueError for an id outside 0..65535."""
        ids = [int(x) for x in ids]
        if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
            bad = next(x for x in ids if not 0 <= x < VOCAB_SIZE)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
        table = self.table
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that do not form whole UTF-8 characters become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _encode_error(err: BaseException) -> Exception:
    if isinstance(err, UnicodeEncodeError):
        return ValueError(f"text cannot be encoded as UTF-8 ({err.reason} at character {err.start}): "
                          "it holds an unpaired surrogate such as a lone \\ud800 escape")
    if isinstance(err, TypeError):
        return TypeError(f"the tokenizer takes str, not this: {err}")
    return RuntimeError(f"the tokenizer failed: {type(err).__name__}: {err}")


SEPARATOR, SEPARATOR_ID = "\x00", 1    # b"\x00" is token 1 and occurs in no other token
JOIN_BELOW_MEAN_CHARS = 1000          # join a slice's items when they are shorter than this on average


def _batches(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) slices of at most BATCH_ITEMS items and about BATCH_BYTES characters."""
    start, size, n = 0, 0, len(texts)
    for i in range(n):
        size += len(texts[i])
        if size >= BATCH_BYTES or i + 1 - start >= BATCH_ITEMS:
            yield start, i + 1
            start, size = i + 1, 0
    if start < n:
        yield start, n


def load_vocab_bytes(path: str | Path) -> list[bytes]:
    """Parse the vocabulary file (``<id> <str or bytes literal> <byte length>`` per line)."""
    table = [b""] * VOCAB_SIZE
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            idx = int(line[:first])
            tok = ast.literal_eval(line[first:last].strip())
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if not isinstance(tok, bytes) or len(tok) != int(line[last:]) or not 0 < idx < VOCAB_SIZE:
                raise ValueError(f"{path}:{lineno}: not a valid vocabulary line: {line[:80]!r}")
            table[idx] = tok
    return table


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer (loaded once per process, about a second)."""
    return Tokenizer()
