"""The head and the cross-entropy in one, chunk by chunk: the [tokens, vocabulary] logits never exist whole.

    ce_sum = head_ce_sum(hidden, head_weight, targets, mask)    # sum over positions of CE * mask, fp32

Equal to ``(F.cross_entropy((hidden @ W.T).float(), targets, reduction="none") * mask).sum()`` with the
logits computed in the same dtype (bf16 under bf16 autocast), and to its gradients. Why: at CTX_LEN 1024
with the 65536-word vocabulary the whole logits are 256 MiB in fp32 plus their bf16 copy and gradient (about
0.75 GiB at the start of the backward pass), and at 4096 × 8 tokens 24 GiB; chunked, 256 tokens of them at
a time (about 0.13 GiB at V = 65536, whatever the batch).

How: the forward pass computes each chunk's logits, its loss and, at once, its gradients (softmax − one-hot,
times the mask), so that nothing of the chunk is kept: the input's gradient [tokens, C] and, when the head
trains, the weight's [V, C] (fp32) are what the backward pass returns, scaled by the incoming gradient.

On a GPU one Triton kernel (``_ce_kernel``) does a chunk's cross-entropy: it reads the logits (in their
dtype) twice, for the logsumexp and for the gradient, which it writes over them; the plain PyTorch code
(``_ce_rows_reference``, which the CPU runs) makes about a dozen fp32 passes over a chunk. When the head
trains, the fp32 weight gradient [V, C] is read and written once per chunk, so its chunks are at least C
tokens long (at 256 tokens that traffic took more time than the head's products at 4096 × 8 tokens).

L2Wrap (``l2wrap=True``; L2WRAP=1, RWKV-LM's, which keeps the logits from drifting upwards): where a chunk's
gradient is formed, each row's largest logit gets an extra ``L2WRAP_FACTOR × that logit × the row's mask``
(the first largest, where several are equal); the loss value is unchanged. The rule, matching how the loss is
normalised: only the positions the loss counts get it (a masked-out row: nothing), and, since the callers
divide this sum by the mask's sum over the whole batch (model.forward; infctx over the whole sequence, not
per chunk), it reaches each counted position's top logit as 1e-4 / (counted positions of the batch) × the
logit: RWKV-LM's 1e-4 / (B·T), counted as our loss counts. Like the cross-entropy's own gradient it is scaled
by the incoming gradient (so gradient accumulation's 1 / MINI_BSZ and fp16's loss scale apply to it too).
Under bf16 the sum is rounded to bf16 with the rest of the logits' gradient.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

CHUNK_BYTES = 64 * 2 ** 20           # fp32 logits of one chunk
L2WRAP_FACTOR = 1e-4                 # L2Wrap: the extra gradient of a counted row's top logit, per unit of it


def chunk_tokens(vocab: int, width: int = 0) -> int:
    """Tokens per chunk: fp32 logits of at most CHUNK_BYTES (256 tokens at V = 65536); at least ``width``
    (the model's C, given when the head's weight trains)."""
    return max(16, CHUNK_BYTES // (4 * vocab), width)


@functools.lru_cache(maxsize=None)
def _ce_kernel():
    """The Triton kernel, defined on first use (a CPU install never imports Triton), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def ce_rows(logits, targets, mask, loss, V, stride, BLOCK: tl.constexpr, GRAD: tl.constexpr,
                L2: tl.constexpr):
        """One row: loss = (logsumexp(x) - x[target]) * mask; with GRAD, x := (softmax(x) - onehot) * mask, and
        with L2 > 0 (L2Wrap) also + L2 * max(x) * mask at the first largest x."""
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        t = tl.load(targets + row).to(tl.int64)
        m = tl.load(mask + row)
        cols = tl.arange(0, BLOCK)
        mx = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        top = tl.sum(tl.zeros([BLOCK], tl.int32), 0)     # L2: the column of the first largest x
        for off in range(0, V, BLOCK):                    # online logsumexp: running max and sum
            x = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
            bmx = tl.max(x, 0)
            if L2 > 0:
                top = tl.where(bmx > mx, off + tl.argmax(x, 0), top)
            new = tl.maximum(mx, bmx)
            total = total * tl.exp(mx - new) + tl.sum(tl.exp(x - new), 0)
            mx = new
        lse = mx + tl.log(total)
        tl.store(loss + row, (lse - tl.load(base + t).to(tl.float32)) * m)
        if GRAD:
            for off in range(0, V, BLOCK):
                c = off + cols
                x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - (c == t).to(tl.float32)
                if L2 > 0:
                    g += (c == top).to(tl.float32) * (mx * L2)
                tl.store(base + c, (g * m).to(logits.dtype.element_ty), mask=c < V)

    return ce_rows


def _ce_rows_reference(logits: Tensor, targets: Tensor, mask: Tensor, grad: bool, l2: float = 0.0) -> Tensor:
    """The plain PyTorch cross-entropy of a chunk: the loss of each row times the mask (fp32); with ``grad``
    the logits are overwritten with their gradient, (softmax - one-hot) * mask, in their dtype, plus with
    ``l2`` > 0 (L2Wrap) l2 * max * mask at each row's first largest logit."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets.unsqueeze(1)).squeeze(1)) * mask
    if grad:                                  # in place of x (which is the logits themselves in fp32)
        top = x.max(dim=1) if l2 > 0 else None                              # before x is overwritten
        g = x.sub_(lse.unsqueeze(1)).exp_()                                 # softmax
        g.scatter_add_(1, targets.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
        if top is not None:
            g.scatter_add_(1, top.indices.unsqueeze(1), (top.values * l2).unsqueeze(1))
        g.mul_(mask.unsqueeze(1))
        if g is not logits:
            logits.copy_(g)
    return loss


def _ce_rows_triton(logits: Tensor, targets: Tensor, mask: Tensor, grad: bool, block: int = 4096,
                    l2: float = 0.0) -> Tensor:
    """_ce_rows_reference by the Triton kernel (on a GPU; on the CPU in Triton's interpreter, for tests)."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _ce_kernel()[(n,)](logits, targets.contiguous(), mask.contiguous(), loss, V, logits.stride(0),
                           BLOCK=block, GRAD=grad, L2=float(l2) if grad else 0.0, num_warps=8)
    return loss


def _ce_rows(logits: Tensor, targets: Tensor, mask: Tensor, grad: bool, l2: float = 0.0) -> Tensor:
    """A chunk's cross-entropy: by the Triton kernel where the logits are on a GPU and Triton is there."""
    if logits.is_cuda and logits.stride(1) == 1 and _ce_kernel() is not None:
        return _ce_rows_triton(logits, targets, mask, grad, l2=l2)
    return _ce_rows_reference(logits, targets, mask, grad, l2)


_FP32_ADDMM: dict[torch.dtype, bool] = {}   # per input dtype: does aten::addmm.dtype_out take it (torch 2.8+)?


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, acc fp32, a and b in the compute dtype: on a GPU one cuBLAS call (the fp32 sum is
    read and written once: aten::addmm.dtype_out), else (or where this torch lacks that call for the
    dtype) the product, then the sum."""
    if acc.is_cuda and a.dtype != torch.float32 and _FP32_ADDMM.get(a.dtype, True):
        try:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            _FP32_ADDMM[a.dtype] = True
            return
        except (AttributeError, RuntimeError, NotImplementedError):
            if _FP32_ADDMM.get(a.dtype):          # it worked before: a real error, not a missing kernel
                raise
            _FP32_ADDMM[a.dtype] = False
    acc.add_(a @ b)


class _HeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, dtype: torch.dtype,
                l2: float):
        n_tok = hidden.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        step = chunk_tokens(weight.shape[0], weight.shape[1] if need_w else 0)
        w = weight.to(dtype)
        dx = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        losses = torch.empty(n_tok, dtype=torch.float32, device=hidden.device)
        for s in range(0, n_tok, step):
            h = hidden[s:s + step].to(dtype)
            logits = h @ w.T                                              # [n, V], the compute dtype
            losses[s:s + step] = _ce_rows(logits, targets[s:s + step], mask[s:s + step], need_x or need_w, l2)
            if need_x:                                                    # the logits now hold their gradient
                dx[s:s + step] = logits @ w
            if need_w:
                _add_product(dw, logits.T, h)                              # [V, C], summed in fp32
            logits = None            # this chunk's [n, V] goes before the next one is made, not after
        ctx.save_for_backward(*(x for x in (dx, dw) if x is not None))
        ctx.has = (need_x, need_w)
        ctx.x_dtype = hidden.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = list(ctx.saved_tensors)
        need_x, need_w = ctx.has
        gx = (saved.pop(0) * grad).to(ctx.x_dtype) if need_x else None
        gw = saved.pop(0) * grad if need_w else None
        return gx, gw, None, None, None, None


def head_ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, l2wrap: bool = False) -> Tensor:
    """Sum over positions of the next-token cross-entropy times ``mask``, fp32. ``hidden`` [..., C] (after
    ln_out), ``weight`` [V, C] (the head), ``targets`` and ``mask`` [...]. Under autocast the products run in
    the autocast dtype, as the head would. ``l2wrap``: L2Wrap's extra gradient (the module's comment); the
    caller divides the sum by the mask's sum over the whole batch."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                             mask.reshape(-1).float(), dtype, L2WRAP_FACTOR if l2wrap else 0.0)
