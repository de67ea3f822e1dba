"""The head and the cross-entropy in one, chunk by chunk: the [tokens, vocabulary] logits never exist whole.

    ce_sum = head_ce_sum(hidden, head_weight, targets, mask)    # sum over positions of CE * mask, fp32

Equal to ``(F.cross_entropy((hidden @ W.T).float(), targets, reduction="none") * mask).sum()`` with the
logits computed in the same dtype (bf16 under bf16 autocast), and to its gradients. Why: at CTX_LEN 1024
with the 65536-word vocabulary the whole logits are 256 MiB in fp32 plus their bf16 copy and gradient (about
0.75 GiB at the start of the backward pass), and at 4096 × 8 tokens 24 GiB; chunked, 256 tokens of them at
a time (about 0.13 GiB at V = 65536, whatever the batch). A chunk of 256 tokens is still a large product
([256, C] × [C, V]); at 1024 tokens a chunk was the largest thing alive in a small LoRA step (0.5 GiB).

How: the forward pass computes each chunk's logits, its loss and, at once, its gradients (softmax − one-hot,
times the mask), so that nothing of the chunk is kept: the input's gradient [tokens, C] and, when the head
trains, the weight's [V, C] (fp32) are what the backward pass returns, scaled by the incoming gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 64 * 2 ** 20           # fp32 logits of one chunk


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: fp32 logits of at most CHUNK_BYTES (256 tokens at V = 65536)."""
    return max(16, CHUNK_BYTES // (4 * vocab))


class _HeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, dtype: torch.dtype):
        n_tok = hidden.shape[0]
        step = chunk_tokens(weight.shape[0])
        w = weight.to(dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_x else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n_tok, step):
            h = hidden[s:s + step].to(dtype)
            t = targets[s:s + step]
            m = mask[s:s + step]
            logits = (h @ w.T).float()                                  # [n, V]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * m).sum()
            if need_x or need_w:
                g = logits.sub_(lse.unsqueeze(1)).exp_()                  # softmax, in place of the logits
                g.scatter_add_(1, t.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
                g.mul_(m.unsqueeze(1))
                g = g.to(dtype)
                if need_x:
                    dx[s:s + step] = g @ w
                if need_w:
                    dw.add_(g.T @ h)                                       # [V, C], summed in fp32
            logits = g = None        # this chunk's [n, V] goes before the next one is made, not after
        ctx.save_for_backward(*(x for x in (dx, dw) if x is not None))
        ctx.has = (need_x, need_w)
        ctx.x_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved = list(ctx.saved_tensors)
        need_x, need_w = ctx.has
        gx = (saved.pop(0) * grad).to(ctx.x_dtype) if need_x else None
        gw = saved.pop(0) * grad if need_w else None
        return gx, gw, None, None, None


def head_ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Sum over positions of the next-token cross-entropy times ``mask``, fp32. ``hidden`` [..., C] (after
    ln_out), ``weight`` [V, C] (the head), ``targets`` and ``mask`` [...]. Under autocast the products run in
    the autocast dtype, as the head would."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(dev, enabled=False):
        return _HeadCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                             mask.reshape(-1).float(), dtype)
