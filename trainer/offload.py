"""OFFLOAD_BLOCKS: some blocks' frozen weights live in CPU memory and are copied to the GPU when the block
runs, so that a model larger than the GPU's memory can still be fine-tuned (LoRA, PiSSA, DiSHA, state).

The streamed blocks take turns in two GPU slots (the even- and odd-numbered of them alternate), so the GPU
holds two blocks' frozen weights instead of N, saving (N - 2) blocks. Each parameter of a streamed block is
permanently a view of its slot's tensor (a fixed address: compiled blocks and their guards see the same
tensors every step); what changes is which block's weights the slot holds.

When a slot is loaded:
- forward pass: right after streamed block j has run, the streamed block two places later is copied into
  j's slot, on a second CUDA stream, while the blocks in between compute;
- backward pass: a hook on each block's output gradient (it fires just before that block's backward, and
  just after the block above it has finished its own) makes sure the block's weights are in its slot, and
  copies the streamed block two places lower into the slot the finished block frees. After the lowest
  two, the slots hold the first two streamed blocks: what the next step starts with.
Correctness never rests on that schedule: ``ensure`` before every use (each block's forward, recompute and
backward) reloads a slot that holds another block, and waits for the copy. Copies wait for the slot's last
use (events on the compute stream: after each forward, after each backward, and everything queued before a
forward pass starts), so a copy never overwrites weights a queued kernel still reads.

Checkpointed blocks recompute their forward inside their backward, after the hook: GRAD_CP=0 (every
activation kept, the weights read again in the backward) is refused with offloading, where it would save
little anyway. Not with QUANT (quantised weights), full fine-tuning (the weights are trained), DeepSpeed, or
several GPUs (not tried yet).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from .tables import is_table, to_device

STREAM_MIN_NUMEL = 65536        # a block's frozen tensors at least this big are streamed (the matrices);
                                # the norms, mixing vectors and adapters stay on the GPU


def streamable(block: nn.Module) -> dict[str, nn.Parameter]:
    """The frozen tensors of a block that streaming moves to CPU memory: {name: parameter}. Not an RWKV-7a
    DeepEmbed table: only its tokens' rows are read (before the block runs), and it stays in CPU memory anyway."""
    return {n: p for n, p in block.named_parameters()
            if not p.requires_grad and p.numel() >= STREAM_MIN_NUMEL and not is_table(n)}


def choose_blocks(n_layer: int, count: int) -> list[int]:
    """Which ``count`` blocks to stream: spread evenly over blocks 1 .. n_layer - 1 (block 0's input needs
    no gradient, so its backward has no hook), so that each copy has several blocks' compute to hide
    behind."""
    count = max(0, min(int(count), n_layer - 1))
    if count == 0:
        return []
    step = (n_layer - 1) / count
    return sorted({1 + int(j * step) for j in range(count)})


class BlockOffload:
    """Streams the frozen weights of ``blocks`` (indices into ``model.blocks``) between CPU memory and two GPU
    slots. Build it when the weights of those blocks are still in CPU memory (or anywhere: they are copied);
    afterwards ``model.offload`` is this object and ``RWKV.hidden_with_state`` calls ``before`` / ``after``.
    On a CPU device the same bookkeeping runs with plain copies (tests)."""

    def __init__(self, model: nn.Module, blocks: list[int], device: torch.device, dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.order = sorted(blocks)
        self.rank = {b: j for j, b in enumerate(self.order)}
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        first = streamable(model.blocks[self.order[0]])
        self.names = list(first)
        self.host: dict[int, dict[str, Tensor]] = {}
        self.slots: list[dict[str, Tensor]] = [
            {n: torch.empty(p.shape, dtype=dtype or p.dtype, device=self.device) for n, p in first.items()}
            for _ in range(min(2, len(self.order)))]
        self.pinned = cuda
        for b in self.order:
            params = streamable(model.blocks[b])
            if list(params) != self.names or any(params[n].shape != first[n].shape for n in self.names):
                raise ValueError(f"block {b}'s frozen tensors differ from block {self.order[0]}'s: cannot share "
                                 "a slot")
            host = {}
            for n, p in params.items():
                t = p.data.detach().to("cpu", dtype=dtype or p.dtype)
                if cuda and self.pinned:
                    try:
                        t = t.pin_memory()
                    except RuntimeError:       # no page-locked memory to be had (some WSL2 set-ups): slower
                        self.pinned = False
                host[n] = t
                p.data = self.slots[self._slot(b)][n]       # from now on: a view of the slot, never moved
            self.host[b] = host
        self.loads = 0                                       # copies made (tests, benchmarks)
        self.holds: list[int | None] = [None] * len(self.slots)
        self.loaded: list[Any] = [None] * len(self.slots)   # the copy's event, per slot
        self.free: list[Any] = [None] * len(self.slots)     # the slot's last use on the compute stream
        for b in self.order[:len(self.slots)]:
            self._load(b)
        self.bytes_per_block = sum(t.numel() * t.element_size() for t in self.host[self.order[0]].values())

    # ------------------------------------------------------------------ slots
    def _slot(self, b: int) -> int:
        return self.rank[b] % 2

    def _load(self, b: int) -> None:
        s = self._slot(b)
        if self.copy_stream is None:
            for n in self.names:
                self.slots[s][n].copy_(self.host[b][n])
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.free[s] is not None:
                    self.copy_stream.wait_event(self.free[s])
                for n in self.names:
                    self.slots[s][n].copy_(self.host[b][n], non_blocking=self.pinned)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self.loaded[s] = ev
        self.holds[s] = b
        self.loads += 1

    def ensure(self, b: int) -> None:
        """Block b's weights are in its slot for whatever the current stream runs next."""
        if b not in self.rank:
            return
        self._prefetch(b)
        s = self._slot(b)
        if self.loaded[s] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[s])

    def _used(self, b: int) -> None:
        """What the current stream has queued so far is the last use of b's slot until it is loaded again."""
        s = self._slot(b)
        if self.copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.free[s] = ev

    def _prefetch(self, b: int) -> None:
        """Block b's weights are in its slot, or on their way there on the copy stream."""
        if self.holds[self._slot(b)] != b:
            self._load(b)

    # ------------------------------------------------------------------ the model's calls
    def start(self) -> None:
        """A forward pass begins: whatever the current stream has queued (the last backward pass included,
        even a block's whose use no hook recorded) comes before any copy this pass makes."""
        if self.copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.free = [ev] * len(self.slots)

    def before(self, i: int) -> None:
        """Before block i's forward (training, recompute of a whole chunk, or inference)."""
        self.ensure(i)

    def after(self, i: int, x_out: Tensor) -> None:
        """After block i's forward: its slot goes to the streamed block two places later; and, where the
        output takes part in a backward pass, the hook that runs before block i's backward."""
        if i in self.rank:
            self._used(i)
            j = self.rank[i] + len(self.slots)
            if j < len(self.order):
                self._prefetch(self.order[j])
        if x_out.requires_grad:
            x_out.register_hook(self._backward_hook(i))

    def _backward_hook(self, i: int):
        def hook(grad: Tensor) -> None:
            above = i + 1                      # its backward has just been queued
            if above in self.rank:
                self._used(above)
                j = self.rank[above] - len(self.slots)
                if j >= 0:                     # the next to need that slot: two places lower (after the
                    self._prefetch(self.order[j])   # lowest two, the slots hold what the next step starts with)
            self.ensure(i)
            return None
        return hook


def setup(model: nn.Module, blocks: list[int], device: torch.device,
          dtype: torch.dtype | None = None) -> BlockOffload | None:
    """Stream ``blocks`` of ``model`` (choose_blocks), their frozen matrices in ``dtype`` (default: as they
    are). The rest of those blocks (norms, adapters, buffers: wherever the loader and the method left them)
    goes to ``device``, floating tensors in ``dtype`` as the loader gives every other block's (the trainer
    makes the trained ones fp32 afterwards). None for no blocks."""
    model.offload = None
    if not blocks:
        return None
    off = BlockOffload(model, blocks, device, dtype)
    for b in off.order:
        to_device(model.blocks[b], off.device)   # the slots' views are there already: left as they are (and
                                                 # a held DeepEmbed table in CPU memory)
        if dtype is not None:
            for t in itertools.chain(model.blocks[b].parameters(), model.blocks[b].buffers()):
                if t.is_floating_point() and t.dtype != dtype:
                    t.data = t.data.to(dtype)
    model.offload = off
    return off


def why_not(cfg: Any) -> str | None:
    """Why these settings (a TrainConfig) cannot stream blocks (None: they can). Trained weights (full
    fine-tuning), quantised ones, DeepSpeed's own placement, several GPUs (not tried yet) and GRAD_CP=0's kept
    activations are not supported; a CPU run has nowhere to stream from."""
    if cfg.FINETUNE_MODE == "full":
        return "FINETUNE_MODE=full trains the weights themselves"
    if cfg.QUANT != "none":
        return f"QUANT={cfg.QUANT} already stores the frozen weights quantised on the GPU"
    if cfg.STRATEGY.startswith("deepspeed"):
        return f"STRATEGY={cfg.STRATEGY} places the weights itself (its _offload strategies move them)"
    world = cfg.GPU_COUNT * cfg.NODES
    if world > 1:
        return f"{world} GPUs: streaming has been tested on one GPU only (each process would stream its own copy)"
    if str(cfg.GRAD_CP) in ("0", "False"):
        return "GRAD_CP=0 keeps every block's activations, which cost far more than the weights"
    if cfg.ACCELERATOR == "cpu":
        return "ACCELERATOR=cpu: the weights are in CPU memory already"
    return None


def check_offload(cfg: Any) -> None:
    """Config rule: OFFLOAD_BLOCKS is auto or a whole number >= 0, and a number above 0 only where it works."""
    from .errors import UserError
    v = str(cfg.OFFLOAD_BLOCKS).strip().lower()
    if v != "auto" and not v.isdigit():
        raise UserError(f"OFFLOAD_BLOCKS={cfg.OFFLOAD_BLOCKS!r} is neither auto nor a whole number.",
                        "set OFFLOAD_BLOCKS=auto (only when the model would not fit), 0 (never) or a number of blocks")
    cfg.OFFLOAD_BLOCKS = v if v == "auto" else str(int(v))
    if v != "auto" and int(v) > 0:
        reason = why_not(cfg)
        if reason:
            raise UserError(f"OFFLOAD_BLOCKS={v} cannot work with these settings: {reason}.",
                            "set OFFLOAD_BLOCKS=0 (or auto)")
