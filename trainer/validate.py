"""The validation set (VALID_DATA or VALID_FRACTION): which items train and which validate, the validation loss,
the best loss so far and early stopping (EARLY_STOP).

    train_data, valid_data = split_data(cfg)     # BinIdx or data.split.ItemView; valid_data None without a set
    check = Validation(valid_data, cfg, batch, fixed_len, rank, world)     # in the loop's set-up
    loss, tokens = check.loss(module, device, all_reduce)                  # every process together

What the validation loss is: every validation item from its start, cut to its first CTX_LEN + 1 tokens (as
DATALOAD=pad and only cut training items), its targets counted as LOSS_MASK counts them in training; the mean
cross-entropy over all counted targets of all items (every token weighs the same, whatever its item). It runs
the training forward (the same op, precision, chunks for infctx) without gradients, dropout off, and leaves the
training's random stream as it was. ``python -m tools.evaluate --adapter output/rwkv-N.pth`` reports the same
number for the saved checkpoint: it reads CTX_LEN and LOSS_MASK from the checkpoint (tests/test_validate.py).

VALID_FRACTION holds that share of the items out of DATA before the trainer's passes and shuffles
(data/split.py: items with the same tokens go to the same side, so a file tokenized with REPEAT > 1 never trains
on a copy of a validation item); the choice follows SEED.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UserError

BEST = "rwkv-best.pth"


# --------------------------------------------------------------------------- which items
@functools.lru_cache(maxsize=4)
def _held_out(prefix: str, stamp: tuple, fraction: float, seed: int, off: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(training item indices, validation item indices) of the binidx at ``prefix`` (``stamp``: its size and
    time, so that a file tokenized again is split again)."""
    from .data.binidx import BinIdx
    from .data.split import content_keys, held_out
    return held_out(content_keys(BinIdx(prefix)), fraction, seed, name="VALID_FRACTION", off=off)


def held_out_views(prefix, fraction: float, seed: int, off: str | None = "set VALID_FRACTION=0") -> tuple:
    """(training items, validation items) that VALID_FRACTION=``fraction`` with SEED=``seed`` makes of the binidx at
    ``prefix``, as data.split.ItemView each: the trainer's split, and tools.evaluate --held-out's. ``off``: how a
    refusal says to switch it off (None: data.split's wording)."""
    from .data.binidx import BinIdx, paths
    from .data.split import ItemView
    stamp = tuple((s.st_size, s.st_mtime_ns) for s in (p.stat() for p in paths(prefix)))
    train, valid = _held_out(str(prefix), stamp, float(fraction), int(seed), off)
    data = BinIdx(prefix)
    return ItemView(data, train), ItemView(data, valid)


def split_data(cfg) -> tuple:
    """The training data and the validation data (None without VALID_DATA / VALID_FRACTION) of ``cfg``."""
    from .data.binidx import BinIdx
    if cfg.VALID_FRACTION > 0:
        return held_out_views(cfg.data_prefix, cfg.VALID_FRACTION, cfg.SEED)
    data = BinIdx(cfg.data_prefix)
    if cfg.VALID_DATA:
        return data, BinIdx(cfg.valid_prefix)
    return data, None


def check_settings(cfg) -> None:
    """VALID_DATA or VALID_FRACTION, and what needs one of them."""
    f = cfg.VALID_FRACTION
    if not (0 <= f < 1):
        raise UserError(f"VALID_FRACTION={f} must be at least 0 and less than 1.",
                        "hold out a small share, e.g. VALID_FRACTION=0.05, or 0 for no validation set")
    if f > 0 and cfg.VALID_DATA:
        raise UserError(f"VALID_DATA={cfg.VALID_DATA} and VALID_FRACTION={f} both give a validation set.",
                        "set one of them: VALID_DATA=\"\" to hold items out of DATA, or VALID_FRACTION=0")
    if cfg.VALID_DATA and cfg.VALID_DATA == cfg.DATA:
        raise UserError(f"VALID_DATA={cfg.VALID_DATA} is the training data: its loss says nothing about "
                        "items the model has not seen.", "use held-out data (make_tokenize.sh --valid 0.05 "
                        "writes NAME.valid), or VALID_FRACTION=0.05")
    if not cfg.has_validation:
        for name in ("VALID_EVERY", "EARLY_STOP"):
            if getattr(cfg, name):
                raise UserError(f"{name}={getattr(cfg, name)} needs a validation set, and there is none.",
                                "set VALID_DATA (e.g. NAME.valid from make_tokenize.sh --valid 0.05) or "
                                f"VALID_FRACTION=0.05, or {name}=0")


def check_valid_data(valid, name: str) -> None:
    """Refuses validation data with nothing to predict."""
    sizes = np.asarray(valid.sizes, dtype=np.int64)
    if sizes.size == 0 or int(sizes.max()) < 2:
        raise UserError(f"the validation data {name} holds {sizes.size} items, none with 2 tokens or more: there is "
                        "nothing to validate on.", "give VALID_DATA items with text (make_tokenize.sh --valid "
                        "writes them), or use VALID_FRACTION")


def describe(cfg, valid) -> str:
    """One line: what is validated, and when."""
    sizes = np.minimum(np.asarray(valid.sizes, dtype=np.int64), cfg.CTX_LEN + 1)
    where = cfg.VALID_DATA or f"{cfg.DATA} (VALID_FRACTION={cfg.VALID_FRACTION}, never trained on)"
    return (f"validation: {len(sizes)} items of {where}, {int(np.maximum(sizes - 1, 0).sum()):,} targets at "
            f"CTX_LEN {cfg.CTX_LEN}, " + (f"every {cfg.VALID_EVERY} optimizer steps and after the last"
                                           if cfg.VALID_EVERY else "at every save")
            + (f"; EARLY_STOP after {cfg.EARLY_STOP} without a better loss" if cfg.EARLY_STOP else ""))


# --------------------------------------------------------------------------- the items as samples
def _in_order(data, ctx_len: int, loss_mask: str, pad: bool = True):
    """A dataset whose sample j is item j of ``data`` from its start, cut to ctx_len + 1 tokens (``pad``: padded to
    ctx_len), with the training's loss mask (data/dataset.py's DATALOAD=pad and only samples)."""
    from .data.dataset import ItemDataset

    class InOrder(ItemDataset):
        def item_index(self, epoch: int, j: int) -> int:
            return j

    return InOrder(data, ctx_len, 1, max(len(data), 1), 0, loss_mask, pad=pad)


def masked_items(data, ctx_len: int, loss_mask: str, items: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of each item in order (the first ``items``): its first ctx_len + 1 tokens, and per target
    (tokens[1:]) whether the loss counts it under ``loss_mask``: what the validation loss counts (tools.evaluate
    --adapter uses it)."""
    ds = _in_order(data, ctx_len, loss_mask, pad=False)
    for j in range(len(data) if items is None else min(items, len(data))):
        ids = np.asarray(data[j][:ctx_len + 1], dtype=np.int64)
        yield ids, ds.sample(0, j)["mask"].numpy()[:max(len(ids) - 1, 0)]


class Validation:
    """The validation pass: this process's share of the items in batches of ``batch``; ``fixed_len``: every batch
    [batch, ctx_len] (compiled blocks see one shape), else cut to its longest item."""

    def __init__(self, data, ctx_len: int, loss_mask: str, batch: int, fixed_len: bool, rank: int = 0,
                 world: int = 1):
        self.data, self.ctx_len, self.batch, self.fixed_len = data, int(ctx_len), int(batch), fixed_len
        self.rank, self.world = rank, world
        self.items = _in_order(data, ctx_len, loss_mask)
        sizes = np.asarray(data.sizes, dtype=np.int64)
        # longest first (less padding per batch when cut to the longest); a stable order either way
        self.order = np.arange(len(sizes)) if fixed_len else np.argsort(-np.minimum(sizes, ctx_len + 1),
                                                                         kind="stable")
        self.sizes = sizes

    @property
    def batches_per_process(self) -> int:
        """Every process runs as many batches (DeepSpeed stage 3 gathers weights in each forward, all together)."""
        return math.ceil(len(self.order) / (self.batch * self.world))

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from .data.dataset import collate
        n, B = len(self.order), self.batch
        for b in range(self.batches_per_process):
            first = (b * self.world + self.rank) * B
            idx = [int(self.order[k]) for k in range(first, min(first + B, n))]
            samples = [self.items.sample(0, i) for i in idx]
            if self.fixed_len or not samples:       # blank rows (mask 0) keep the batch's shape
                blank = {k: torch.zeros(self.ctx_len, dtype=torch.float32 if k == "mask" else torch.int64)
                         for k in ("input_ids", "targets", "mask")}
                samples += [blank] * (B - len(samples))
            t = collate(samples)
            if not self.fixed_len:
                longest = max([int(min(self.sizes[i], self.ctx_len + 1)) - 1 for i in idx] + [1])
                t = {k: v[:, :longest] for k, v in t.items()}
            yield t["input_ids"], t["targets"], t["mask"]

    @torch.no_grad()
    def loss(self, module: torch.nn.Module, device, all_reduce: Callable | None = None) -> tuple[float, int]:
        """(mean loss over every counted target of every validation item, targets counted): ``module`` is what
        training runs forward (the model, or infctx's chunked loss around it), called as in training."""
        was = module.training
        rng = torch.get_rng_state()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        module.eval()
        try:
            for x, y, m in self.batches():
                x, y, m = x.to(device), y.to(device), m.to(device)
                count = m.sum(dtype=torch.float64)
                total += torch.stack([module(x, targets=y, mask=m).double() * count, count])
        finally:
            module.train(was)
            torch.set_rng_state(rng)
        if all_reduce is not None:
            total = all_reduce(total)
        s, c = (float(v) for v in total.cpu())
        return (s / c if c else float("nan")), int(round(c))


# --------------------------------------------------------------------------- the best so far
class EarlyStop(KeyboardInterrupt):
    """EARLY_STOP evaluations in a row without a better validation loss: the run stops and saves as on Ctrl+C."""


@dataclass
class Record:
    """The best validation loss so far, where it was, and how many evaluations since found none better (saved
    with the resume unit, so that RESUME=1 goes on counting)."""
    best: float = math.inf
    best_step: int = -1
    since: int = 0

    def add(self, loss: float, opt_step: int) -> bool:
        """Take a validation loss; True when it is the best so far."""
        if loss < self.best:
            self.best, self.best_step, self.since = loss, opt_step, 0
            return True
        self.since += 1
        return False

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since": self.since}

    @classmethod
    def restored(cls, saved) -> "Record":
        if not isinstance(saved, dict):
            return cls()
        try:
            return cls(float(saved["best"]), int(saved["best_step"]), int(saved["since"]))
        except (KeyError, TypeError, ValueError):
            return cls()


def due(cfg, opt_step: int, total_opt_steps: int, end_of_epoch: bool, epoch: int) -> bool:
    """Whether a validation follows optimizer step ``opt_step``: every VALID_EVERY steps and after the last one;
    VALID_EVERY=0: at every save (the end of every EPOCH_SAVE-th epoch, and of the last)."""
    if cfg.VALID_EVERY:
        return opt_step % cfg.VALID_EVERY == 0 or opt_step == total_opt_steps
    return end_of_epoch and ((epoch + 1) % cfg.EPOCH_SAVE == 0 or epoch + 1 == cfg.EPOCH_COUNT)
