"""The oracle: the plain per-token WKV recurrences in fp32, on any device.

Every fast op is tested against these, forward and backward. They are slow (a Python loop over T)
and kept deliberately literal so they can be read against the equations.

Layout shared by every op (see trainer/ops/__init__.py):
  r, k, v, logw, a, b: [B, T, H, N]; u: [H, N]; state: [B, H, N, N] fp32 as S[value, key].
  logw is the natural log of the per-channel decay (decay = exp(logw), logw <= 0).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _init_state(r: Tensor, state: Tensor | None) -> Tensor:
    B, _, H, N = r.shape
    if state is None:
        return r.new_zeros(B, H, N, N, dtype=torch.float32)
    return state.float()


def wkv7_reference(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7: S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T ;  y_t = S_t r_t."""
    dtype = r.dtype
    r, k, v, w, a, b = (x.float() for x in (r, k, v, logw.float().exp(), a, b))
    S = _init_state(r, state)
    ys = []
    for t in range(r.shape[1]):
        sa = torch.einsum("bhvk,bhk->bhv", S, a[:, t])                     # S a
        S = S * w[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] \
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", S, r[:, t]))
    return torch.stack(ys, 1).to(dtype), S


def wkv6_reference(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, u: Tensor,
                   state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-5/6: y_t = (S_{t-1} + v_t (u*k_t)^T) r_t ;  S_t = S_{t-1} diag(w_t) + v_t k_t^T."""
    dtype = r.dtype
    r, k, v, w = (x.float() for x in (r, k, v, logw.float().exp()))
    u = u.float()
    S = _init_state(r, state)
    ys = []
    for t in range(r.shape[1]):
        kv = v[:, t, :, :, None] * k[:, t, :, None, :]                      # [B,H,V,K]
        ys.append(torch.einsum("bhvk,bhk->bhv", S + kv * u[None, :, None, :], r[:, t]))
        S = S * w[:, t, :, None, :] + kv
    return torch.stack(ys, 1).to(dtype), S
