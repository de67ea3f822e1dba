"""Training samples from a binidx: the three ``DATALOAD`` modes and their loss masks.

- ``get``:  a random window of ``CTX_LEN + 1`` tokens anywhere in the data (RWKV-LM style, windows may
  cross item boundaries); input = first ``CTX_LEN``, target = last ``CTX_LEN``.
- ``pad``:  one item per sample from its start, cut to ``CTX_LEN + 1`` tokens, right-padded to
  ``CTX_LEN`` (padding: input 0, target 0, mask 0). Any micro batch size.
- ``only``: one item per step, cut to ``CTX_LEN + 1`` tokens (input/target up to ``CTX_LEN``), no
  padding, micro batch 1 (samples have different lengths).

Every sample is a dict ``input_ids`` [T] int64, ``targets`` [T] int64 (= the inputs shifted by one),
``mask`` [T] float32 (1 = this target counts in the loss).

Determinism and resuming: sample ``j`` of epoch ``e`` on rank ``r`` is a pure function of
``(seed, e, j, r, world_size)``. The epoch's samples are laid out as global steps: the global batch of
step ``s`` is ``order[s·W·B : (s+1)·W·B]`` (W ranks, micro batch B) and rank ``r`` takes the ``r``-th slice
of ``B``, so ranks are disjoint and the items of a step do not depend on how they are split over GPUs.
For ``pad``/``only`` the order is an endless stream of shuffled passes over the items (pass ``k`` is a
permutation seeded by ``(seed, k)``); epoch ``e`` reads positions ``e·W·B·EPOCH_STEPS`` onwards. When
``EPOCH_STEPS·B·W`` equals the item count, each epoch is exactly one pass: every item once. For ``get``
each sample draws its window start from a generator seeded by ``(seed, e, global index)``.

Use ``EpochSampler`` with the dataset (not ``shuffle=True``, not a ``DistributedSampler``: the dataset
already shuffles and splits ranks). Lightning calls ``set_epoch`` on a sampler that has it, which works
with persistent workers too; to resume mid-epoch, start the sampler at the first unseen sample.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from trainer.choices import DATALOADS as MODES
from trainer.data.masks import LOSS_MASKS, qa_token_mask, token_bytes_table
from trainer.errors import UserError

END_TOKEN = 0


class QAFallbackWarning(UserWarning):
    """An item has no ``Assistant:`` marker: LOSS_MASK=qa trains on all of it (as ``pad``)."""


# --------------------------------------------------------------------------- facts for the validator
@dataclass(frozen=True)
class DataFacts:
    items: int
    shortest: int  # tokens in the shortest item (its end token 0 included)
    longest: int
    total_tokens: int


def data_facts(data) -> DataFacts:
    """Number of items, shortest/longest item and total tokens of a BinIdx (or a path prefix)."""
    data = _open(data)
    sizes = np.asarray(data.sizes, dtype=np.int64)
    if sizes.size == 0:
        return DataFacts(0, 0, 0, 0)
    return DataFacts(int(sizes.size), int(sizes.min()), int(sizes.max()), int(sizes.sum()))


def get_fits(data, ctx_len: int) -> bool:
    """For ``get``: whether the data holds at least one window of ``ctx_len + 1`` tokens."""
    return data_facts(data).total_tokens >= ctx_len + 1


def items_per_epoch(epoch_steps: int, micro_bsz: int, world_size: int = 1) -> int:
    """How many samples one epoch uses over all ranks (for ``pad``/``only``: items)."""
    return epoch_steps * micro_bsz * world_size


def items_without_assistant(data, tokenizer=None, limit: int | None = None) -> list[int]:
    """Indices of items with no ``Assistant:`` marker (they fall back to ``pad`` under ``qa``).

    Decodes every item (or the first ``limit``): fine for the dry run, slow on gigabytes.
    """
    data = _open(data)
    tb = token_bytes_table(tokenizer)
    n = len(data) if limit is None else min(limit, len(data))
    return [i for i in range(n) if qa_token_mask(np.asarray(data[i]), tb) is None]


def _open(data):
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from trainer.data.binidx import BinIdx

        return BinIdx(str(data))
    return data


# --------------------------------------------------------------------------- datasets
class TokenDataset(Dataset):
    """Base of the three modes: epoch bookkeeping, rank split, masks. See the module docstring."""

    mode = "?"

    def __init__(self, data, ctx_len: int, micro_bsz: int, epoch_steps: int, seed: int,
                 loss_mask: str = "pad", world_size: int = 1, rank: int = 0, tokenizer=None):
        if loss_mask not in LOSS_MASKS:
            raise UserError(f"LOSS_MASK={loss_mask!r} is not known.", f"use one of {', '.join(LOSS_MASKS)}.")
        for name, v in (("CTX_LEN", ctx_len), ("MICRO_BSZ", micro_bsz), ("EPOCH_STEPS", epoch_steps)):
            if int(v) < 1:
                raise UserError(f"{name}={v} must be at least 1.", f"set {name} to a positive number.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data = _open(data)
        self.ctx_len = int(ctx_len)
        self.micro_bsz = int(micro_bsz)
        self.epoch_steps = int(epoch_steps)
        self.seed = int(seed)
        self.loss_mask = loss_mask
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.epoch = 0
        self.sizes = np.asarray(self.data.sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])  # item i = tokens[offsets[i]:offsets[i+1]]
        self._tokenizer = tokenizer
        self._token_bytes = None
        self._mask_cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self.qa_fallback_items: set[int] = set()

    # -- pickling (DataLoader workers started with "spawn", e.g. on Windows): send the path, not the
    # memmap, which numpy would copy whole into the pickle
    def __getstate__(self):
        state = self.__dict__.copy()
        bin_path = getattr(self.data, "bin_path", None)
        if bin_path is not None:
            state["data"] = str(bin_path)[: -len(".bin")]
        state["_token_bytes"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.data, str):
            self.data = _open(self.data)

    # -- epochs and indices
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_steps * self.micro_bsz

    @property
    def samples_per_epoch(self) -> int:
        """Over all ranks."""
        return items_per_epoch(self.epoch_steps, self.micro_bsz, self.world_size)

    def global_index(self, j: int) -> int:
        """Position in the epoch's global order of this rank's sample ``j``."""
        if not 0 <= j < len(self):
            raise IndexError(j)
        step, b = divmod(j, self.micro_bsz)
        return (step * self.world_size + self.rank) * self.micro_bsz + b

    def __getitem__(self, j):
        """``j`` is an index into the current epoch, or an ``(epoch, j)`` pair (from ``EpochSampler``)."""
        if isinstance(j, (tuple, list)):
            epoch, j = j
        else:
            epoch = self.epoch
        return self.sample(int(epoch), int(j))

    def sample(self, epoch: int, j: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The module's ``collate``: samples → [B, T] tensors."""
        return collate(samples)

    # -- masks
    @property
    def qa_fallback_count(self) -> int:
        """Items seen so far (in this process) that had no ``Assistant:`` marker under ``qa``."""
        return len(self.qa_fallback_items)

    def item_token_mask(self, i: int) -> np.ndarray | None:
        """``qa`` mask of item ``i`` per token, or None when the whole item counts."""
        if self.loss_mask != "qa":
            return None
        if i in self._mask_cache:
            self._mask_cache.move_to_end(i)
            return self._mask_cache[i]
        if self._token_bytes is None:
            tok = self._tokenizer
            self._token_bytes = token_bytes_table(tok)
        m = qa_token_mask(np.asarray(self.data[i]), self._token_bytes)
        if m is None and i not in self.qa_fallback_items:
            self.qa_fallback_items.add(i)
            warnings.warn(f"item {i} has no 'Assistant:' marker: LOSS_MASK=qa trains on all of it "
                          f"(as LOSS_MASK=pad)", QAFallbackWarning, stacklevel=2)
        self._mask_cache[i] = m
        if len(self._mask_cache) > 4096:
            self._mask_cache.popitem(last=False)
        return m

    def _range_mask(self, start: int, stop: int) -> np.ndarray:
        """Per-token mask of the global token range [start, stop)."""
        out = np.ones(stop - start, dtype=np.float32)
        if self.loss_mask != "qa":
            return out
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        i = first
        while i < len(self.sizes) and self.offsets[i] < stop:
            m = self.item_token_mask(i)
            if m is not None:
                a, b = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
                out[a - start: b - start] = m[a - self.offsets[i]: b - self.offsets[i]]
            i += 1
        return out


class GetDataset(TokenDataset):
    """``get``: random windows of ``ctx_len + 1`` tokens anywhere in the data."""

    mode = "get"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        total = int(self.offsets[-1])
        if total < self.ctx_len + 1:
            raise UserError(
                f"DATALOAD=get needs at least CTX_LEN+1 = {self.ctx_len + 1} tokens of data, "
                f"but the data holds {total}.",
                "add data, lower CTX_LEN, or use DATALOAD=pad.")
        self.max_start = total - (self.ctx_len + 1)  # inclusive
        ptr = getattr(self.data, "pointers", None)
        if self.loss_mask == "qa" and ptr is not None and len(ptr) and not np.array_equal(
                np.asarray(ptr, np.int64) // self.data.tokens.dtype.itemsize, self.offsets[:-1]):
            raise UserError("this binidx stores its items out of order, so LOSS_MASK=qa cannot map "
                            "DATALOAD=get windows to items.",
                            "rebuild the data with ./make_tokenize.sh, or use DATALOAD=pad.")

    def window_start(self, epoch: int, j: int) -> int:
        g = self.global_index(j)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, g])
        return int(rng.integers(0, self.max_start + 1))

    def sample(self, epoch: int, j: int) -> dict[str, torch.Tensor]:
        s = self.window_start(epoch, j)
        T = self.ctx_len
        toks = np.asarray(self.data.tokens[s: s + T + 1], dtype=np.int64)
        mask = self._range_mask(s + 1, s + T + 1)
        return _as_sample(toks[:-1], toks[1:], mask)


class ItemDataset(TokenDataset):
    """``pad`` and ``only``: items from their start, in shuffled passes."""

    def __init__(self, *args, pad: bool, **kw):
        super().__init__(*args, **kw)
        self.pad = pad
        self.mode = "pad" if pad else "only"
        if not pad and self.micro_bsz != 1:
            raise UserError(f"DATALOAD=only trains one item per step, but MICRO_BSZ={self.micro_bsz}.",
                            "set MICRO_BSZ=1 (use MINI_BSZ for a larger effective batch), or DATALOAD=pad.")
        if len(self.sizes) == 0:
            raise UserError("the data holds no items.", "tokenize a jsonl file with at least one line.")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, k: int) -> np.ndarray:
        """The order of items in shuffled pass ``k``."""
        p = self._perms.get(k)
        if p is None:
            p = np.random.default_rng([self.seed & 0xFFFFFFFF, k]).permutation(len(self.sizes))
            self._perms[k] = p
            if len(self._perms) > 3:
                self._perms.popitem(last=False)
        return p

    def item_index(self, epoch: int, j: int) -> int:
        pos = epoch * self.samples_per_epoch + self.global_index(j)
        k, within = divmod(pos, len(self.sizes))
        return int(self.permutation(k)[within])

    def sample(self, epoch: int, j: int) -> dict[str, torch.Tensor]:
        i = self.item_index(epoch, j)
        T = self.ctx_len
        get = getattr(self.data, "get", None)  # BinIdx.get reads only the part we use
        item = np.asarray(get(i, 0, T + 1) if get is not None else self.data[i][: T + 1], dtype=np.int64)
        L = max(len(item) - 1, 0)  # real positions (an empty item has none)
        m = self.item_token_mask(i)
        mask = np.ones(max(L, 0), dtype=np.float32) if m is None else m[1: L + 1].astype(np.float32)
        if self.pad:
            inp = np.zeros(T, dtype=np.int64)
            tgt = np.zeros(T, dtype=np.int64)
            msk = np.zeros(T, dtype=np.float32)
            inp[:L], tgt[:L], msk[:L] = item[:-1], item[1:], mask
            return _as_sample(inp, tgt, msk)
        if L <= 0:  # an item with no text: one position that does not count
            return _as_sample(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32))
        return _as_sample(item[:-1], item[1:], mask)


def _as_sample(inp, tgt, mask) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(inp, dtype=np.int64)),
        "targets": torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.int64)),
        "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)),
    }


def make_dataset(mode: str, binidx, ctx_len: int, micro_bsz: int, epoch_steps: int, seed: int,
                 loss_mask: str, world_size: int = 1, rank: int = 0, tokenizer=None) -> TokenDataset:
    """The dataset for ``DATALOAD=mode``. ``binidx``: a ``BinIdx`` or its path prefix.

    ``tokenizer`` is needed only for ``loss_mask="qa"`` (default: the RWKV world vocabulary).
    """
    args = (binidx, ctx_len, micro_bsz, epoch_steps, seed, loss_mask, world_size, rank, tokenizer)
    if mode == "get":
        return GetDataset(*args)
    if mode in ("pad", "only"):
        return ItemDataset(*args, pad=(mode == "pad"))
    raise UserError(f"DATALOAD={mode!r} is not known.", f"use one of {', '.join(MODES)}.")


# --------------------------------------------------------------------------- batching
def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into [B, T] tensors; shorter samples are right-padded with input 0, target 0,
    mask 0 (only happens if ``only`` samples were ever batched together)."""
    T = max(int(s["input_ids"].numel()) for s in samples)
    B = len(samples)
    out = {
        "input_ids": torch.zeros(B, T, dtype=torch.int64),
        "targets": torch.zeros(B, T, dtype=torch.int64),
        "mask": torch.zeros(B, T, dtype=torch.float32),
    }
    for b, s in enumerate(samples):
        n = int(s["input_ids"].numel())
        for k in out:
            out[k][b, :n] = s[k]
    return out


class EpochSampler(Sampler):
    """Yields ``(epoch, j)`` for ``j`` in ``start..length-1``; ``set_epoch`` moves to another epoch.

    Because the epoch travels with each index, workers (persistent or not) never hold a stale epoch.
    """

    def __init__(self, dataset_or_length, epoch: int = 0, start: int = 0):
        self.length = dataset_or_length if isinstance(dataset_or_length, int) else len(dataset_or_length)
        self.epoch = int(epoch)
        self.start = int(start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for j in range(self.start, self.length):
            yield (epoch, j)

    def __len__(self) -> int:
        return self.length - self.start


# --------------------------------------------------------------------------- preview
LEGEND = "legend: ⟦…⟧ not trained (loss mask 0), <end> = end-of-document token 0"


def preview(sample: dict[str, torch.Tensor], tokenizer, max_chars: int = 600) -> str:
    """The decoded sample with the loss mask shown: untrained text wrapped in ⟦ ⟧.

    The first input token is never a target, so it is always shown as not trained. Trailing padding
    (input 0 and target 0, mask 0) is summarised, not printed. ``sample`` may be one sample or a batch
    (the first row is shown).
    """
    inp = sample["input_ids"]
    tgt = sample["targets"]
    msk = sample["mask"]
    if inp.dim() == 2:
        inp, tgt, msk = inp[0], tgt[0], msk[0]
    inp, tgt, msk = inp.tolist(), tgt.tolist(), msk.tolist()
    n = len(inp)
    while n > 0 and inp[n - 1] == 0 and tgt[n - 1] == 0 and msk[n - 1] == 0:
        n -= 1
    pad = len(inp) - n
    if n == 0:
        toks, flags = [], []
    else:
        toks = [inp[0]] + tgt[:n]
        flags = [False] + [x > 0 for x in msk[:n]]

    parts: list[str] = []
    run: list[int] = []
    run_flag = None

    def flush():
        if run:
            text = _decode(tokenizer, run)
            parts.append(text if run_flag else f"⟦{text}⟧")

    for t, f in zip(toks, flags):
        if f != run_flag:
            flush()
            run, run_flag = [], f
        run.append(t)
    flush()
    body = "".join(parts)
    if len(body) > max_chars:
        body = body[:max_chars] + f" … ({len(body) - max_chars} more characters)"
    trained = sum(1 for f in flags if f)
    head = f"{trained} of {n} target tokens trained"
    if pad:
        head += f", {pad} padding positions (never trained)"
    return f"{head}\n{body}\n{LEGEND}"


def _decode(tokenizer, ids: list[int]) -> str:
    out, cur = [], []
    for t in ids:
        if t == END_TOKEN:
            if cur:
                out.append(tokenizer.decode(cur))
                cur = []
            out.append("<end>")
        else:
            cur.append(t)
    if cur:
        out.append(tokenizer.decode(cur))
    return "".join(out)
