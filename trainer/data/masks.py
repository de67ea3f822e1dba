"""Loss masks: which target tokens count in the loss.

``LOSS_MASK`` values
- ``none``: every real target counts. Padding (``DATALOAD=pad``) never counts: it is not data.
- ``pad``:  padding is ignored; the same as ``none`` (kept as its own name because users ask for it).
- ``qa``:   only the assistant's turns count (see below). An item with no ``Assistant:`` marker falls
            back to ``pad`` (the dataset warns once per item and counts them).

The ``qa`` rule, at the character level on the decoded item
- A *marker* is ``System:``, ``User:`` or ``Assistant:`` at the start of the item or right after a
  newline (so "press User: to log in" in the middle of a line is text, not a turn).
- Trained text runs from just after an ``Assistant:`` marker up to and including the text just before
  the next marker (so the ``\\n\\n`` that ends an answer is trained: the model learns to stop), or to the
  end of the item. The markers themselves, ``User`` and ``System`` turns and anything before the first
  marker are not trained.
- The end-of-document token 0 (no text) counts when the item ends inside an assistant answer: a
  zero-length token takes the state of the character just before it.

Mapping characters back to tokens, exactly
- Each token is turned into its own bytes (``token_bytes_table``); the item's bytes are the tokens'
  bytes back to back, so every token owns a byte range ``[start, end)``.
- The item is decoded with ``errors="surrogateescape"``: a stray byte that is not valid UTF-8 becomes one
  character of one byte, so every character owns a known byte range too, even where one character is
  split across two tokens.
- **A token that straddles a boundary (some of its bytes trained, some not) is trained.** We err on the
  side of training the whole answer: at the start of an answer a token such as ``": Hi"`` would keep the
  answer's first word; at its end a token such as ``"\\n\\nUser"`` teaches the model where the answer stops.
  (The RWKV world tokenizer splits ``Assistant:`` / ``User:`` from the text around them, so in practice
  this is rare.)

A mask here is per *token* of an item: ``mask[i]`` says whether token ``i`` counts when it is the target.
The dataset shifts it by one with the targets.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from ..choices import LOSS_MASKS  # noqa: F401  (re-exported: data.dataset reads it here)

#: A turn marker at the start of the text or of a line.
MARKER_RE = re.compile(r"(?m)^(System|User|Assistant):")
ASSISTANT = "Assistant"


# --------------------------------------------------------------------------- token bytes
def token_bytes_table(tokenizer=None) -> Callable[[int], bytes]:
    """A function ``id -> bytes`` for ``tokenizer`` (default: the shared RWKV world tokenizer).

    Uses the tokenizer's ``table`` (list of bytes per id) or ``decode_bytes([id])``; a tokenizer with
    only ``decode`` falls back to ``decode([id]).encode()``, which is exact only for tokens that are whole
    UTF-8 characters.
    """
    if tokenizer is None:
        from trainer.data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    table = getattr(tokenizer, "table", None)
    if table is not None:
        return table.__getitem__
    dec = getattr(tokenizer, "decode_bytes", None)
    if dec is None:
        def dec(ids):  # noqa: E306
            return tokenizer.decode(ids).encode("utf-8", "surrogateescape")
    cache: dict[int, bytes] = {}

    def one(i: int) -> bytes:
        b = cache.get(i)
        if b is None:
            b = b"" if i == 0 else bytes(dec([i]))
            cache[i] = b
        return b

    return one


# --------------------------------------------------------------------------- character masks
def qa_char_mask(text: str) -> np.ndarray | None:
    """Per character of ``text``: True where it is trained under ``qa``; None if no ``Assistant:`` marker."""
    mask = np.zeros(len(text), dtype=bool)
    in_answer_from = None  # start of the current assistant answer, if inside one
    seen_assistant = False
    for m in MARKER_RE.finditer(text):
        if in_answer_from is not None:
            mask[in_answer_from: m.start()] = True
        if m.group(1) == ASSISTANT:
            seen_assistant = True
            in_answer_from = m.end()
        else:
            in_answer_from = None
    if not seen_assistant:
        return None
    if in_answer_from is not None:
        mask[in_answer_from:] = True
    return mask


def _char_byte_lengths(text: str) -> np.ndarray:
    """UTF-8 length of each character; a surrogate-escaped stray byte counts as 1."""
    if not text:
        return np.zeros(0, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    n[(cp >= 0xDC80) & (cp <= 0xDCFF)] = 1  # surrogateescape: one raw byte
    return n


def token_mask_from_char_mask(token_lengths: Sequence[int], text: str, char_mask: np.ndarray) -> np.ndarray:
    """Per token: 1.0 if any of its bytes is in a trained character, else 0.0.

    ``token_lengths[i]`` is the byte length of token i; ``text`` is the concatenated bytes decoded with
    ``surrogateescape``. A zero-length token (token 0) takes the state of the byte just before it.
    """
    lens = np.asarray(token_lengths, dtype=np.int64)
    byte_mask = np.repeat(char_mask.astype(bool), _char_byte_lengths(text))
    if byte_mask.size != int(lens.sum()):
        raise ValueError("token bytes and decoded text disagree in length")
    ends = np.cumsum(lens)
    starts = ends - lens
    csum = np.concatenate([[0], np.cumsum(byte_mask, dtype=np.int64)])
    out = (csum[ends] - csum[starts]) > 0
    for i in np.flatnonzero(lens == 0):  # token 0 and friends: no bytes of their own
        out[i] = bool(starts[i] > 0 and byte_mask[starts[i] - 1])
    return out.astype(np.float32)


def qa_token_mask(ids: Sequence[int], token_bytes: Callable[[int], bytes]) -> np.ndarray | None:
    """The ``qa`` mask of one item's tokens (float32, 1 = trained), or None if it has no ``Assistant:``."""
    pieces = [token_bytes(int(t)) for t in ids]
    text = b"".join(pieces).decode("utf-8", errors="surrogateescape")
    cmask = qa_char_mask(text)
    if cmask is None:
        return None
    return token_mask_from_char_mask([len(p) for p in pieces], text, cmask)


def has_assistant(text: str) -> bool:
    return any(m.group(1) == ASSISTANT for m in MARKER_RE.finditer(text))
