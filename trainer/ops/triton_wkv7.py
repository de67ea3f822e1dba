"""Our own Triton kernel for RWKV-7's WKV, forward and backward (op "triton"), CUDA only.

The maths is exactly the oracle's (reference.py), one token at a time, in fp32:

    sa_t = S_{t-1} a_t                                    [value]
    S_t  = S_{t-1} diag(w_t) + sa_t b_t^T + v_t k_t^T     S[value, key], w = exp(logw)
    y_t  = S_t r_t

Why a sequential kernel (and not chunks of matrix products like fla): per head the state is only
N x N = 64 x 64, so a step is a few thousand multiply-adds; kept in registers, the state never
touches memory and each input is read once. This is the design of RWKV-LM's CUDA kernel, written
in Triton so that no CUDA compiler is needed on the user's machine.

Work split. Every value row of S evolves on its own (sa_t, y_t and the row's update need only that
row and the key vectors), so a program owns BV value rows x all N keys of one (batch, head): grid
(B*H, N/BV), no communication in the forward. The backward splits the same way, except that the
gradients of the key-indexed inputs (r, k, logw, a, b) are sums over value rows: with BV < N each
program writes its partial sums (fp32) and the wrapper adds them.

Backward, walking time in reverse with G = dL/dS_t (all fp32):

    dr_t = S_t^T dy_t ;  G += dy_t r_t^T
    dv_t = G k_t      ;  dk_t = G^T v_t
    dsa  = G b_t      ;  db_t = G^T sa_t
    dlogw_t = w_t * colsum(G o S_{t-1}) ;  da_t = S_{t-1}^T dsa
    G <- G diag(w_t) + dsa a_t^T          (G after step 0 is the initial state's gradient)

It needs S_{t-1} at every step, going backwards. The forward saves the state every CHUNK = 16
steps (fp32 checkpoints, as RWKV-LM does) and every sa_t (fp32, [B, T, H, N]). The backward gets
S_{t-1} from S_t by inverting the step,

    S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1 / w_t),

which is cheap (no reduction) but multiplies the rounding error of key column j by 1/w_t,j per
step: over 15 steps of RWKV-7's strongest decay (w = 0.545) by 1.83^15 = 9e3, a relative error of
about 7e-4 in fp32 (measured), which is what RWKV-LM's kernel accepts. Here the kernel tracks that
amplification per key column (the sum of -logw since the last exact state); when it would exceed
e^LOG_AMP_MAX = e^5 (errors of about 1e-5) it replays the forward instead, exactly, from the chunk's
checkpoint with the saved sa (no reduction either), and inverts onwards from that exact state. At
the first step of every chunk the checkpoint itself is S_{t-1}. RWKV-7's decays (w in [0.545, 1])
need at most one replay of a few steps per chunk; much stronger decays (w = e^-8, e^-40: anything
the oracle accepts) replay at every step: slower (7.5 replayed steps per step), still exact.
Measured (interpreter, fp32, T=40, every w = 0.545): gradients of r, logw and a within 2e-6 of the
oracle (relative rms), against 1.5e-4 when only inverting as RWKV-LM does.

Two kernels each way. The tile kernels (_kernels, Triton) hold S and G as [value rows, keys] tiles laid
out by Triton: the backward's sums over value rows cross warps, about 40 barriers per step. The rows
kernels (Gluon, Triton's layout-explicit dialect; the default on a GPU with cp.async: 16 <= N <= 128
forward, 16 <= N <= 64 backward) give each thread (a part of) a row: the forward's of S
(_fwd_rows_kernel), the backward's of S^T, G and G^T (_rows_kernel, as RWKV-LM's CUDA backward), so that
every sum is along a row inside the thread. Their per-step vectors come from shared memory: the copy
engine (cp.async) brings each chunk of 16 steps while the program works through the one before, and the
program turns each chunk into fp32 once, so that neither a step nor a replay waits on global memory or
converts anything; in the backward only G b (the gradient of S a) travels between threads, through
shared memory (two barriers per step: ours, and one Gluon adds before the next write because it cannot
tell the two halves of the exchange buffer apart; two buffers and two steps per turn, one barrier per
step, was not faster: bench/RESULTS.md, session 11). A row's sum is a tree (_rsum), not one chain of
dependent multiply-adds. The rows backward decides between inverting and replaying with a looser bound,
the sum over steps of the largest -logw of each step, taken once per chunk (_replay_steps), so it
replays at least as often: as exact. Triton's interpreter cannot run Gluon, so on the CPU the tests run
the tile kernels and compile the rows kernels for sm_90; the rows kernels run on the GPU tests.

Numbers: inputs in any float dtype (bf16, fp16, fp32; read as they are and turned into fp32 in
registers or shared memory); y and every input gradient in their tensor's dtype; states, checkpoints and sa fp32.
Head size N: a power of two (64 is the tuned case; 16, 32 and 128 work). Any T >= 1.
Memory kept for the backward: the checkpoints, B*H*ceil(T/16)*N*N*4 bytes (2 GiB at B=8, T=4096,
C=4096), and sa, B*T*C*4 bytes.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

from ..errors import UserError
from . import register

CHUNK = 16          # steps between fp32 state checkpoints saved by the forward
LOG_AMP_MAX = 5.0   # the backward inverts steps while the sum of -logw since an exact state stays below this


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the kernels on first use: a CPU install never imports Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        raise UserError(f"OP=triton needs Triton, which cannot be imported ({err})", "pip install triton") from err

    @triton.jit
    def _keys(p, o, ki):
        """One key-indexed vector x[b, t, h, :] (o its offset), in fp32."""
        return tl.load(p + o + ki).to(tl.float32)

    @triton.jit
    def _rows(p, o, vi):
        """This program's value rows of x[b, t, h, :], in fp32."""
        return tl.load(p + o + vi).to(tl.float32)

    # Triton finds the helpers that a kernel calls among the module's globals, not in this closure.
    globals().update(_keys=_keys, _rows=_rows)

    @triton.jit
    def _fwd_kernel(r, k, v, logw, a, b, s0, y, sT, ckpt, sa_buf, T, NC,
                    H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
                    SAVE: tl.constexpr):
        i_bh = tl.program_id(0).to(tl.int64)           # batch * H + head
        i_b, i_h = i_bh // H, i_bh % H
        ki = tl.arange(0, N)                            # key index: the columns of S
        vi = tl.program_id(1) * BV + tl.arange(0, BV)   # value index: this program's rows of S
        tile = vi[:, None] * N + ki[None, :]
        x0 = (i_b * T * H + i_h) * N                    # offset of x[b, 0, h, 0] in [B, T, H, N]
        # Always loaded, zeros included: a state started with tl.zeros made this loop 1.85x slower
        # (6.5 against 3.5 ms at B 8, T 4096, C 2048 on an H100).
        S = tl.load(s0 + i_bh * N * N + tile)

        # The inputs of step t+1 are loaded while step t computes: the loop is bound by latency.
        o = x0
        r_t, k_t, lw_t, a_t, b_t = _keys(r, o, ki), _keys(k, o, ki), _keys(logw, o, ki), _keys(a, o, ki), _keys(b, o, ki)
        v_t = _rows(v, o, vi)
        for t in range(T):
            if SAVE:
                if t % CHUNK == 0:
                    tl.store(ckpt + (i_bh * NC + t // CHUNK) * N * N + tile, S)
            on = x0 + tl.cast(tl.minimum(t + 1, T - 1), tl.int64) * (H * N)   # the last step reloads itself
            r_n, k_n, lw_n, a_n, b_n = _keys(r, on, ki), _keys(k, on, ki), _keys(logw, on, ki), _keys(a, on, ki), _keys(b, on, ki)
            v_n = _rows(v, on, vi)

            sa = tl.sum(S * a_t[None, :], 1)
            S = S * tl.exp(lw_t)[None, :] + sa[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
            tl.store(y + o + vi, tl.sum(S * r_t[None, :], 1).to(y.dtype.element_ty))
            if SAVE:
                tl.store(sa_buf + o + vi, sa)

            o = on
            r_t, k_t, lw_t, a_t, b_t, v_t = r_n, k_n, lw_n, a_n, b_n, v_n
        tl.store(sT + i_bh * N * N + tile, S)

    @triton.jit
    def _replay(ckpt, sa_buf, k, v, logw, b, c0, t, i_bh, NC, x0, tile, ki, vi,
                H: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr):
        """S_{t-1}, exactly as the forward had it: the checkpoint taken before step c0 (a chunk
        start), then the steps c0 .. t-1 with their saved sa."""
        S = tl.load(ckpt + (i_bh * NC + c0 // CHUNK) * N * N + tile)
        for s in range(c0, t):
            o = x0 + tl.cast(s, tl.int64) * (H * N)
            S = S * tl.exp(_keys(logw, o, ki))[None, :] + tl.load(sa_buf + o + vi)[:, None] * _keys(b, o, ki)[None, :] \
                + _rows(v, o, vi)[:, None] * _keys(k, o, ki)[None, :]
        return S

    globals().update(_replay=_replay)

    @triton.jit
    def _bwd_kernel(r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa_buf,
                    dr, dk, dv, dlogw, da, db, ds0, T, NC, part,
                    H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
                    LOG_AMP_MAX: tl.constexpr):
        i_bh = tl.program_id(0).to(tl.int64)
        i_b, i_h = i_bh // H, i_bh % H
        ki = tl.arange(0, N)
        vi = tl.program_id(1) * BV + tl.arange(0, BV)
        tile = vi[:, None] * N + ki[None, :]
        x0 = (i_b * T * H + i_h) * N
        p0 = tl.program_id(1).to(tl.int64) * part       # where this program's key gradients go

        G = tl.load(dsT + i_bh * N * N + tile)          # dL/dS_t, from t = T-1 down
        S = tl.load(sT + i_bh * N * N + tile)           # S_t
        amp = tl.zeros([N], dtype=tl.float32)           # sum of -logw since the last exact S

        o = ((i_b * T + T - 1) * H + i_h) * N            # x[b, T-1, h, 0]
        r_t, k_t, lw_t, a_t, b_t = _keys(r, o, ki), _keys(k, o, ki), _keys(logw, o, ki), _keys(a, o, ki), _keys(b, o, ki)
        v_t, dy_t, sa_t = _rows(v, o, vi), _rows(dy, o, vi), tl.load(sa_buf + o + vi)
        for i in range(T):
            t = T - 1 - i
            on = x0 + tl.cast(tl.maximum(t - 1, 0), tl.int64) * (H * N)   # step t-1, loaded during step t
            r_n, k_n, lw_n, a_n, b_n = _keys(r, on, ki), _keys(k, on, ki), _keys(logw, on, ki), _keys(a, on, ki), _keys(b, on, ki)
            v_n, dy_n, sa_n = _rows(v, on, vi), _rows(dy, on, vi), tl.load(sa_buf + on + vi)

            w_t = tl.exp(lw_t)
            tl.store(dr + p0 + o + ki, tl.sum(S * dy_t[:, None], 0).to(dr.dtype.element_ty))   # S_t^T dy_t
            # S <- S_{t-1}: invert step t, or replay it from the checkpoint if inverting would lose accuracy
            c0 = t - t % CHUNK
            amp_t = amp - lw_t
            if (t == c0) | (tl.max(amp_t, 0) > LOG_AMP_MAX):
                S = _replay(ckpt, sa_buf, k, v, logw, b, c0, t, i_bh, NC, x0, tile, ki, vi, H, N, CHUNK)
                amp = tl.zeros([N], dtype=tl.float32)
            else:
                S = (S - v_t[:, None] * k_t[None, :] - sa_t[:, None] * b_t[None, :]) * tl.exp(-lw_t)[None, :]
                amp = amp_t

            G += dy_t[:, None] * r_t[None, :]
            dsa = tl.sum(G * b_t[None, :], 1)
            tl.store(dv + o + vi, tl.sum(G * k_t[None, :], 1).to(dv.dtype.element_ty))
            # four sums over value rows as one reduction: one exchange between warps instead of four
            sums = tl.sum(tl.join(tl.join(G * v_t[:, None], G * sa_t[:, None]),
                                  tl.join(G * S, S * dsa[:, None])), 0)
            dk_db, dw_da = tl.split(sums)
            dk_t, db_t = tl.split(dk_db)
            dw_t, da_t = tl.split(dw_da)
            tl.store(dk + p0 + o + ki, dk_t.to(dk.dtype.element_ty))
            tl.store(db + p0 + o + ki, db_t.to(db.dtype.element_ty))
            tl.store(dlogw + p0 + o + ki, (dw_t * w_t).to(dlogw.dtype.element_ty))
            tl.store(da + p0 + o + ki, da_t.to(da.dtype.element_ty))
            G = G * w_t[None, :] + dsa[:, None] * a_t[None, :]

            o = on
            r_t, k_t, lw_t, a_t, b_t, v_t, dy_t, sa_t = r_n, k_n, lw_n, a_n, b_n, v_n, dy_n, sa_n
        tl.store(ds0 + i_bh * N * N + tile, G)

    return _fwd_kernel, _bwd_kernel


def _rows_kernel():
    """The backward in Gluon: see _bwd_rows_kernel. None when this Triton has no Gluon (then the tile kernel
    runs)."""
    kernels = _gluon_kernels()
    return kernels and kernels[1]


def _fwd_rows_kernel():
    """The forward in Gluon: see _fwd_rows. None when this Triton has no Gluon (then the tile forward runs)."""
    kernels = _gluon_kernels()
    return kernels and kernels[0]


@functools.lru_cache(maxsize=None)
def _gluon_kernels():
    """(forward, backward), the rows kernels in Gluon (Triton's layout-explicit dialect); None when this
    Triton has no Gluon."""
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.ampere import async_copy
    except ImportError:
        return None

    @gluon.jit
    def _chunk_offsets(x0, c, T, cs, cn, H: gl.constexpr, N: gl.constexpr, CHUNK: gl.constexpr):
        """Offsets of x[b, t, h, :] for the steps t of chunk c (cs, cn: the [CHUNK, N] block's indices), and
        the mask of the steps before T."""
        steps = c * CHUNK + cs
        offs = x0 + steps[:, None].to(gl.int64) * (H * N) + cn[None, :]
        return offs, (steps < T)[:, None] & (cn < N)[None, :]

    @gluon.jit
    def _copy_keys(b_r, b_k, b_lw, b_a, b_b, r, k, logw, a, b, offs, m):
        """Start copying the key-indexed inputs of a chunk (offs, m from _chunk_offsets) into the buffers b_*."""
        async_copy.async_copy_global_to_shared(b_r, r + offs, m)
        async_copy.async_copy_global_to_shared(b_k, k + offs, m)
        async_copy.async_copy_global_to_shared(b_lw, logw + offs, m)
        async_copy.async_copy_global_to_shared(b_a, a + offs, m)
        async_copy.async_copy_global_to_shared(b_b, b + offs, m)

    @gluon.jit
    def _keys_to_f32(f_r, f_k, f_a, f_b, f_w, b_r, b_k, b_a, b_b, b_lw, CP: gl.constexpr):
        """A landed chunk's key-indexed inputs into the fp32 buffers f_* (f_w: exp(logw)), each element by one
        thread (layout CP); returns logw in fp32."""
        lw = b_lw.load(CP).to(gl.float32)
        f_r.store(b_r.load(CP).to(gl.float32))
        f_k.store(b_k.load(CP).to(gl.float32))
        f_a.store(b_a.load(CP).to(gl.float32))
        f_b.store(b_b.load(CP).to(gl.float32))
        f_w.store(gl.exp(lw))
        return lw

    @gluon.jit
    def _stage(b_r, b_k, b_lw, b_a, b_b, b_v, b_dy, b_sa, r, k, logw, a, b, v, dy, sa_buf, x0, c, T, cs, cn,
               H, N, CHUNK):
        """Start copying chunk c's inputs (steps c*CHUNK .. +CHUNK, those past T masked) into the [CHUNK, N]
        buffers b_*, as one cp.async group."""
        offs, m = _chunk_offsets(x0, c, T, cs, cn, H, N, CHUNK)
        _copy_keys(b_r, b_k, b_lw, b_a, b_b, r, k, logw, a, b, offs, m)
        async_copy.async_copy_global_to_shared(b_v, v + offs, m)
        async_copy.async_copy_global_to_shared(b_dy, dy + offs, m)
        async_copy.async_copy_global_to_shared(b_sa, sa_buf + offs, m)
        async_copy.commit_group()

    @gluon.jit
    def _stage_fwd(b_r, b_k, b_lw, b_a, b_b, b_v, r, k, logw, a, b, v, x0, v0, c, T, cs, cn, vs, vn, H, N, CHUNK):
        """Start copying chunk c's inputs (steps c*CHUNK .. +CHUNK, those past T masked) into the buffers b_*
        ([CHUNK, N], v [CHUNK, BV]): the key-indexed vectors whole, v only for this program's BV value rows;
        one cp.async group."""
        offs, m = _chunk_offsets(x0, c, T, cs, cn, H, N, CHUNK)
        _copy_keys(b_r, b_k, b_lw, b_a, b_b, r, k, logw, a, b, offs, m)
        voffs, vm = _chunk_offsets(x0 + v0, c, T, vs, vn, H, N, CHUNK)   # vn < BV <= N: the rows' mask is vm
        async_copy.async_copy_global_to_shared(b_v, v + voffs, vm)
        async_copy.commit_group()

    @gluon.jit
    def _rsum(x, OUT: gl.constexpr, Q: gl.constexpr):
        """Each row's sum of the tile x [rows, N] (layout L, a thread's keys 4 by 4 along the row), as OUT
        (= ROW): first over Q slices of the keys (Q independent terms per partial sum), then along a slice.
        gl.sum alone adds a thread's N/TPR keys one after another, a chain of dependent FMAs (4 cycles each)
        that the steps wait on; with 32 keys per thread and Q = 8 the longest chain is 7 + 3 adds instead of
        32 (with 64 keys, 7 + 7 instead of 64)."""
        part = gl.sum(gl.reshape(x, [x.shape[0], Q, x.shape[1] // Q]), 1)
        return gl.convert_layout(gl.sum(part, 1), OUT, assert_trivial=True)

    @gluon.jit
    def _replay_steps(f_am, n, REP: gl.constexpr, CHUNK: gl.constexpr, LOG_AMP_MAX: gl.constexpr):
        """The steps s of a chunk (n steps; f_am: each step's largest -logw, in shared memory) where the
        backward replays from the checkpoint instead of inverting, as bits 1 << s. Walking back from the last
        step, it inverts while the sum of the largest -logw since the last exact state (a bound on every
        key's: the error grows by e^-logw per inverted step) stays within LOG_AMP_MAX; at step 0 the
        checkpoint is the state. Taken once per chunk, so that a step only tests a bit."""
        am = f_am.load(REP)
        idx = gl.arange(0, CHUNK, layout=REP)
        amp = gl.max(gl.zeros_like(am), 0)              # scalar 0.0 (fp32)
        replays = gl.sum(gl.zeros_like(idx), 0)         # scalar 0 (int32)
        for s in gl.static_range(CHUNK - 1, -1, -1):
            amp_t = amp + gl.max(gl.where(idx == s, am, float("-inf")), 0)
            live = n > s
            replay = live & ((amp_t > LOG_AMP_MAX) | (s == 0))
            replays = gl.where(replay, replays | (1 << s), replays)
            amp = gl.where(replay, 0.0, gl.where(live, amp_t, amp))
        return replays

    # Gluon finds the helpers that a kernel calls among the module's globals, not in this closure.
    globals().update(_replay_steps=_replay_steps, _rsum=_rsum, _chunk_offsets=_chunk_offsets, _copy_keys=_copy_keys,
                     _keys_to_f32=_keys_to_f32, _stage=_stage, _stage_fwd=_stage_fwd)

    @gluon.jit
    def _bwd_rows_kernel(r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa_buf, dr, dk, dv, dlogw, da, db, ds0, T, NC,
                         H: gl.constexpr, N: gl.constexpr, TPR: gl.constexpr, CHUNK: gl.constexpr,
                         LOG_AMP_MAX: gl.constexpr, Q: gl.constexpr):
        """One program per (batch, head), TPR threads per row of each tile: S^T [key, value], G = dL/dS
        [value, key] and its transpose G^T [key, value] (the redundant copy is cheaper than reducing
        over threads). Every gradient is then a sum along a row, inside the thread (and TPR lanes); a
        thread holds its row's keys 4 by 4, interleaved with the row's other lanes, so that fp32 vectors
        are read from shared memory without bank conflicts.

        The per-step inputs reach the threads through shared memory, a chunk of CHUNK steps at a time, and
        replaying steps from the chunk's checkpoint reads them from there too. The copy engine (cp.async)
        brings a chunk into one buffer as it is in memory; once it has landed, the program turns it into
        fp32 buffers (exp(logw) and exp(-logw) taken there too), each element by one thread, then starts
        bringing the next chunk (c-1) and works through chunk c. So a step converts nothing: its rows all read
        the same vectors, which in bf16 cost as many conversions as multiply-adds (measured 11-14 % faster
        than reading the bf16 copies, bench/RESULTS.md, session 10). Each thread reads its row's element of a
        vector (one per thread) or the whole vector (every column): no exchange between threads but G b
        (dsa, the gradient of S·a), through shared memory too (see the module docstring)."""
        NW: gl.constexpr = N * TPR // 32
        L: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [NW, 1], [1, 0])
        ROW: gl.constexpr = gl.SliceLayout(1, L)     # x[i] for the rows: one element per thread
        COL: gl.constexpr = gl.SliceLayout(0, L)     # x[j] for the columns: this thread's N/TPR of them
        # a [CHUNK, N] block of steps over all the program's threads, 4 consecutive elements per thread
        CP: gl.constexpr = gl.BlockedLayout([1, 4], [128 // N, N // 4], [NW, 1], [1, 0])
        SM2: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 1, [1, 0])     # [steps, N], row-major (cp.async)
        SM1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])        # the same memory as rows of N
        REP: gl.constexpr = gl.BlockedLayout([CHUNK], [32], [NW], [0])    # a chunk's scalars, all in every thread
        F32: gl.constexpr = gl.float32
        i_bh = gl.program_id(0).to(gl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        ri = gl.arange(0, N, layout=ROW)
        ci = gl.arange(0, N, layout=COL)
        own = ri[:, None] * N + ci[None, :]          # [row, column] of a state in memory
        tr = ci[None, :] * N + ri[:, None]           # its transpose
        x0 = (i_b * T * H + i_h) * N
        cs = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, CP))
        cn = gl.arange(0, N, layout=gl.SliceLayout(0, CP))

        # the copy buffers (a chunk as it is in memory)
        b_r = gl.allocate_shared_memory(r.dtype.element_ty, [CHUNK, N], SM2)
        b_k = gl.allocate_shared_memory(k.dtype.element_ty, [CHUNK, N], SM2)
        b_lw = gl.allocate_shared_memory(logw.dtype.element_ty, [CHUNK, N], SM2)
        b_a = gl.allocate_shared_memory(a.dtype.element_ty, [CHUNK, N], SM2)
        b_b = gl.allocate_shared_memory(b.dtype.element_ty, [CHUNK, N], SM2)
        b_v = gl.allocate_shared_memory(v.dtype.element_ty, [CHUNK, N], SM2)
        b_dy = gl.allocate_shared_memory(dy.dtype.element_ty, [CHUNK, N], SM2)
        b_sa = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        # the chunk in fp32, row s = step s of the chunk
        f_r = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_k = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_a = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_b = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_v = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_dy = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_sa = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)
        f_w = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)        # exp(logw)
        f_iw = gl.allocate_shared_memory(F32, [CHUNK, N], SM2)       # exp(-logw)
        b_dsa = gl.allocate_shared_memory(F32, [2, N], SM1)          # G b (dsa), by step parity
        f_am = gl.allocate_shared_memory(F32, [CHUNK], SM1)          # each step's largest -logw
        cr = f_r._reinterpret(F32, [CHUNK, N], SM1)
        ck = f_k._reinterpret(F32, [CHUNK, N], SM1)
        ca = f_a._reinterpret(F32, [CHUNK, N], SM1)
        cb = f_b._reinterpret(F32, [CHUNK, N], SM1)
        cv = f_v._reinterpret(F32, [CHUNK, N], SM1)
        cdy = f_dy._reinterpret(F32, [CHUNK, N], SM1)
        csa = f_sa._reinterpret(F32, [CHUNK, N], SM1)
        cw = f_w._reinterpret(F32, [CHUNK, N], SM1)
        ciw = f_iw._reinterpret(F32, [CHUNK, N], SM1)

        # chunk NC-1 first (the last steps)
        _stage(b_r, b_k, b_lw, b_a, b_b, b_v, b_dy, b_sa, r, k, logw, a, b, v, dy, sa_buf, x0, NC - 1, T, cs, cn,
               H, N, CHUNK)
        ST = gl.load(sT + i_bh * N * N + tr)         # S_t^T, from t = T-1 down
        G = gl.load(dsT + i_bh * N * N + own)        # dL/dS_t
        GT = gl.load(dsT + i_bh * N * N + tr)
        par = 0                                      # step parity, for b_dsa
        for cc in range(NC):
            c = NC - 1 - cc
            # chunk c has landed (each thread waits for its copies, the barrier for everyone's), and every
            # thread is done with chunk c+1's fp32 buffers: turn chunk c into fp32
            async_copy.wait_group(0)
            gl.thread_barrier()
            lw = _keys_to_f32(f_r, f_k, f_a, f_b, f_w, b_r, b_k, b_a, b_b, b_lw, CP)
            f_v.store(b_v.load(CP).to(F32))
            f_dy.store(b_dy.load(CP).to(F32))
            f_sa.store(b_sa.load(CP))
            f_iw.store(gl.exp(-lw))
            f_am.store(gl.max(-lw, 1))
            gl.thread_barrier()
            c0 = c * CHUNK
            n = gl.minimum(T - c0, CHUNK)
            replays = _replay_steps(f_am, n, REP, CHUNK, LOG_AMP_MAX)
            # the copy buffers are free: bring chunk c-1 while this one runs (at c = 0 chunk 0 again, unused:
            # an `if` here fails to compile where T = 1 makes it constant)
            _stage(b_r, b_k, b_lw, b_a, b_b, b_v, b_dy, b_sa, r, k, logw, a, b, v, dy, sa_buf, x0,
                   gl.maximum(c - 1, 0), T, cs, cn, H, N, CHUNK)
            for j in range(n):
                s = n - 1 - j
                t = c0 + s
                o = x0 + t.to(gl.int64) * (H * N)
                dyC = cdy.index(s).load(COL)
                gl.store(dr + o + ri, _rsum(ST * dyC[None, :], ROW, Q).to(dr.dtype.element_ty))    # S_t^T dy_t
                # ST <- S_{t-1}^T: invert step t, or where inverting would lose accuracy (_replay_steps)
                # replay the chunk's first steps from its checkpoint. The inversion is taken either way,
                # before the branch, so that its independent multiply-adds fill the wait on S_t^T dy_t's sum.
                vC = cv.index(s).load(COL)
                saC = csa.index(s).load(COL)
                ST = (ST - ck.index(s).load(ROW)[:, None] * vC[None, :]
                      - cb.index(s).load(ROW)[:, None] * saC[None, :]) * ciw.index(s).load(ROW)[:, None]
                if ((replays >> s) & 1) != 0:
                    ST = gl.load(ckpt + (i_bh * NC + c) * N * N + tr)
                    for q in range(0, s):
                        ST = ST * cw.index(q).load(ROW)[:, None] \
                            + cb.index(q).load(ROW)[:, None] * csa.index(q).load(COL)[None, :] \
                            + ck.index(q).load(ROW)[:, None] * cv.index(q).load(COL)[None, :]

                G += cdy.index(s).load(ROW)[:, None] * cr.index(s).load(COL)[None, :]
                GT += cr.index(s).load(ROW)[:, None] * dyC[None, :]
                dsa = _rsum(G * cb.index(s).load(COL)[None, :], ROW, Q)            # G b_t
                pd = b_dsa.index(par)
                pd.store(dsa)
                gl.store(dv + o + ri, _rsum(G * ck.index(s).load(COL)[None, :], ROW, Q).to(dv.dtype.element_ty))
                gl.store(dk + o + ri, _rsum(GT * vC[None, :], ROW, Q).to(dk.dtype.element_ty))
                gl.store(db + o + ri, _rsum(GT * saC[None, :], ROW, Q).to(db.dtype.element_ty))
                w_t = cw.index(s).load(ROW)
                gl.store(dlogw + o + ri, (_rsum(GT * ST, ROW, Q) * w_t).to(dlogw.dtype.element_ty))
                gl.thread_barrier()
                dsaC = pd.load(COL)
                gl.store(da + o + ri, _rsum(ST * dsaC[None, :], ROW, Q).to(da.dtype.element_ty))   # S_{t-1}^T dsa
                G = G * cw.index(s).load(COL)[None, :] + dsa[:, None] * ca.index(s).load(COL)[None, :]
                GT = GT * w_t[:, None] + ca.index(s).load(ROW)[:, None] * dsaC[None, :]
                par = 1 - par
        async_copy.wait_group(0)
        gl.store(ds0 + i_bh * N * N + own, G)

    @gluon.jit
    def _fwd_rows(r, k, v, logw, a, b, s0, y, sT, ckpt, sa_buf, T, NC,
                  H: gl.constexpr, N: gl.constexpr, BV: gl.constexpr, TPR: gl.constexpr, CHUNK: gl.constexpr,
                  SAVE: gl.constexpr, Q: gl.constexpr):
        """Grid (B*H, N/BV): BV value rows of S [value, key] of one head, TPR threads per row (BV*TPR/32
        warps), each thread holding N/TPR keys of its row (4 by 4, interleaved with the row's other lanes),
        so that S·a and S·r are sums inside the thread and TPR lanes: no exchange between warps at all.
        The inputs reach the threads through shared memory, a chunk of CHUNK steps at a time: the copy
        engine (cp.async) brings chunk c+1 while the program works through chunk c. Each chunk is turned
        into fp32 buffers once (exp(logw) taken there too), each element by one thread, so that a step
        converts nothing: its rows all read the same vectors (N/TPR keys per thread), which in bf16 cost
        as many conversions as multiply-adds. Measured: bench/RESULTS.md, session 10."""
        NW: gl.constexpr = BV * TPR // 32
        L: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [NW, 1], [1, 0])   # keys 4 by 4, interleaved over the TPR lanes
        ROW: gl.constexpr = gl.SliceLayout(1, L)
        COL: gl.constexpr = gl.SliceLayout(0, L)
        CP: gl.constexpr = gl.BlockedLayout([1, 4], [128 // N, N // 4], [NW, 1], [1, 0])
        CPV: gl.constexpr = gl.BlockedLayout([1, 4], [128 // BV, BV // 4], [NW, 1], [1, 0])
        SM2: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 1, [1, 0])
        SM1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        i_bh = gl.program_id(0).to(gl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        v0 = gl.program_id(1) * BV
        ri = v0 + gl.arange(0, BV, layout=ROW)
        ci = gl.arange(0, N, layout=COL)
        own = ri[:, None] * N + ci[None, :]
        x0 = (i_b * T * H + i_h) * N
        cs = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, CP))
        cn = gl.arange(0, N, layout=gl.SliceLayout(0, CP))
        vs = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, CPV))
        vn = gl.arange(0, BV, layout=gl.SliceLayout(0, CPV))

        # raw copies (one chunk, as in memory) and the chunk in fp32
        b_r = gl.allocate_shared_memory(r.dtype.element_ty, [CHUNK, N], SM2)
        b_k = gl.allocate_shared_memory(k.dtype.element_ty, [CHUNK, N], SM2)
        b_lw = gl.allocate_shared_memory(logw.dtype.element_ty, [CHUNK, N], SM2)
        b_a = gl.allocate_shared_memory(a.dtype.element_ty, [CHUNK, N], SM2)
        b_b = gl.allocate_shared_memory(b.dtype.element_ty, [CHUNK, N], SM2)
        b_v = gl.allocate_shared_memory(v.dtype.element_ty, [CHUNK, BV], SM2)
        f_r = gl.allocate_shared_memory(gl.float32, [CHUNK, N], SM2)
        f_k = gl.allocate_shared_memory(gl.float32, [CHUNK, N], SM2)
        f_w = gl.allocate_shared_memory(gl.float32, [CHUNK, N], SM2)
        f_a = gl.allocate_shared_memory(gl.float32, [CHUNK, N], SM2)
        f_b = gl.allocate_shared_memory(gl.float32, [CHUNK, N], SM2)
        f_v = gl.allocate_shared_memory(gl.float32, [CHUNK, BV], SM2)
        cr = f_r._reinterpret(gl.float32, [CHUNK, N], SM1)
        ck = f_k._reinterpret(gl.float32, [CHUNK, N], SM1)
        cw = f_w._reinterpret(gl.float32, [CHUNK, N], SM1)
        ca = f_a._reinterpret(gl.float32, [CHUNK, N], SM1)
        cb = f_b._reinterpret(gl.float32, [CHUNK, N], SM1)
        cv = f_v._reinterpret(gl.float32, [CHUNK, BV], SM1)

        _stage_fwd(b_r, b_k, b_lw, b_a, b_b, b_v, r, k, logw, a, b, v, x0, v0, 0, T, cs, cn, vs, vn,
                   H, N, CHUNK)
        S = gl.load(s0 + i_bh * N * N + own)
        for c in range(NC):
            # chunk c has landed (each thread waits for its copies, the barrier for everyone's), and every
            # thread is done with chunk c-1's fp32 buffers
            async_copy.wait_group(0)
            gl.thread_barrier()
            _keys_to_f32(f_r, f_k, f_a, f_b, f_w, b_r, b_k, b_a, b_b, b_lw, CP)
            f_v.store(b_v.load(CPV).to(gl.float32))
            gl.thread_barrier()
            # the raw buffers are free: bring chunk c+1 while this one runs (the last chunk again at the end,
            # unused: an `if` here fails to compile where T = 1 makes it constant)
            _stage_fwd(b_r, b_k, b_lw, b_a, b_b, b_v, r, k, logw, a, b, v, x0, v0, gl.minimum(c + 1, NC - 1), T, cs, cn,
                       vs, vn, H, N, CHUNK)
            if SAVE:
                gl.store(ckpt + (i_bh * NC + c) * N * N + own, S)
            c0 = c * CHUNK
            n = gl.minimum(T - c0, CHUNK)
            for s in range(n):
                o = x0 + (c0 + s).to(gl.int64) * (H * N)
                sa = _rsum(S * ca.index(s).load(COL)[None, :], ROW, Q)
                S = S * cw.index(s).load(COL)[None, :] + sa[:, None] * cb.index(s).load(COL)[None, :] \
                    + cv.index(s).load(ROW)[:, None] * ck.index(s).load(COL)[None, :]
                gl.store(y + o + ri, _rsum(S * cr.index(s).load(COL)[None, :], ROW, Q).to(y.dtype.element_ty))
                if SAVE:
                    gl.store(sa_buf + o + ri, sa)
        async_copy.wait_group(0)
        gl.store(sT + i_bh * N * N + own, S)

    return _fwd_rows, _bwd_rows_kernel


# ---------------------------------------------------------------- launch configuration

@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


PARTIALS_BUDGET = 2 ** 30   # bytes of fp32 partial sums the backward may use to split a head's rows


@functools.lru_cache(maxsize=None)
def _has_gluon_installed() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ImportError:
        return False


@functools.lru_cache(maxsize=None)
def _has_cp_async(device: torch.device) -> bool:
    """Whether the GPU has cp.async (compute capability 8.0 and up: Ampere, Ada, Hopper, ...), which the
    rows backward stages its inputs with; older GPUs (Turing, Volta) run the tile backward."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def _has_gluon() -> bool:
    """Whether this Triton has Gluon (the backward's rows kernel needs it; the interpreter cannot run it)."""
    return not _interpreting() and _has_gluon_installed()


def default_config(B: int, T: int, H: int, N: int, device: torch.device) -> dict:
    """{"fwd": ..., "bwd": ...}, each part one of
    - (BV, num_warps, maxnreg): the tile kernel (Triton), BV value rows per program, a register cap or None;
    - forward ("rows", BV, TPR): the Gluon forward, BV value rows per program, TPR threads per row;
    - backward ("rows", TPR, maxnreg): the Gluon backward, one program per head, TPR threads per row.

    Every kernel is a sequential loop over T. Where Gluon runs (Triton >= 3.5, compute capability >= 8.0):
    - Forward, the rows kernel: with at least as many heads as SMs one program per head, one thread per
      row (BV = N, TPR 1); with fewer, smaller programs so that more SMs work: at most half as many heads
      as SMs, half a head and 4 threads per row; in between, a quarter of a head and 2 threads per row.
    - Backward, the rows kernel with 2 threads per row.
    Measured on an H100 (bench/wkv_kernel.py --configs, bf16; bench/RESULTS.md, session 11), forward and
    forward + backward in ms, the default first: B8 T4096 C4096 (512 heads) r64x1/r2 3.51, 15.66 (r32x2/r2
    4.14, 15.97; r64x1/r4 23.3); B8 T4096 C2048 (256) r64x1/r2 2.03, 7.96 (r32x2/r2 1.99, 8.04); B8 T1024
    C768 (96) r16x2/r2 0.42, 1.57 (r32x4/r2 0.61, 1.69); B1 T1024 C2048 (32) r32x4/r2 0.41, 1.62 (r64x1/r2
    0.54, 1.58); B1 T32768 C4096 (64) r32x4/r2 8.78, 37.78 (r16x2/r2 9.20, 37.68). The backward with 4
    threads per row was slower at every shape.
    Without Gluon: the tile forward (16 rows, one warp per program with at most two heads per SM, else a
    head per program) and the tile backward, split into 16-row programs while heads are few and its partial
    sums fit in PARTIALS_BUDGET; also for N = 128 (not measured) or below 16."""
    device = torch.device(device)
    return dict(_default_config(B, T, H, N, _sm_count(device), _has_gluon() and _has_cp_async(device)))


def _fwd_rows_config(heads: int, N: int, sms: int) -> tuple:
    if heads >= sms:
        bv, tpr = N, 1
    elif 2 * heads <= sms:
        bv, tpr = N // 2, 4
    else:
        bv, tpr = N // 4, 2
    while bv * tpr < 32:        # a program is at least one warp; a thread at least 4 keys
        if 4 * tpr * 2 <= N:
            tpr *= 2
        else:
            bv *= 2
    return ("rows", bv, tpr)


@functools.lru_cache(maxsize=256)
def _default_config(B: int, T: int, H: int, N: int, sms: int, gluon: bool) -> dict:
    few = B * H <= 2 * sms
    partials = lambda bv: 5 * 4 * (N // bv) * B * T * H * N   # noqa: E731  bytes of the tile backward's sums
    warps = lambda bv: max(1, min(8, bv * N // 2048))          # noqa: E731
    if 16 <= N <= 128 and gluon:
        fwd = _fwd_rows_config(B * H, N, sms)
    else:
        fwd_bv = min(N, 16) if few else min(N, 64)
        fwd = (fwd_bv, warps(fwd_bv), None)
    if 16 <= N <= 64 and gluon:
        bwd = ("rows", 2, None)
    else:   # no Gluon, or N = 128 (not measured) or 8: split while the programs are too few for two per SM
        bwd_bv = min(N, 64)
        while bwd_bv > 16 and B * H * (N // bwd_bv) < 2 * sms and partials(bwd_bv // 2) <= PARTIALS_BUDGET:
            bwd_bv //= 2
        bwd = (bwd_bv, warps(bwd_bv), None)
    return {"fwd": fwd, "bwd": bwd}


# ---------------------------------------------------------------- the op

def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# The op is two torch.library custom ops (forward, backward) joined by register_autograd, rather than an
# autograd.Function: torch.compile (COMPILE) then traces a whole block through it without a graph break.
# The launch configuration travels as ints (custom ops take no dicts): fwd (kind 0 = tile, 1 = rows; BV;
# warps (tile) or TPR (rows); maxnreg or 0); bwd (kind 0 = tile, 1 = rows; BV (tile) or TPR; warps (tile);
# maxnreg or 0).

def _flat(config: dict) -> tuple[int, ...]:
    if config["fwd"][0] == "rows":
        _, fb, tpr = config["fwd"]
        fwd = (1, fb, tpr, 0)
    else:
        fb, fw, fm = config["fwd"]
        fwd = (0, fb, fw, fm or 0)
    if config["bwd"][0] == "rows":
        _, tpr, bm = config["bwd"]
        bwd = (1, tpr, 0, bm or 0)
    else:
        bb, bw, bm = config["bwd"]
        bwd = (0, bb, bw, bm or 0)
    return fwd + bwd


def _rsum_q(N: int, tpr: int) -> int:
    """The rows kernels' sums along a row (_rsum) go over Q slices of a thread's keys first: about the square
    root of the N / TPR keys a thread holds, at most the N / (4 TPR) groups of 4 it holds them in."""
    q = 1
    while q * q * 2 <= N // tpr and q * 2 <= N // (4 * tpr):
        q *= 2
    return q


def _dense(x: Tensor) -> Tensor:
    """x contiguous and 16-byte aligned: the rows kernels copy 4 elements at a time with cp.async, which
    needs aligned addresses (a view into a larger tensor may start anywhere)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _device_index(x: Tensor) -> int:
    if not x.is_cuda:
        return -1
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


@torch.compiler.assume_constant_result
def _default_flat(B: int, T: int, H: int, N: int, index: int) -> tuple[int, ...]:
    device = torch.device("cuda", index) if index >= 0 else torch.device("cpu")
    return _flat(default_config(B, T, H, N, device))


def _opts(warps: int, maxnreg: int) -> dict:
    return {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg and not _interpreting() else {})}


@torch.library.custom_op("rwkv_peft::wkv7_fwd", mutates_args=())
def _wkv7_fwd(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor, state: Tensor | None,
              save: bool, config: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, final state, chunk checkpoints, S·a per step); the last two are empty when not ``save``.
    ``config``: _flat's 8 ints (the backward's part is for _backward)."""
    B, T, H, N = r.shape
    kind, fwd_bv, p2, fwd_maxnreg = config[:4]
    r, k, v, logw, a, b = (_dense(x) for x in (r, k, v, logw, a, b))
    s0 = state.float().contiguous() if state is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
    NC = (T + CHUNK - 1) // CHUNK
    y = torch.empty_like(r)
    sT = r.new_empty(B, H, N, N, dtype=torch.float32)
    ckpt = r.new_empty((B * H, NC, N, N) if save else (1,), dtype=torch.float32)
    sa = r.new_empty((B, T, H, N) if save else (1,), dtype=torch.float32)
    if kind == 1:
        rows = _fwd_rows_kernel()
        if rows is None or (r.is_cuda and not _has_cp_async(r.device)):
            raise UserError("the triton op's 'rows' forward needs Triton with Gluon (triton >= 3.5) and a GPU of "
                            "compute capability 8.0 or newer", "leave the launch configuration to the default")
        tpr = p2
        if not (N % fwd_bv == 0 and 4 <= fwd_bv and fwd_bv * tpr % 32 == 0 and 1 <= tpr and 4 * tpr <= N <= 128):
            raise UserError(f"the rows forward needs BV | N, 4 <= BV, 32 | BV * TPR, 4 * TPR <= N <= 128 (got N={N}, "
                            f"BV={fwd_bv}, TPR={tpr})", "use ('rows', 64, 1) for N = 64")
        with _on_device(r):
            rows[(B * H, N // fwd_bv)](r, k, v, logw, a, b, s0, y, sT, ckpt, sa, T, NC, H=H, N=N, BV=fwd_bv,
                                       TPR=tpr, CHUNK=CHUNK, SAVE=save, Q=_rsum_q(N, tpr),
                                       num_warps=fwd_bv * tpr // 32)
        return y, sT, ckpt, sa
    fwd, _ = _kernels()
    with _on_device(r):
        fwd[(B * H, N // fwd_bv)](r, k, v, logw, a, b, s0, y, sT, ckpt, sa, T, NC, H=H, N=N, BV=fwd_bv,
                                  CHUNK=CHUNK, SAVE=save, **_opts(p2, fwd_maxnreg))
    return y, sT, ckpt, sa


@_wkv7_fwd.register_fake
def _(r, k, v, logw, a, b, state, save, config):
    B, T, H, N = r.shape
    NC = (T + CHUNK - 1) // CHUNK
    f32 = torch.float32
    return (torch.empty_like(r, memory_format=torch.contiguous_format), r.new_empty(B, H, N, N, dtype=f32),
            r.new_empty((B * H, NC, N, N) if save else (1,), dtype=f32),
            r.new_empty((B, T, H, N) if save else (1,), dtype=f32))


@torch.library.custom_op("rwkv_peft::wkv7_bwd", mutates_args=())
def _wkv7_bwd(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor, dy: Tensor, dsT: Tensor,
              sT: Tensor, ckpt: Tensor, sa: Tensor, kind: int, p1: int, p2: int, p3: int,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dr, dk, dv, dlogw, da, db, d initial state)."""
    B, T, H, N = r.shape
    _, bwd = _kernels()
    r, k, v, logw, a, b = (_dense(x) for x in (r, k, v, logw, a, b))
    dy, dsT = _dense(dy), dsT.float().contiguous()
    dv, ds0 = torch.empty_like(v), torch.empty_like(sT)
    keyed = (r, k, logw, a, b)
    if kind == 1:
        tpr, maxnreg = p1, p3
        rows = _rows_kernel()
        if r.is_cuda and not _has_cp_async(r.device):
            raise UserError("the triton op's 'rows' backward needs a GPU of compute capability 8.0 or newer "
                            f"(this one is {'.'.join(map(str, torch.cuda.get_device_capability(r.device)))})",
                            "leave the launch configuration to the default (it takes the tile backward here)")
        if rows is None:
            raise UserError("the triton op's 'rows' backward needs Triton with Gluon (triton >= 3.5)",
                            "pip install -U triton, or pass a tile config such as (64, 2, None)")
        if not (1 <= tpr and N * tpr >= 32 and 4 * tpr <= N):
            raise UserError(f"the rows backward needs 32 <= N * TPR and 4 * TPR <= N (got N={N}, TPR={tpr})",
                            "use TPR = 2 for N = 16 .. 64")
        dr, dk, dlogw, da, db = (torch.empty_like(x) for x in keyed)
        with _on_device(r):
            rows[(B * H,)](r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa, dr, dk, dv, dlogw, da, db, ds0,
                           T, ckpt.shape[1], H=H, N=N, TPR=tpr, CHUNK=CHUNK, LOG_AMP_MAX=LOG_AMP_MAX,
                           Q=_rsum_q(N, tpr), num_warps=N * tpr // 32, **({"maxnreg": maxnreg} if maxnreg else {}))
        return dr, dk, dv, dlogw, da, db, ds0
    bv, warps, maxnreg = p1, p2, p3
    nv = N // bv
    if nv == 1:   # every program holds all value rows: its key gradients are complete, in their dtype
        outs = [torch.empty_like(x) for x in keyed]
    else:         # one slice of partial sums (over its value rows) per program, added below
        outs = [r.new_empty(nv, B, T, H, N, dtype=torch.float32) for _ in keyed]
    dr, dk, dlogw, da, db = outs
    with _on_device(r):
        bwd[(B * H, nv)](r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa, dr, dk, dv, dlogw, da, db, ds0,
                         T, ckpt.shape[1], B * T * H * N if nv > 1 else 0, H=H, N=N, BV=bv, CHUNK=CHUNK,
                         LOG_AMP_MAX=LOG_AMP_MAX, **_opts(warps, maxnreg))
    if nv > 1:
        dr, dk, dlogw, da, db = (g.sum(0).to(x.dtype) for g, x in zip(outs, keyed))
    return dr, dk, dv, dlogw, da, db, ds0


@_wkv7_bwd.register_fake
def _(r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa, kind, p1, p2, p3):
    like = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    return like(r), like(k), like(v), like(logw), like(a), like(b), torch.empty_like(sT)


def _setup(ctx, inputs, output):
    r, k, v, logw, a, b, state, save, config = inputs
    _y, sT, ckpt, sa = output
    ctx.save_for_backward(r, k, v, logw, a, b, sT, ckpt, sa)
    ctx.has_s0, ctx.bwd = state is not None, tuple(config[4:])


def _backward(ctx, dy, dsT, _dckpt, _dsa):
    r, k, v, logw, a, b, sT, ckpt, sa = ctx.saved_tensors
    dy = dy if dy is not None else torch.zeros_like(r)
    dsT = dsT if dsT is not None else torch.zeros_like(sT)
    dr, dk, dv, dlogw, da, db, ds0 = _wkv7_bwd(r, k, v, logw, a, b, dy, dsT, sT, ckpt, sa, *ctx.bwd)
    return dr, dk, dv, dlogw, da, db, (ds0 if ctx.has_s0 else None), None, None


_wkv7_fwd.register_autograd(_backward, setup_context=_setup)


@functools.lru_cache(maxsize=None)
def skip_unused_saves_pass():
    """An inductor post-grad graph pass (torch._inductor.config.post_grad_custom_post_pass): where a
    graph calls our forward with save=True but never reads its chunk checkpoints and S·a (outputs 2 and
    3), it calls it with save=False. That is the forward graph of a block whose checkpoint is compiled with
    it (model.RWKV.compile_blocks): its backward graph recomputes the block, with a forward that saves. The
    saving forward costs 5.6 ms against 3.5 at B 8, T 4096, C 2048 on an H100."""
    import operator

    from torch._inductor.custom_graph_pass import CustomGraphPass

    class SkipUnusedSaves(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in graph.nodes:
                if node.target is not torch.ops.rwkv_peft.wkv7_fwd.default or len(node.args) < 8:
                    continue
                read = set()
                for user in node.users:
                    read.add(user.args[1] if user.target is operator.getitem else None)
                if node.args[7] is True and not read & {2, 3, None}:
                    node.args = node.args[:7] + (False,) + node.args[8:]

        def uuid(self) -> str:
            return "rwkv_peft.skip_unused_saves.1"

    return SkipUnusedSaves()


def wkv7_triton(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor,
                state: Tensor | None = None, config: dict | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV with our Triton kernels: (y in r's dtype, final state fp32). ``config`` overrides the
    launch configuration (see default_config; the benchmark sweeps it)."""
    if r.device.type != "cuda" and not _interpreting():
        raise UserError(f"OP=triton needs a CUDA GPU, and this run is on '{r.device.type}'", "use OP=chunk on a CPU")
    B, T, H, N = r.shape
    if N & (N - 1):
        raise UserError(f"OP=triton needs a power-of-two head size, and this model's is {N}",
                        "use OP=fla (or OP=chunk)")
    if T < 1:
        raise UserError("OP=triton got an empty sequence (T = 0)", "give it at least one token")
    flat = list(_flat(config)) if config else list(_default_flat(B, T, H, N, _device_index(r)))
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, k, v, logw, a, b, state))
    logw = logw.expand_as(r)
    y, sT, _ckpt, _sa = _wkv7_fwd(r, k, v, logw, a, b, state, save, flat)
    return y, sT


def wkv6_triton(r, k, v, logw, u, state=None):
    raise UserError("OP=triton has only an RWKV-7 kernel; use OP=fla for RWKV-5/6",
                    "set OP=fla (or OP=auto) for an RWKV-5/6 model")


def check(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"its Triton kernel needs a CUDA GPU, and this run is on '{device.type}' (use OP=chunk on a CPU)"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install triton"
    return None


register("triton", wkv7_triton, wkv6_triton, check, traceable=True)
