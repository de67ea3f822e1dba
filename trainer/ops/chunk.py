"""The WKV recurrences in chunks of matrix products: pure PyTorch, the CPU training op ("chunk").

Same maths as reference.py, regrouped: the sequence is cut into chunks of L tokens; inside a chunk
everything is a handful of batched matrix products, and only the state is passed from chunk to
chunk (one small product per chunk instead of one recurrence step per token). Autograd through
these plain ops gives the exact backward pass, gradients to the initial state included.

Notation inside a chunk (per head, tokens t = 1..L, everything fp32, S[value, key]):
  c_t = logw_1 + ... + logw_t   (cumulative log decay from the chunk start, per key channel)
  e_t = c_t - logw_t = c_{t-1}  (the same, exclusive)
  decay from token s to t: exp(c_t - c_s) for the state after t, exp(e_t - c_s) for the one before t.

RWKV-5/6, S_t = S_{t-1} diag(w_t) + v_t k_t^T, y_t = (S_{t-1} + v_t (u*k_t)^T) r_t:
  y_t = S_0 (r_t * exp(e_t)) + sum_{s<t} v_s [r_t . (k_s * exp(e_t - c_s))] + v_t (r_t . u*k_t)
  S_L = S_0 diag(exp(c_L)) + sum_s v_s (k_s * exp(c_L - c_s))^T

RWKV-7, S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t. With x_t = S_{t-1} a_t it is
the recurrence above with two rank-one inputs, S_t = S_{t-1} diag(w_t) + x_t b_t^T + v_t k_t^T, and
  x_t = S_0 (a_t * exp(e_t)) + sum_{s<t} x_s [a_t . b_s exp(e_t - c_s)] + v_s [a_t . k_s exp(e_t - c_s)]
is a unit lower-triangular system for the rows x_t (the WY / UT form): X = W S_0^T + X0 with
W = (I - A_ab)^-1 (a * exp(e)) and X0 = (I - A_ab)^-1 A_ak V. Then, per chunk,
  y = Q S_0^T + Y0,  Q = r*exp(c) + A_rb W,  Y0 = A_rb X0 + A_rk V
  S_L = S_0 M + dS,  M = diag(exp(c_L)) + W^T (b * exp(c_L - c)),  dS = X0^T (b*exp(c_L-c)) + V^T (k*exp(c_L-c))
and only "S <- S M + dS" runs chunk after chunk.

Numerical safety. A score exp(e_t - c_s) is computed as the product of exp(e_t - m) and exp(m - c_s)
with m the middle of the chunk's log-decay range, so each factor stays below exp(R/2) where R is the
chunk's total log decay: R <= 120 in fp32 (factors <= e^60, far from overflow at e^88; entries
above the diagonal may overflow and are discarded by tril, never multiplied). Per-step log decays
are floored at -15 (a decay below 3e-7 contributes less than fp32 rounding; the floor changes no
result beyond that). RWKV-7 (logw >= -0.61) always runs in fp32. When some chunk's decays multiply
below exp(-120) (RWKV-5/6 channels with decays around exp(-4) and below), the op runs in float64
instead, where R may reach 1000: besides the range, the fp32 gradient of logw loses precision to
cancellation at such decays (relative error ~1e-7 / decay, as in every chunked form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register

CHUNK = 32           # default (largest) chunk length; best measured on a 2-core CPU
LOGW_FLOOR = -15.0   # per-step log decay floor: exp(-15) = 3e-7, below fp32 resolution of a sum
MAX_RANGE = {torch.float32: 120.0,    # largest total log decay inside one chunk: exp(60) per factor
             torch.float64: 1000.0}   # (fp32 overflows at exp(88), float64 at exp(709))


def _chunk_len(logw: Tensor, T: int, chunk_size: int, max_range: float) -> int:
    """The largest chunk length (chunk_size, halved as needed) whose log-decay range stays <= max_range."""
    lw = logw.detach()
    L = max(1, min(chunk_size, T))
    while L > 1:
        pad = (-T) % L
        sums = F.pad(lw, (0, 0, 0, 0, 0, pad)).reshape(lw.shape[0], -1, L, *lw.shape[2:]).sum(2)
        if float(sums.min()) >= -max_range:
            return L
        L //= 2
    return 1


def _to_chunks(x: Tensor, L: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, N] -> [B, H, n_chunks, L, N], zero-padded at the end (a no-op step)."""
    B, T, H, N = x.shape
    x = x.to(dtype).transpose(1, 2)
    pad = (-T) % L
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, H, (T + pad) // L, L, N)


def _from_chunks(y: Tensor, T: int) -> Tensor:
    B, H, n, L, N = y.shape
    return y.reshape(B, H, n * L, N)[:, :, :T].transpose(1, 2)


def _prepare(r: Tensor, logw: Tensor, state: Tensor | None, chunk_size: int):
    B, T, H, N = r.shape
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    logw = logw.to(torch.float64).expand(B, T, H, N).clamp(min=LOGW_FLOOR)
    L = _chunk_len(logw, T, chunk_size, MAX_RANGE[dtype])
    if L < min(chunk_size, T):
        # Strong decays: a chunk's decays multiply below exp(-120). Run the op in float64, at full
        # chunk length (its exponent range is far wider). Not only for the range: the gradient of
        # logw is a sum of terms of the size of r*dr that cancel down to something proportional to
        # the decay, so in fp32 its relative error grows like 1e-7 / decay (1e-5 at exp(-5)).
        dtype = torch.float64
        L = _chunk_len(logw, T, chunk_size, MAX_RANGE[dtype])
    # Exponents in float64 in any case: c reaches -120, where fp32 would round it by ~1e-5
    # absolute, which exp() turns into a 1e-5 relative error. Each factor exp(...) is then rounded
    # once to the compute dtype.
    lw = _to_chunks(logw, L, torch.float64)             # padding: logw = 0, decay 1
    c = lw.cumsum(-2)                                   # inclusive
    e = c - lw                                          # exclusive
    cL = c[..., -1:, :]                                 # [B,H,n,1,N]
    m = 0.5 * cL                                        # middle of the range [cL, 0]
    S0 = r.new_zeros(B, H, N, N, dtype=dtype) if state is None else state.to(dtype)
    return L, dtype, c, e, cL, m, S0


def _exp(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.exp(x).to(dtype)


def wkv6_chunk(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, u: Tensor, state: Tensor | None = None,
               chunk_size: int = CHUNK) -> tuple[Tensor, Tensor]:
    """RWKV-5/6 in chunks; same contract as ``reference.wkv6_reference``."""
    B, T, H, N = r.shape
    L, dtype, c, e, cL, m, S = _prepare(r, logw, state, chunk_size)
    rc, kc, vc = (_to_chunks(x, L, dtype) for x in (r, k, v))
    uu = u.to(dtype).reshape(1, H, 1, 1, N)

    # scores inside a chunk: A[t, s] = r_t . k_s exp(e_t - c_s) for s < t, r_t . (u * k_t) on the diagonal
    A = ((rc * _exp(e - m, dtype)) @ (kc * _exp(m - c, dtype)).transpose(-1, -2)).tril(-1)
    A = A + torch.diag_embed((rc * uu * kc).sum(-1))
    Y0 = A @ vc                                         # [B,H,n,L,N(value)]
    Q = rc * _exp(e, dtype)  # what reads the chunk's start state
    gamma = _exp(cL, dtype).squeeze(-2)  # [B,H,n,N] decay over the whole chunk
    dS = vc.transpose(-1, -2) @ (kc * _exp(cL - c, dtype))  # [B,H,n,V,K]

    starts = []
    for i in range(c.shape[2]):
        starts.append(S)
        S = S * gamma[:, :, i, None, :] + dS[:, :, i]
    S0s = torch.stack(starts, 2)                        # state at the start of each chunk
    y = Q @ S0s.transpose(-1, -2) + Y0
    return _from_chunks(y, T).to(r.dtype), S.to(torch.float64 if r.dtype == torch.float64 else torch.float32)


def wkv7_chunk(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor,
               state: Tensor | None = None, chunk_size: int = CHUNK) -> tuple[Tensor, Tensor]:
    """RWKV-7 in chunks (WY form of the DPLR transition); same contract as ``reference.wkv7_reference``."""
    B, T, H, N = r.shape
    L, dtype, c, e, cL, m, S = _prepare(r, logw, state, chunk_size)
    rc, kc, vc, ac, bc = (_to_chunks(x, L, dtype) for x in (r, k, v, a, b))

    # all four score matrices from one product: rows [a exp(e-m); r exp(c-m)], columns [b; k] exp(m-c)
    left = torch.cat([ac * _exp(e - m, dtype), rc * _exp(c - m, dtype)], -2)       # [.., 2L, N]
    down = _exp(m - c, dtype)
    right = torch.cat([bc * down, kc * down], -2)                              # [.., 2L, N]
    P = left @ right.transpose(-1, -2)                                         # [.., 2L, 2L]
    A_ab, A_ak = P[..., :L, :L].tril(-1), P[..., :L, L:].tril(-1)
    A_rb, A_rk = P[..., L:, :L].tril(), P[..., L:, L:].tril()

    # (I - A_ab) [W | X0] = [a exp(e) | A_ak V]
    rhs = torch.cat([ac * _exp(e, dtype), A_ak @ vc], -1)
    sol = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True)
    W, X0 = sol[..., :N], sol[..., N:]

    Q = rc * _exp(c, dtype) + A_rb @ W  # [.., L, K]
    Y0 = A_rb @ X0 + A_rk @ vc                          # [.., L, V]
    to_end = _exp(cL - c, dtype)
    b_end, k_end = bc * to_end, kc * to_end
    M = torch.diag_embed(_exp(cL, dtype).squeeze(-2)) + W.transpose(-1, -2) @ b_end   # [.., K, K]
    dS = X0.transpose(-1, -2) @ b_end + vc.transpose(-1, -2) @ k_end               # [.., V, K]

    starts = []
    for i in range(c.shape[2]):
        starts.append(S)
        S = torch.baddbmm(dS[:, :, i].reshape(B * H, N, N), S.reshape(B * H, N, N),
                          M[:, :, i].reshape(B * H, N, N)).reshape(B, H, N, N)
    S0s = torch.stack(starts, 2)
    y = Q @ S0s.transpose(-1, -2) + Y0
    return _from_chunks(y, T).to(r.dtype), S.to(torch.float64 if r.dtype == torch.float64 else torch.float32)


def _check(device: torch.device) -> str | None:
    return None  # plain PyTorch: runs wherever torch does (fast on CPU; use fla on a GPU)


register("chunk", wkv7_chunk, wkv6_chunk, _check)
