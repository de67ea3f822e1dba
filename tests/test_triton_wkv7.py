"""Our Triton RWKV-7 kernel (trainer/ops/triton_wkv7.py) against the fp32 oracle, forward and backward.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy), in a subprocess so the
setting cannot leak into other tests: tiny shapes, every output and every gradient, fp32 to 1e-5. On a
GPU (marked gpu) the compiled kernels at T=300 (not a multiple of the 16-step checkpoint interval),
N=64, bf16/fp16/fp32, with and without an initial state. Error measure: test_ops.ratio (relative rms).
The Gluon 'rows' backward (the GPU default for N <= 64) cannot run in the interpreter: on the CPU it is
compiled for sm_90 (no GPU needed), its maths was checked by a torch emulation; the GPU tests run it
(default config) and the tile backward (explicit configs) against the oracle.
(The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: its bf16 errors are about 2x.)
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_ops import FP32_TOL, GPU_TOL, assert_match, make_inputs, run_op
from trainer.errors import UserError
from trainer.ops import resolve, why_unavailable, wkv
from trainer.ops import triton_wkv7 as tw
from trainer.ops.reference import wkv7_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
RWKV7_MIN_LOGW = -math.exp(-0.5)   # RWKV-7's strongest decay: w = exp(-e^-0.5) = 0.545

# name -> (make_inputs keywords, input dtype, launch config or None for the default)
CASES = {
    "T37_state": (dict(T=37), "float32", None),                                  # B=2, H=2, N=16
    "T16_no_state": (dict(B=1, T=16, state=False), "float32", None),
    "T17_strong_decays": (dict(B=1, T=17, decay="strong"), "float32", None),     # w in [e^-8, e^-4]: replays
    "T21_extreme_decays": (dict(B=1, T=21, decay="extreme"), "float32", None),   # w = e^-40 among slow ones
    "T1": (dict(T=1), "float32", None),
    "T40_strongest_rwkv7_decay": (dict(B=1, T=40, decay="rwkv7_min"), "float32", None),
    "N64_T5": (dict(B=1, T=5, H=1, N=64), "float32", None),
    "N32_two_row_blocks": (dict(B=1, T=21, H=1, N=32), "float32", {"fwd": (8, 1, None), "bwd": (16, 1, None)}),
    "T37_bf16": (dict(B=1, T=37), "bfloat16", None),
    "T20_fp16_no_state": (dict(B=1, T=20, state=False), "float16", None),
}
TOL = {"float32": FP32_TOL, "bfloat16": GPU_TOL[torch.bfloat16], "float16": 5e-3}


def _inputs(kw: dict, dtype: torch.dtype, device="cpu") -> dict:
    kw = dict(kw)
    decay = kw.pop("decay", "normal")
    x = make_inputs(7, decay="normal" if decay == "rwkv7_min" else decay, device=device, **kw)
    if decay == "rwkv7_min":   # every step at the strongest decay: inverting steps loses the most here
        x["logw"] = torch.full_like(x["logw"], RWKV7_MIN_LOGW).requires_grad_()
    # inputs rounded to dtype once, so that the kernel and the fp32 oracle see the same values
    return {n: (t.detach().to(dtype).float().requires_grad_() if t is not None and n != "state" else t)
            for n, t in x.items()}


def _errors(got: dict, ref: dict) -> dict:
    from test_ops import ratio
    return {n: float(got[n].double().square().mean().sqrt()) if not ref[n].any() else ratio(got[n], ref[n])
            for n in ref}


def _run_interpreted_cases() -> dict:
    """In the subprocess: every case through the interpreter; relative errors per output."""
    from triton_interp import patch_interpreter_scalars
    patch_interpreter_scalars()
    torch.set_num_threads(1)
    out = {}
    for name, (kw, dtype_name, config) in CASES.items():
        dtype = getattr(torch, dtype_name)
        x = _inputs(kw, dtype)
        got = run_op(lambda *a: tw.wkv7_triton(*a, config=config), 7, x, dtype=dtype)
        out[name] = _errors(got, run_op(wkv7_reference, 7, x))
    # without gradients the forward saves nothing for the backward (another kernel specialisation)
    x = _inputs(dict(B=1, T=20), torch.float32)
    args = [x[n].detach() for n in ("r", "k", "v", "logw", "a", "b", "state")]
    with torch.no_grad():
        y, s = tw.wkv7_triton(*args)
    y_ref, s_ref = wkv7_reference(*args)
    out["no_grad_forward"] = _errors({"y": y, "state_out": s}, {"y": y_ref, "state_out": s_ref})
    return out


@pytest.fixture(scope="module")
def interpreted():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed (pip install triton): the interpreter tests need it, not a GPU")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES) + ["no_grad_forward"])
def test_interpreted_kernel_matches_oracle(interpreted, case):
    tol = TOL[CASES[case][1]] if case in CASES else FP32_TOL
    errs = interpreted[case]
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < tol}
    assert not bad, f"{case}: relative error above {tol:g} in {bad} (all: { {n: f'{e:.1e}' for n, e in errs.items()} })"
    names = {"y", "state_out"}
    if case in CASES:
        names |= {"dr", "dk", "dv", "dlogw", "da", "db"} | ({"dstate"} if CASES[case][0].get("state", True) else set())
    assert set(errs) == names


# ---------------------------------------------------------------- refusals and registration (no Triton needed)

def test_triton_op_is_registered_and_refuses_the_cpu():
    assert "CUDA" in why_unavailable("triton", "cpu") and "OP=chunk" in why_unavailable("triton", "cpu")
    with pytest.raises(UserError, match="OP=triton"):
        resolve("triton", "cpu")
    x = make_inputs(7, T=4)
    if not tw._interpreting():
        with pytest.raises(UserError, match="CUDA"):
            wkv(x["r"], x["k"], x["v"], x["logw"], a=x["a"], b=x["b"], op="triton")


def test_triton_op_refuses_rwkv6_with_advice():
    x = make_inputs(6, T=4)
    with pytest.raises(UserError, match="only an RWKV-7 kernel; use OP=fla for RWKV-5/6"):
        wkv(x["r"], x["k"], x["v"], x["logw"], u=x["u"], op="triton")


def test_check_reasons(monkeypatch):
    assert tw.check(torch.device("cuda")) in (None, "Triton is not installed: pip install triton")
    monkeypatch.setattr(tw.importlib.util, "find_spec", lambda name: None)
    assert "pip install triton" in tw.check(torch.device("cuda"))


def test_default_config_splits_heads_only_when_there_are_few(monkeypatch):
    monkeypatch.setattr(tw, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tw, "_has_gluon", lambda: False)      # the tile backward's configs
    one_per_head = {"fwd": (64, 2, None), "bwd": (64, 2, None)}
    assert tw.default_config(8, 4096, 64, 64, "cuda") == one_per_head                    # 512 heads
    assert tw.default_config(8, 1024, 12, 64, "cuda") == {"fwd": (16, 1, None), "bwd": (16, 1, None)}  # 96 heads
    assert tw.default_config(8, 4096, 32, 64, "cuda") == {"fwd": (16, 1, None), "bwd": (64, 2, None)}  # 5 GB of sums
    # 64 heads of 32768 tokens: the backward's partial sums would take 10 GiB, so only the forward splits
    assert tw.default_config(1, 32768, 64, 64, "cuda") == {"fwd": (16, 1, None), "bwd": (64, 2, None)}
    assert tw.default_config(4, 100, 64, 128, "cuda")["bwd"] == (64, 4, None)
    assert tw.default_config(1, 10, 1, 16, "cuda")["fwd"] == (16, 1, None)


def test_default_config_takes_the_rows_backward_where_gluon_runs(monkeypatch):
    monkeypatch.setattr(tw, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tw, "_has_gluon", lambda: True)
    monkeypatch.setattr(tw, "_has_cp_async", lambda device: True)          # compute capability >= 8.0
    # measured fastest on an H100 (bench/RESULTS.md, session 10): the rows forward, one head and one thread
    # per row per program with at least as many heads as SMs, else smaller programs; the rows backward with two
    # threads per row
    assert tw.default_config(8, 4096, 64, 64, "cuda") == {"fwd": ("rows", 64, 1), "bwd": ("rows", 2, None)}
    assert tw.default_config(8, 4096, 32, 64, "cuda") == {"fwd": ("rows", 64, 1), "bwd": ("rows", 2, None)}  # 1.5B
    assert tw.default_config(8, 1024, 12, 64, "cuda") == {"fwd": ("rows", 16, 2), "bwd": ("rows", 2, None)}  # 96
    assert tw.default_config(1, 4096, 132, 64, "cuda")["fwd"] == ("rows", 64, 1)     # as many heads as SMs
    assert tw.default_config(1, 4096, 131, 64, "cuda")["fwd"] == ("rows", 16, 2)
    assert tw.default_config(1, 4096, 67, 64, "cuda")["fwd"] == ("rows", 16, 2)
    assert tw.default_config(1, 4096, 66, 64, "cuda")["fwd"] == ("rows", 32, 4)
    assert tw.default_config(1, 1024, 32, 64, "cuda") == {"fwd": ("rows", 32, 4), "bwd": ("rows", 2, None)}
    assert tw.default_config(1, 32768, 64, 64, "cuda") == {"fwd": ("rows", 32, 4), "bwd": ("rows", 2, None)}
    assert tw.default_config(1, 10, 1, 16, "cuda") == {"fwd": ("rows", 8, 4), "bwd": ("rows", 2, None)}
    assert tw.default_config(2, 300, 4, 32, "cuda")["fwd"] == ("rows", 16, 4)
    for heads, n in [(1, 16), (1, 32), (8, 32), (100, 32), (200, 16), (1, 128), (200, 128)]:   # always launchable
        _, bv, tpr = tw.default_config(1, 100, heads, n, "cuda")["fwd"]
        assert n % bv == 0 and bv * tpr % 32 == 0 and 4 * tpr <= n
    assert tw.default_config(4, 100, 64, 128, "cuda") == {"fwd": ("rows", 128, 1), "bwd": (64, 4, None)}  # N 128
    # a GPU without cp.async (Turing, Volta) takes the tile backward the rows one stages its inputs with
    monkeypatch.setattr(tw, "_has_cp_async", lambda device: False)
    assert tw.default_config(8, 4096, 64, 64, "cuda") == {"fwd": (64, 2, None), "bwd": (64, 2, None)}
    assert tw.default_config(1, 1024, 32, 64, "cuda") == {"fwd": (16, 1, None), "bwd": (16, 1, None)}
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # the interpreter cannot run Gluon
    assert tw._has_gluon() is False


def _compile_for_h100(kern, sig: dict, consts: dict, warps: int):
    """A Gluon kernel compiled for sm_90 (no GPU needed), its pointers 16-byte aligned as the launch
    specialises them: the compiled kernel (its PTX in .asm, metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = GluonASTSource(fn=kern, signature=sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _compile_rows_for_h100(N: int, tpr: int):
    """The rows backward compiled for sm_90."""
    P, F = "*bf16", "*fp32"
    sig = dict(r=P, k=P, v=P, logw=F, a=P, b=P, dy=P, dsT=F, sT=F, ckpt=F, sa_buf=F, dr=P, dk=P, dv=P, dlogw=F,
               da=P, db=P, ds0=F, T="i32", NC="i32", H="constexpr", N="constexpr", TPR="constexpr",
               CHUNK="constexpr", LOG_AMP_MAX="constexpr", Q="constexpr")
    consts = dict(H=4, N=N, TPR=tpr, CHUNK=tw.CHUNK, LOG_AMP_MAX=tw.LOG_AMP_MAX, Q=tw._rsum_q(N, tpr))
    return _compile_for_h100(tw._rows_kernel(), sig, consts, N * tpr // 32)


@pytest.mark.parametrize("N", [16, 32, 64])
def test_rows_backward_compiles_for_an_h100(N):
    """No GPU here: compile the Gluon kernel to PTX for sm_90 (layouts, shared memory, types all check)."""
    if not HAS_TRITON or importlib.util.find_spec("triton.experimental.gluon") is None:
        pytest.skip("needs Triton with Gluon (pip install triton)")
    compiled = _compile_rows_for_h100(N, 2)
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx and "bar.sync" in ptx and "cp.async" in ptx
    assert compiled.metadata.num_warps == N * 2 // 32
    # the steps read fp32 from shared memory (bf16 only where a chunk is turned into fp32, 4 at a time)
    assert "ld.shared.b16" not in ptx and "ld.shared.v4.b16" in ptx


def _compile_fwd_rows_for_h100(N: int, bv: int, tpr: int, save: bool):
    """The rows forward compiled for sm_90."""
    P, F = "*bf16", "*fp32"
    sig = dict(r=P, k=P, v=P, logw=F, a=P, b=P, s0=F, y=P, sT=F, ckpt=F, sa_buf=F, T="i32", NC="i32",
               H="constexpr", N="constexpr", BV="constexpr", TPR="constexpr", CHUNK="constexpr", SAVE="constexpr",
               Q="constexpr")
    consts = dict(H=4, N=N, BV=bv, TPR=tpr, CHUNK=tw.CHUNK, SAVE=save, Q=tw._rsum_q(N, tpr))
    return _compile_for_h100(tw._fwd_rows_kernel(), sig, consts, bv * tpr // 32)


@pytest.mark.parametrize("N,bv,tpr,save", [(64, 32, 2, True), (64, 16, 2, False), (64, 64, 1, True),
                                           (32, 8, 4, True), (16, 16, 2, False)])
def test_rows_forward_compiles_for_an_h100(N, bv, tpr, save):
    """The Gluon forward compiled to PTX for sm_90: its inputs arrive by cp.async, its sums stay in a warp."""
    if not HAS_TRITON or importlib.util.find_spec("triton.experimental.gluon") is None:
        pytest.skip("needs Triton with Gluon (pip install triton)")
    compiled = _compile_fwd_rows_for_h100(N, bv, tpr, save)
    ptx = compiled.asm["ptx"]
    assert "cp.async" in ptx and "bar.sync" in ptx
    assert compiled.metadata.num_warps == bv * tpr // 32
    assert ("shfl" in ptx) == (tpr > 1)      # a row's sums cross TPR lanes, never warps (no shared memory)


# ---------------------------------------------------------------- on a GPU

def _gpu_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = why_unavailable("triton", "cuda")
    if reason:
        pytest.skip(reason)


GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# fp32 end to end (no tf32 anywhere): near-oracle; half inputs: the rounding of y and of each gradient
GPU_TOL7 = {torch.bfloat16: GPU_TOL[torch.bfloat16], torch.float16: 5e-3, torch.float32: 2e-5}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("state", [True, False])
def test_triton_matches_oracle_on_gpu(dtype, state):
    _gpu_skip()
    dt = GPU_DTYPES[dtype]
    x = _inputs(dict(B=2, T=300, H=4, N=64, state=state), dt, device="cuda")
    got = run_op(tw.wkv7_triton, 7, x, dtype=dt)
    assert_match(got, run_op(wkv7_reference, 7, x), GPU_TOL7[dt], f"triton {dtype} state={state}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["strongest_rwkv7_decay", "strong_decays", "T1", "N16", "N32_partial_sums",
                                  "N128", "fwd16_bwd32", "tile_N64", "tile_strong_decays", "rows_tpr1",
                                  "rows_tpr4", "rows_N32", "rows_N16_tpr4", "rows_strong_decays", "rows_T1",
                                  "rowsfwd_32x2", "rowsfwd_16x2", "rowsfwd_64x1", "rowsfwd_16x4_strong_decays",
                                  "rowsfwd_N32_8x4", "rowsfwd_N16", "rowsfwd_T1", "rowsfwd_T15", "rowsfwd_tile_bwd",
                                  "rows_T15", "rows_N16", "rows_extreme_decays", "rows_T33_strongest"])
def test_triton_edge_cases_on_gpu(case):
    _gpu_skip()
    kw, config = dict(B=2, T=300, H=4, N=64), None
    if case == "strongest_rwkv7_decay":
        kw["decay"] = "rwkv7_min"
    elif case == "strong_decays":
        kw.update(T=77, decay="strong")
    elif case == "T1":
        kw["T"] = 1
    elif case == "N16":
        kw.update(N=16, H=8)
    elif case == "N32_partial_sums":
        kw.update(N=32)
        config = {"fwd": (32, 1, None), "bwd": (8, 1, None)}
    elif case == "N128":
        kw.update(N=128, H=2, T=100)
    elif case == "fwd16_bwd32":
        config = {"fwd": (16, 1, None), "bwd": (32, 2, None)}
    elif case.startswith("tile_"):     # the tile backward, the default before the rows one
        config = {"fwd": (64, 2, None), "bwd": (64, 2, None)}
        if case == "tile_strong_decays":
            kw.update(T=77, decay="strong")
    elif case.startswith("rowsfwd_"):  # the Gluon rows forward, explicitly (BV rows, TPR threads per row)
        bv, tpr = {"rowsfwd_16x2": (16, 2), "rowsfwd_64x1": (64, 1), "rowsfwd_16x4_strong_decays": (16, 4),
                   "rowsfwd_N32_8x4": (8, 4), "rowsfwd_N16": (16, 2)}.get(case, (32, 2))
        if case == "rowsfwd_16x4_strong_decays":
            kw.update(T=77, decay="strong")
        elif case == "rowsfwd_N32_8x4":
            kw.update(N=32)
        elif case == "rowsfwd_N16":
            kw.update(N=16, H=8)
        elif case == "rowsfwd_T1":
            kw["T"] = 1
        elif case == "rowsfwd_T15":
            kw["T"] = 15
        config = {"fwd": ("rows", bv, tpr),
                  "bwd": (64, 2, None) if case == "rowsfwd_tile_bwd" else ("rows", 2, None)}
    elif case.startswith("rows_"):     # the Gluon rows backward, explicitly
        tpr = {"rows_tpr1": 1, "rows_tpr4": 4, "rows_N16_tpr4": 4}.get(case, 2)
        if case == "rows_N32":
            kw.update(N=32)
        elif case == "rows_N16_tpr4":
            kw.update(N=16, H=8)
        elif case == "rows_strong_decays":
            kw.update(T=77, decay="strong")
        elif case == "rows_extreme_decays":     # w = e^-40 among slow decays: a replay at almost every step
            kw.update(T=77, decay="extreme")
        elif case == "rows_T33_strongest":      # RWKV-7's strongest decay, a partial last chunk
            kw.update(T=33, decay="rwkv7_min")
        elif case == "rows_T1":
            kw["T"] = 1
        elif case == "rows_T15":
            kw["T"] = 15
        elif case == "rows_N16":
            kw.update(N=16, H=8)
        config = {"fwd": (kw.get("N", 64), 2 if kw.get("N", 64) == 64 else 1, None), "bwd": ("rows", tpr, None)}
    x = _inputs(kw, torch.float32, device="cuda")
    got = run_op(lambda *a: tw.wkv7_triton(*a, config=config), 7, x)
    assert_match(got, run_op(wkv7_reference, 7, x), GPU_TOL7[torch.float32], f"triton {case}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_takes_unaligned_views_on_gpu():
    """Inputs that are views starting one element into a buffer (not 16-byte aligned, as cp.async needs):
    the op copies them, forward and backward, and the result is the oracle's."""
    _gpu_skip()
    x = _inputs(dict(B=2, T=50, H=4, N=64), torch.bfloat16, device="cuda")

    def shifted(t):
        return torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view_as(t)

    def fn(r, k, v, logw, a, b, state):
        r, k, v, logw, a, b = (shifted(t) for t in (r, k, v, logw, a, b))
        assert r.data_ptr() % 16 != 0
        return tw.wkv7_triton(r, k, v, logw, a, b, state)

    got = run_op(fn, 7, x, dtype=torch.bfloat16)
    assert_match(got, run_op(wkv7_reference, 7, x), GPU_TOL[torch.bfloat16], "triton on unaligned views")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fwd", [("rows", 32, 2), (16, 1, None)])
def test_triton_forward_without_gradients_on_gpu(fwd):
    """Without gradients the forward saves nothing (another specialisation of each forward kernel)."""
    _gpu_skip()
    x = _inputs(dict(B=2, T=100, H=4, N=64), torch.bfloat16, device="cuda")
    args = [x[n].detach() for n in ("r", "k", "v", "logw", "a", "b", "state")]
    with torch.no_grad():
        y, s = tw.wkv7_triton(*[t.bfloat16() if t.dim() == 4 else t for t in args],
                              config={"fwd": fwd, "bwd": ("rows", 2, None)})
    y_ref, s_ref = wkv7_reference(*args)
    assert_match({"y": y.float(), "state_out": s}, {"y": y_ref, "state_out": s_ref}, GPU_TOL[torch.bfloat16],
                 f"no-grad forward {fwd}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_op_under_bf16_autocast():
    """Training calls the op through wkv() inside bf16 autocast with bf16 inputs and an fp32 decay."""
    _gpu_skip()
    x = _inputs(dict(B=2, T=100, H=4, N=64), torch.bfloat16, device="cuda")
    ref = run_op(wkv7_reference, 7, x)
    leaves = {n: (t.detach().to(torch.bfloat16) if n not in ("state", "logw") else t.detach()).requires_grad_()
              for n, t in x.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, s = wkv(leaves["r"], leaves["k"], leaves["v"], leaves["logw"], a=leaves["a"], b=leaves["b"],
                   state=leaves["state"], op="triton")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    dy, dS = torch.randn(y.shape, generator=g).cuda(), torch.randn(s.shape, generator=g).cuda()
    ((y.float() * dy).sum() + (s * dS).sum()).backward()
    got = {"y": y.float(), "state_out": s}
    got.update({"d" + n: t.grad.float() for n, t in leaves.items()})
    assert leaves["logw"].grad.dtype == torch.float32 and leaves["r"].grad.dtype == torch.bfloat16
    assert_match({n: got[n] for n in ref}, ref, GPU_TOL[torch.bfloat16], "triton under autocast")


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    print(json.dumps(_run_interpreted_cases()))
