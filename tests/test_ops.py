"""The WKV ops against the fp32 oracle (trainer/ops/reference.py), and the oracle against a hand-computed case.

Error measure: rms(x - ref) / rms(ref), the ratio flash-linear-attention's own tests use. A reference
that is exactly zero (d logw with a zero state and T = 1) is compared absolutely (rms of the result,
against the unit scale of the random loss weights): rounding noise only.
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from trainer.errors import UserError
from trainer.ops import fla_ops, resolve, why_unavailable, wkv
from trainer.ops.chunk import LOGW_FLOOR, MAX_RANGE, _chunk_len, wkv6_chunk, wkv7_chunk
from trainer.ops.reference import wkv6_reference, wkv7_reference

FP32_TOL = 1e-5


def ratio(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- the oracle, by hand (N = 2, T = 2)

def test_reference_v6_hand_computed():
    # S0 = [[1,2],[3,4]] (S[value, key]); step 1: r=[1,0] k=[0,1] v=[1,1] w=[.5,.5]; step 2: r=[0,1]
    # k=[1,0] v=[2,0] w=[1,.25]; u=[2,3].
    # y1 = (S0 + v1 (u*k1)^T) r1 = [[1,5],[3,7]] [1,0] = [1,3];  S1 = S0 diag(.5,.5) + v1 k1^T = [[.5,2],[1.5,3]]
    # y2 = (S1 + v2 (u*k2)^T) r2 = [[4.5,2],[1.5,3]] [0,1] = [2,3]; S2 = S1 diag(1,.25) + v2 k2^T = [[2.5,.5],[1.5,.75]]
    t = lambda *x: torch.tensor(x, dtype=torch.float32).reshape(1, 2, 1, 2)  # noqa: E731
    r, k, v = t(1, 0, 0, 1), t(0, 1, 1, 0), t(1, 1, 2, 0)
    logw = t(0.5, 0.5, 1.0, 0.25).log()
    u = torch.tensor([[2.0, 3.0]])
    S0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    for fn in (wkv6_reference, wkv6_chunk):
        y, S = fn(r, k, v, logw, u, S0)
        torch.testing.assert_close(y.reshape(2, 2), torch.tensor([[1.0, 3.0], [2.0, 3.0]]))
        torch.testing.assert_close(S.reshape(2, 2), torch.tensor([[2.5, 0.5], [1.5, 0.75]]))


def test_reference_v7_hand_computed():
    # S0 = [[1,2],[3,4]]. Step 1: w=[.5,.5] a=[1,0] b=[0,1] k=[1,1] v=[1,0] r=[1,1]:
    #   S0 a = [1,3]; S1 = [[.5,1],[1.5,2]] + [[0,1],[0,3]] + [[1,1],[0,0]] = [[1.5,3],[1.5,5]]; y1 = [4.5,6.5]
    # Step 2: w=[1,.5] a=[0,1] b=[1,0] k=[0,1] v=[0,2] r=[0,1]:
    #   S1 a = [3,5]; S2 = [[1.5,1.5],[1.5,2.5]] + [[3,0],[5,0]] + [[0,0],[0,2]] = [[4.5,1.5],[6.5,4.5]]; y2 = [1.5,4.5]
    t = lambda *x: torch.tensor(x, dtype=torch.float32).reshape(1, 2, 1, 2)  # noqa: E731
    r, k, v = t(1, 1, 0, 1), t(1, 1, 0, 1), t(1, 0, 0, 2)
    a, b = t(1, 0, 0, 1), t(0, 1, 1, 0)
    logw = t(0.5, 0.5, 1.0, 0.5).log()
    S0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    for fn in (wkv7_reference, wkv7_chunk):
        y, S = fn(r, k, v, logw, a, b, S0)
        torch.testing.assert_close(y.reshape(2, 2), torch.tensor([[4.5, 6.5], [1.5, 4.5]]))
        torch.testing.assert_close(S.reshape(2, 2), torch.tensor([[4.5, 1.5], [6.5, 4.5]]))


# ---------------------------------------------------------------- inputs

def make_inputs(version: int, B=2, T=37, H=2, N=16, decay="normal", state=True, seed=0,
                dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor | None]:
    """Leaf tensors shaped like the model's: r, k, v, logw [B,T,H,N]; u [H,N] or a, b; state [B,H,N,N]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = {"r": rnd(B, T, H, N), "k": rnd(B, T, H, N) * 0.5, "v": rnd(B, T, H, N)}
    if version == 7:
        x["logw"] = -math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N))
        kk = F.normalize(rnd(B, T, H, N), dim=-1)
        x["a"], x["b"] = -kk, kk * torch.rand(B, T, H, N, generator=g)
    elif version == 6:
        x["logw"] = -torch.exp(rnd(B, T, H, N) * 0.5 - 1.0)
        x["u"] = rnd(H, N) * 0.5
    else:  # RWKV-5: one decay per channel, constant over time
        x["logw"] = -torch.exp(rnd(1, 1, H, N) - 1.0)
        x["u"] = rnd(H, N) * 0.5
    if decay == "down_to_-5":  # RWKV-6's strong end: every step between exp(-5) and 1, fp32 path
        x["logw"] = -5.0 * torch.rand(x["logw"].shape, generator=g)
    elif decay == "strong":    # every step between exp(-8) and exp(-4): the chunk shrinks, float64 inside
        x["logw"] = -4.0 - 4.0 * torch.rand(x["logw"].shape, generator=g)
    elif decay == "extreme":   # decays far below fp32 resolution next to slow ones
        lw = -torch.exp(rnd(*x["logw"].shape) * 2.0)
        x["logw"] = torch.where(torch.rand(lw.shape, generator=g) < 0.2, torch.full_like(lw, -40.0), lw)
    x["state"] = rnd(B, H, N, N) * 0.5 if state else None
    return {n: (t.to(device=device, dtype=torch.float32 if n == "state" else dtype).requires_grad_()
                if t is not None else None) for n, t in x.items()}


def run_op(fn, version: int, x: dict, seed=1, dtype=None):
    """Forward with fresh leaves (optionally cast to ``dtype``), a random linear loss on y and the
    final state, backward. Returns {'y', 'state_out', 'd<name>'...} in float."""
    leaves = {n: (t.detach().clone().to(dtype or t.dtype) if n != "state" else t.detach().clone())
              .requires_grad_() if t is not None else None for n, t in x.items()}
    args = dict(leaves)
    if version == 5:  # the model passes RWKV-5's decay expanded over T
        args["logw"] = args["logw"].expand_as(args["r"])
    if version == 7:
        y, S = fn(args["r"], args["k"], args["v"], args["logw"], args["a"], args["b"], args["state"])
    else:
        y, S = fn(args["r"], args["k"], args["v"], args["logw"], args["u"], args["state"])
    g = torch.Generator().manual_seed(seed)
    dy, dS = torch.randn(y.shape, generator=g).to(y.device), torch.randn(S.shape, generator=g).to(S.device)
    ((y.float() * dy).sum() + (S * dS).sum()).backward()
    out = {"y": y.detach().float(), "state_out": S.detach().float()}
    out.update({"d" + n: t.grad.float() for n, t in leaves.items() if t is not None})
    return out


def assert_match(got: dict, ref: dict, tol: float, what: str):
    assert got.keys() == ref.keys()
    errs = {n: float(got[n].double().square().mean().sqrt()) if not ref[n].any() else ratio(got[n], ref[n]) for n in ref}
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < tol}
    assert not bad, f"{what}: relative error above {tol:g} in {bad} (all: { {n: f'{e:.1e}' for n, e in errs.items()} })"


ORACLE = {5: wkv6_reference, 6: wkv6_reference, 7: wkv7_reference}
CHUNK = {5: wkv6_chunk, 6: wkv6_chunk, 7: wkv7_chunk}


# ---------------------------------------------------------------- chunk vs oracle, fp32

@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("state", [True, False])
def test_chunk_matches_oracle(version, T, state):
    x = make_inputs(version, T=T, state=state)
    assert_match(run_op(CHUNK[version], version, x), run_op(ORACLE[version], version, x), FP32_TOL,
                 f"v{version} T={T} state={state}")


@pytest.mark.parametrize("version", [6, 7])
@pytest.mark.parametrize("decay", ["down_to_-5", "strong", "extreme"])
def test_chunk_matches_oracle_strong_decays(version, decay):
    x = make_inputs(version, T=77, decay=decay)
    assert_match(run_op(CHUNK[version], version, x), run_op(ORACLE[version], version, x), FP32_TOL,
                 f"v{version} {decay} decays")


@pytest.mark.parametrize("version", [6, 7])
def test_chunk_matches_oracle_head_size_64(version):
    x = make_inputs(version, B=1, T=70, H=2, N=64)
    assert_match(run_op(CHUNK[version], version, x), run_op(ORACLE[version], version, x), FP32_TOL,
                 f"v{version} N=64")


@pytest.mark.parametrize("version", [6, 7])
@pytest.mark.parametrize("chunk_size", [3, 16, 64])
def test_chunk_any_chunk_size(version, chunk_size):
    x = make_inputs(version, T=45)
    fn = CHUNK[version]
    got = run_op(lambda *a: fn(*a, chunk_size=chunk_size), version, x)
    assert_match(got, run_op(ORACLE[version], version, x), FP32_TOL, f"v{version} chunk_size={chunk_size}")


def test_chunk_len_keeps_exponents_in_range():
    T = 256
    mild = torch.full((1, T, 1, 4), -0.6)
    fp32, fp64 = MAX_RANGE[torch.float32], MAX_RANGE[torch.float64]
    assert _chunk_len(mild, T, 32, fp32) == 32
    assert _chunk_len(mild[:, :10], 10, 32, fp32) == 10
    strong = torch.full((1, T, 1, 4), -5.0)
    assert _chunk_len(strong, T, 32, fp32) == 16
    floored = torch.full((1, T, 1, 4), LOGW_FLOOR)
    assert _chunk_len(floored, T, 32, fp32) == 8
    assert _chunk_len(floored, T, 64, fp64) == 64 and _chunk_len(floored, T, 128, fp64) == 64


@pytest.mark.parametrize("version", [6, 7])
def test_chunk_gradcheck_float64(version):
    """Exact gradients, independent of the oracle: finite differences in float64, 3 chunks of 2 (padded)."""
    x = make_inputs(version, B=1, T=5, H=1, N=2, dtype=torch.float64)
    names = ["r", "k", "v", "logw", "a", "b"] if version == 7 else ["r", "k", "v", "logw", "u"]
    leaves = [x[n].detach().double().requires_grad_() for n in names]
    state = x["state"].detach().double().requires_grad_()
    fn = CHUNK[version]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, chunk_size=2), (*leaves, state), eps=1e-6, atol=1e-7)


def test_chunk_keeps_input_dtype_and_state_fp32():
    x = make_inputs(6, T=20, dtype=torch.bfloat16)
    y, S = wkv6_chunk(x["r"], x["k"], x["v"], x["logw"], x["u"], x["state"])
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32


def test_wkv_dispatch_uses_chunk():
    x = make_inputs(7, T=20)
    args = (x["r"], x["k"], x["v"], x["logw"])
    y1, s1 = wkv(*args, a=x["a"], b=x["b"], state=x["state"], op="chunk")
    y2, s2 = wkv7_chunk(*args, x["a"], x["b"], x["state"])
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


# ---------------------------------------------------------------- choosing an op

def test_resolve_auto_on_cpu_is_chunk():
    assert resolve("auto", "cpu") == "chunk"
    assert resolve("torch", "cpu") == "torch"
    assert resolve("chunk", "cpu") == "chunk"


@pytest.mark.parametrize("op", ["fla", "rwkvfla", "cuda_kernel"])
def test_resolve_refuses_what_cannot_run_on_cpu(op):
    with pytest.raises(UserError) as err:
        resolve(op, "cpu")
    assert f"OP={op}" in str(err.value)


def test_fla_on_cpu_is_a_user_error_even_when_called_directly():
    x = make_inputs(6, T=4)
    with pytest.raises(UserError, match="CUDA"):
        wkv(x["r"], x["k"], x["v"], x["logw"], u=x["u"], op="fla")


def test_fla_check_reasons(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(fla_ops, "_has_module", lambda name: True)
    monkeypatch.setattr(fla_ops, "_installed", lambda: {"fla-core": True, "rwkv-fla": True})
    for check in (fla_ops.check_fla, fla_ops.check_rwkvfla):
        assert "both fla-core and rwkv-fla" in check(cuda)
    monkeypatch.setattr(fla_ops, "_installed", lambda: {"fla-core": False, "rwkv-fla": False})
    assert "pip install fla-core" in fla_ops.check_fla(cuda)
    assert "pip install rwkv-fla" in fla_ops.check_rwkvfla(cuda)
    monkeypatch.setattr(fla_ops, "_installed", lambda: {"fla-core": False, "rwkv-fla": True})
    assert "OP=rwkvfla" in fla_ops.check_fla(cuda)
    monkeypatch.setattr(fla_ops, "_triton_at_least", lambda *v: False)
    assert fla_ops.check_rwkvfla(cuda) is None
    monkeypatch.setattr(fla_ops, "_triton_at_least", lambda *v: True)
    assert "Triton 3.9" in fla_ops.check_rwkvfla(cuda)
    monkeypatch.setattr(fla_ops, "_installed", lambda: {"fla-core": True, "rwkv-fla": False})
    assert fla_ops.check_fla(cuda) is None
    assert "CUDA" in fla_ops.check_fla(torch.device("cpu"))


# ---------------------------------------------------------------- fla wrappers on CPU, with fake kernels
# Fake kernels with the exact signatures and conventions of fla-core 0.6.0 / rwkv-fla 0.7 (states
# [B,H,K,V], q scaled by `scale`, rwkv6's default scale 1/sqrt(K), w / log_w the log decay), computed
# by the oracle: they check our layout conversions, keywords and gradient paths without a GPU.

def _fla_state_in(h0):
    return None if h0 is None else h0.transpose(-1, -2)


def _fake_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                cu_seqlens=None, cu_seqlens_cpu=None, safe_gate=False, chunk_size=None,
                disable_recompute=False, cp_context=None, lower_bound=None):
    if lower_bound is not None:
        assert bool((w >= lower_bound).all()), "lower_bound promised but violated"
    _fake_rwkv7.calls.append(dict(safe_gate=safe_gate, lower_bound=lower_bound, chunk_size=chunk_size))
    o, S = wkv7_reference(r * scale, k, v, w, a, b, _fla_state_in(initial_state))
    return o, (S.transpose(-1, -2) if output_final_state else None)


def _fake_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    o, S = wkv6_reference(r * scale, k, v, w, u, _fla_state_in(initial_state))
    return o, (S.transpose(-1, -2) if output_final_state else None)


def _fake_rwkvfla_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None,
                        output_final_state=True, cu_seqlens=None, head_first=False):
    if w is not None:
        log_w = -torch.exp(w)
    o, S = wkv7_reference(r * scale, k, v, log_w, a, b, _fla_state_in(initial_state))
    return o, (S.transpose(-1, -2) if output_final_state else None)


def _fake_rwkvfla_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, head_first=False):
    return _fake_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)


@pytest.fixture
def fake_fla(monkeypatch):
    for root, f7, f6 in (("fla", _fake_rwkv7, _fake_rwkv6),
                         ("rwkvfla", _fake_rwkvfla_rwkv7, _fake_rwkvfla_rwkv6)):
        for name in (root, root + ".ops"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        m7, m6 = types.ModuleType(root + ".ops.rwkv7"), types.ModuleType(root + ".ops.rwkv6")
        m7.chunk_rwkv7, m6.chunk_rwkv6 = f7, f6
        monkeypatch.setitem(sys.modules, root + ".ops.rwkv7", m7)
        monkeypatch.setitem(sys.modules, root + ".ops.rwkv6", m6)
    monkeypatch.setattr(fla_ops, "check_fla", lambda device: None)
    monkeypatch.setattr(fla_ops, "check_rwkvfla", lambda device: None)
    _fake_rwkv7.calls = []
    return _fake_rwkv7.calls


@pytest.mark.parametrize("op", ["fla", "rwkvfla"])
@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("state", [True, False])
def test_fla_wrappers_convert_layouts(fake_fla, op, version, state):
    x = make_inputs(version, T=21, state=state)
    fns = {"fla": (fla_ops.wkv7_fla, fla_ops.wkv6_fla), "rwkvfla": (fla_ops.wkv7_rwkvfla, fla_ops.wkv6_rwkvfla)}
    fn = fns[op][0] if version == 7 else fns[op][1]
    assert_match(run_op(fn, version, x), run_op(ORACLE[version], version, x), FP32_TOL, f"{op} v{version}")


@pytest.mark.parametrize("op", ["fla", "rwkvfla"])
def test_fla_wrappers_return_our_dtypes(fake_fla, op):
    x = make_inputs(7, T=5, dtype=torch.bfloat16)
    fn = fla_ops.wkv7_fla if op == "fla" else fla_ops.wkv7_rwkvfla
    y, S = fn(x["r"], x["k"], x["v"], x["logw"], x["a"], x["b"], x["state"])
    assert y.dtype == torch.bfloat16 and y.shape == x["r"].shape
    assert S.dtype == torch.float32 and S.shape == x["state"].shape and S.is_contiguous()


def test_fla_rwkv7_safe_gate_only_within_bound(fake_fla):
    x = make_inputs(7, T=9)
    run_op(fla_ops.wkv7_fla, 7, x)
    assert fake_fla[-1] == dict(safe_gate=True, lower_bound=fla_ops.RWKV7_LOWER_BOUND, chunk_size=64)
    x = make_inputs(7, T=9, decay="strong")
    run_op(fla_ops.wkv7_fla, 7, x)
    assert fake_fla[-1] == dict(safe_gate=False, lower_bound=None, chunk_size=None)


# ---------------------------------------------------------------- fla on a GPU (skipped without one)
# Tolerances: fla's own tests allow 0.004-0.008 (fp16, same relative-rms measure); bf16 keeps 3 fewer
# mantissa bits, fp32 runs through tf32 tensor-core products.
GPU_TOL = {torch.bfloat16: 1e-2, torch.float32: 5e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["fla", "rwkvfla"])
@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("state", [True, False])
def test_fla_matches_oracle_on_gpu(op, version, dtype, state):
    reason = why_unavailable(op, "cuda")
    if reason:
        pytest.skip(reason)
    fns = {"fla": (fla_ops.wkv7_fla, fla_ops.wkv6_fla), "rwkvfla": (fla_ops.wkv7_rwkvfla, fla_ops.wkv6_rwkvfla)}
    fn = fns[op][0] if version == 7 else fns[op][1]
    # values rounded to dtype once, so kernel and oracle see the same inputs; the oracle works in fp32
    x = make_inputs(version, B=2, T=300, H=4, N=64, state=state, device="cuda")
    x = {n: (t.detach().to(dtype).float().requires_grad_() if t is not None and n != "state" else t)
         for n, t in x.items()}
    ref = run_op(ORACLE[version], version, x)
    got = run_op(fn, version, x, dtype=dtype)
    assert_match(got, ref, GPU_TOL[dtype], f"{op} v{version} {dtype} state={state}")


@pytest.mark.parametrize("version", [6, 7])
@pytest.mark.parametrize("op", ["torch", "chunk"])
def test_ops_keep_their_precision_under_bf16_autocast(op, version):
    """Training runs under bf16 autocast: the CPU ops must still compute in fp32 inside (the chunk op's
    triangular solve has no bf16 kernel at all) and give the fp32 result."""
    from trainer.ops import wkv
    x = make_inputs(version, B=1, T=40, H=2, N=16, state=True)
    kw = dict(a=x["a"], b=x["b"]) if version == 7 else dict(u=x["u"])
    want, want_s = wkv(x["r"], x["k"], x["v"], x["logw"], state=x["state"], op=op, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_s = wkv(x["r"], x["k"], x["v"], x["logw"], state=x["state"], op=op, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)


def test_auto_prefers_our_triton_kernel_for_rwkv7_on_a_gpu(monkeypatch):
    """OP=auto on CUDA: triton for RWKV-7 (faster, compiles in seconds), fla for RWKV-5/6; an explicit
    OP=triton on an RWKV-6 model is refused with the fix."""
    import trainer.ops as ops_mod
    monkeypatch.setattr(ops_mod, "why_unavailable", lambda name, device: None)
    assert ops_mod.resolve("auto", "cuda", 7) == "triton"
    assert ops_mod.resolve("auto", "cuda", 6) == "fla"
    assert ops_mod.resolve("auto", "cuda", 5) == "fla"
    with pytest.raises(UserError) as e:
        ops_mod.resolve("triton", "cuda", 6)
    assert "RWKV-6" in e.value.message and "OP=auto" in e.value.fix
    monkeypatch.setattr(ops_mod, "why_unavailable", lambda name, device: "missing" if name == "triton" else None)
    assert ops_mod.resolve("auto", "cuda", 7) == "fla"
