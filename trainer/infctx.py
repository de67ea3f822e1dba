"""infctx: training on sequences longer than memory allows, with the exact gradient.

Each sequence of T tokens is fed to the model in chunks of ``chunk_len`` tokens (the last chunk may be
shorter). The recurrent state after a chunk (per layer: attention token shift, WKV state, FFN token
shift; all fp32) is the state the next chunk starts from, exactly as ``RWKV.forward_with_state`` carries
it. Every chunk runs under ``torch.utils.checkpoint`` (non-reentrant): its forward pass keeps nothing
but the state it was given, and its activations are recomputed, one chunk at a time, in the backward
pass. The state is an ordinary tensor passed from one checkpointed chunk to the next, so **the gradient
flows across chunk boundaries**: loss and every gradient equal those of training on the whole sequence
at once (tests/test_infctx.py checks it for every RWKV version and method). Tools before us cut the
gradient at each boundary (``state.detach()``), which trains something else.

    loss = infctx_loss(model, input_ids, targets, mask, chunk_len=512)   # [B,T] each
    loss.backward()                                                     # an ordinary backward

Memory: during the forward pass only the boundary states live (per chunk and layer 2·B·C + B·H·N·N
floats, about N/40 tokens' worth of activations); during the backward pass additionally one chunk's
activations, its logits [B, chunk_len, V] included (the cross-entropy of a chunk is computed inside its
checkpoint, so no logits are kept across chunks). Peak memory is therefore set by ``chunk_len``, and
grows with T only by the boundary states. Compute: one extra forward pass (each chunk runs twice).

Block checkpointing inside (``model.grad_cp``, GRAD_CP=1) still helps here: without it the recompute
of a chunk holds the activations of all layers of that chunk; with it only each layer's input and one
layer's activations at a time, at the price of a third forward pass. It is kept as the user set it
(``block_cp=None``); pass ``block_cp`` to force it. Both are exact (nested non-reentrant checkpoints).

Ctx warm-up (seed 004, ``INITIAL_CTX_LEN`` / ``CTX_WARMUP_STEPS``): ``ctx_len_at`` gives the training
length at an optimizer step, growing linearly from INITIAL_CTX_LEN to CTX_LEN and rounded down to whole
chunks; ``cut_batch`` cuts a collated batch to it (the first L positions).

Refusals: ``check_infctx(cfg)`` raises UserError for every setting combination that cannot work.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .head_loss import head_ce_sum

__all__ = ["infctx_loss", "InfctxLoss", "chunk_bounds", "ctx_len_at", "cut_batch", "check_infctx",
           "infctx_problems"]


# --------------------------------------------------------------------------------------- the loss
def chunk_bounds(T: int, chunk_len: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering 0..T in pieces of ``chunk_len``; the last one may be shorter."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be at least 1, got {chunk_len}")
    return [(s, min(s + chunk_len, T)) for s in range(0, T, chunk_len)]


def _own(t: Tensor) -> Tensor:
    """``t`` in its own storage. The model's token-shift states are ``x[:, -1].float()``, which in fp32 is
    a view of the chunk's whole [B, chunk, C] activation: carried as is, it would keep that activation
    alive until the backward pass, for every chunk. A [B, C] copy is cheap."""
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.clone()


def _flat(state) -> tuple[Tensor, ...]:
    return tuple(_own(t) for layer in state for t in layer)


def _unflat(flat: tuple[Tensor, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _last_needed(mask: Tensor) -> int:
    """1 + the last position where any row's mask is non-zero (0 if none): the model is causal, so
    positions after it change neither the loss nor any gradient."""
    cols = (mask != 0).any(dim=0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 0


def infctx_loss(model: nn.Module, input_ids: Tensor, targets: Tensor, mask: Tensor, chunk_len: int,
                autocast_ctx: Any = None, block_cp: bool | None = None, trim: bool = True) -> Tensor:
    """The masked mean cross-entropy of ``loop.masked_loss`` over whole sequences, computed chunk by chunk.

    ``model``: an ``RWKV`` (anything with ``hidden_with_state(idx, state) -> (hidden, state)``, a ``head``
    and ``grad_cp`` and ``l2wrap`` attributes; not a Fabric/DDP wrapper: use ``InfctxLoss`` for that).
    ``input_ids``, ``targets`` [B, T] long, ``mask`` [B, T] (1 = the target counts). ``chunk_len`` >= 1, any T.

    Returns a scalar fp32 tensor; call ``.backward()`` on it (or ``fabric.backward``) as usual. The
    backward pass recomputes each chunk (last to first) and carries the state's gradient back across
    chunk boundaries. The result and its gradients equal ``masked_loss(model(input_ids), targets, mask)``
    up to floating-point summation order: sum over chunks of masked CE sums / total mask count. With
    ``model.l2wrap`` (L2WRAP=1) each chunk adds L2Wrap's gradient, which the whole sequence's count divides
    as it divides the loss: the same gradient as the whole sequence's.

    ``autocast_ctx``: a context manager (e.g. ``torch.autocast(...)``, ``prep.plan.autocast()``) the
    forward pass runs in; the recompute runs under the same autocast state (checkpoint restores it).
    ``block_cp``: None keeps ``model.grad_cp``; True/False forces block checkpointing inside the chunks.
    ``trim``: skip the trailing positions after the last non-zero mask entry of the batch (padding):
    they affect neither the loss nor the gradients.
    Without gradients (``torch.no_grad``) it runs the chunks plainly, carrying the state.
    """
    if input_ids.dim() != 2 or targets.shape != input_ids.shape or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids, targets and mask must all be [B, T]; got {tuple(input_ids.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(mask.shape)}")
    T = input_ids.shape[1]
    count = mask.float().sum().clamp(min=1.0)          # as masked_loss: the whole sequence's mask count
    end = T
    if trim:
        end = _last_needed(mask)
        if end == 0:                                   # nothing to learn here: loss 0, gradients 0
            end = min(T, chunk_len)                    # (one chunk keeps the graph connected)
    bounds = chunk_bounds(end, chunk_len)
    cp_blocks = bool(model.grad_cp) if block_cp is None else bool(block_cp)
    grad = torch.is_grad_enabled()

    def run_chunk(ids: Tensor, tgt: Tensor, msk: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        # model.grad_cp is set here, inside the checkpointed function, so that the recompute in the
        # backward pass takes exactly the path the forward pass took.
        saved = model.grad_cp
        model.grad_cp = cp_blocks
        try:
            hidden, new_state = model.hidden_with_state(ids, _unflat(flat_state) if flat_state else None)
            return (head_ce_sum(hidden, model.head.weight, tgt, msk, model.l2wrap), *_flat(new_state))
        finally:
            model.grad_cp = saved

    ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    total = None
    flat_state: tuple[Tensor, ...] = ()    # () = the model's own initial state (zero, or time_state)
    with ctx:
        for s, e in bounds:
            args = (input_ids[:, s:e], targets[:, s:e], mask[:, s:e], *flat_state)
            if grad:
                out = checkpoint(run_chunk, *args, use_reentrant=False)
            else:
                out = run_chunk(*args)
            ce_sum, flat_state = out[0], tuple(out[1:])
            total = ce_sum if total is None else total + ce_sum
    return total / count


class InfctxLoss(nn.Module):
    """``infctx_loss`` as a module, for strategies that must see one ``forward`` per backward (DDP,
    DeepSpeed, Fabric's autocast): wrap this instead of the model, e.g.
    ``fabric.setup(InfctxLoss(model, cfg.CHUNK_CTX), optimizer)``, then ``loss = wrapped(x, y, m)``.
    Its parameters are the model's (as ``model.*``); save from the inner model as usual."""

    def __init__(self, model: nn.Module, chunk_len: int, block_cp: bool | None = None):
        super().__init__()
        self.model = model
        self.chunk_len = int(chunk_len)
        self.block_cp = block_cp

    def forward(self, input_ids: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return infctx_loss(self.model, input_ids, targets, mask, self.chunk_len, block_cp=self.block_cp)


# --------------------------------------------------------------------------------------- warm-up
def ctx_len_at(step: int, initial_ctx_len: int, ctx_len: int, warmup_steps: int, multiple: int = 16) -> int:
    """The training length at optimizer step ``step`` (0-based) of a ctx warm-up.

    Grows linearly from ``initial_ctx_len`` at step 0 to ``ctx_len`` at step ``warmup_steps`` and stays
    there; rounded down to a multiple of ``multiple`` (pass CHUNK_CTX for infctx: whole chunks, so every
    chunk has the same shape and GPU kernels see one length), never below one ``multiple`` and never
    above ``ctx_len``. Off (always ``ctx_len``) when ``initial_ctx_len`` <= 0 or ``warmup_steps`` <= 0.
    A pure function of the step: resuming gives the same lengths.
    """
    if initial_ctx_len <= 0 or warmup_steps <= 0 or initial_ctx_len >= ctx_len or step >= warmup_steps:
        return ctx_len
    multiple = max(1, int(multiple))
    length = initial_ctx_len + (ctx_len - initial_ctx_len) * max(step, 0) / warmup_steps
    length = (int(math.floor(length)) // multiple) * multiple
    return min(ctx_len, max(multiple, length))


def cut_batch(batch: Mapping[str, Tensor], length: int) -> dict[str, Tensor]:
    """The batch cut to its first ``length`` positions (every [B, T] tensor; others unchanged).

    ``get``: a shorter window from the same random start; ``pad``: items keep their start, less padding
    or a shorter cut; ``only``: the item's first ``length`` tokens (shorter items stay whole)."""
    out = {}
    for k, v in batch.items():
        out[k] = v[:, :length] if isinstance(v, Tensor) and v.dim() == 2 else v
    return out


# --------------------------------------------------------------------------------------- refusals
def infctx_problems(cfg: Any) -> list[tuple[str, str]]:
    """Every (message, fix) that makes the infctx / ctx warm-up settings of ``cfg`` unworkable.

    ``cfg`` is a TrainConfig (or anything with its attribute names). Empty list = fine.
    Allowed with infctx (checked, nothing to refuse): every FINETUNE_MODE (state tuning included: the
    first chunk starts from time_state and its gradient is exact), every RWKV version, every OP (fla and
    rwkv-fla take any T and pass the final state's gradient back; very short last chunks only make fla
    warn), GRAD_CP 0 or 1, LORA_DROPOUT (the recompute restores the random state, so each chunk sees the
    same masks twice), QUANT, every DATALOAD (``only`` gives each step its own length: its last chunk is
    shorter), CHUNK_CTX not dividing CTX_LEN (the last chunk is shorter).
    """
    problems: list[tuple[str, str]] = []
    infctx = getattr(cfg, "TRAIN_TYPE", "normal") == "infctx"
    ctx_len, chunk = int(cfg.CTX_LEN), int(getattr(cfg, "CHUNK_CTX", 0) or 0)
    init, warm = int(getattr(cfg, "INITIAL_CTX_LEN", 0) or 0), int(getattr(cfg, "CTX_WARMUP_STEPS", 0) or 0)
    if infctx:
        if chunk < 1:
            problems.append((f"CHUNK_CTX={chunk} must be more than 0.",
                             "set CHUNK_CTX to the tokens per chunk, e.g. CHUNK_CTX=512"))
        elif chunk > ctx_len:
            problems.append((f"CHUNK_CTX={chunk} is larger than CTX_LEN={ctx_len}.",
                             "CHUNK_CTX must be at most CTX_LEN (e.g. CTX_LEN=4096 CHUNK_CTX=512)"))
        strategy = str(getattr(cfg, "STRATEGY", "auto"))
        if strategy.startswith("deepspeed_stage_3"):
            problems.append((f"TRAIN_TYPE=infctx does not work with STRATEGY={strategy}: ZeRO stage 3 gathers "
                             "and frees the weights around each layer's forward pass, and infctx re-runs "
                             "every chunk's forward pass inside the backward pass.",
                             "use STRATEGY=deepspeed_stage_1 or deepspeed_stage_2 (or auto) with infctx"))
    if init > 0 or warm > 0:
        if init > 0 and warm == 0:
            problems.append((f"INITIAL_CTX_LEN={init} is set but CTX_WARMUP_STEPS=0, so the length would "
                             "never grow.", f"set CTX_WARMUP_STEPS (e.g. 200) to grow from {init} to "
                             f"CTX_LEN={ctx_len}, or INITIAL_CTX_LEN=0 for no warm-up"))
        elif warm > 0 and init == 0:
            problems.append((f"CTX_WARMUP_STEPS={warm} is set but INITIAL_CTX_LEN=0 (no starting length).",
                             "set INITIAL_CTX_LEN to the starting length (e.g. CTX_LEN / 4), "
                             "or CTX_WARMUP_STEPS=0 for no warm-up"))
        elif init > ctx_len:
            problems.append((f"INITIAL_CTX_LEN={init} is larger than CTX_LEN={ctx_len}: the warm-up grows "
                             "the length up to CTX_LEN.", f"set INITIAL_CTX_LEN below {ctx_len}, "
                             "or INITIAL_CTX_LEN=0 CTX_WARMUP_STEPS=0 for no warm-up"))
    return problems


def check_infctx(cfg: Any) -> None:
    """Raise UserError for the first problem ``infctx_problems`` finds; nothing if the settings work."""
    problems = infctx_problems(cfg)
    if problems:
        raise UserError(*problems[0])
