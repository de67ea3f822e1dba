"""QUANT=int8|nf4|fp8 (trainer/quant.py).

CPU, no bitsandbytes needed (the quantisation maths is pure torch):
  - nf4 / int8 codes and scales against a slow per-block / per-row reference, bounds of the error,
    padding, zero blocks, re-quantising a dequantised weight gives the same codes (resume relies on it);
  - the quantised matmul: same output and input gradient as F.linear with the dequantised weight, under
    autocast too, and it keeps no weight-sized tensor for the backward;
  - for lora, dora, pissa, bone, miss, bat, state × int8, nf4 × RWKV-5/6/7 on a tiny random model: storage bytes,
    no quantised key left in the state dict, two optimizer steps change only the adapter, the loss and
    logits stay within the stated distance of the unquantised model, ``dequantised_base`` + the method's
    merge gives the quantised model's logits, a PiSSA resume (load_adapter after quantisation) is exact;
  - refusals: full fine-tuning, no GPU, bitsandbytes missing (faked by hiding the module), twice.
With bitsandbytes installed (CPU or GPU): our codes, scales and dequantised weights equal bitsandbytes'.
GPU (``-m gpu``, skipped without CUDA and bitsandbytes): the same method × quant table on CUDA in bf16 with
bnb's dequantisation kernel under bf16 autocast, plus memory measured with torch.cuda.memory_allocated.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.rwkv_ref import random_model
from trainer import quant as Q
from trainer.errors import UserError
from trainer.model import RWKV
from trainer.peft import get_method
from trainer.peft.base import TARGET_RE

from test_peft import SETTINGS as PEFT_SETTINGS

# every adapter method's tiny settings from test_peft, without full fine-tuning (which cannot be quantised)
SETTINGS = {m: s for m, s in PEFT_SETTINGS.items() if m != "full"}
METHODS = tuple(SETTINGS)
N_LAYER, N_EMBD, VOCAB = 2, 128, 256

# Relative RMS error of the logits of the quantised model against the same model unquantised (fp32), on
# the tiny random models here. Why these numbers: nf4 stores each weight with a relative RMS error of about
# 9 % for Gaussian weights (its 16 levels over ±absmax of a block of 64; checked below, NF4_WEIGHT_ERR),
# int8 about 0.75 % (255 levels over ±absmax of a row), fp8 about 2.6 % (e4m3 keeps 3 bits of mantissa: each
# weight rounded by up to 1/16 of itself, whatever its size). Every block output is such a product, added to the
# residual stream that also carries the unquantised embedding, and the head is not quantised, so the logits
# move by at most about the weights' relative error: the bounds are that error, rounded up (measured on
# RWKV-5/6/7 here: nf4 0.035-0.064, int8 0.003-0.005, fp8 0.011-0.016).
LOGIT_BOUND = {"nf4": 0.10, "int8": 0.01, "fp8": 0.03}
# The loss moves far less than the logits: the error is noise uncorrelated with the gradient of the loss
# (p − onehot), so it cancels to first order over positions. Measured: nf4 ≤ 0.004, int8 ≤ 0.0002, fp8 ≤ 0.0008
# relative; the bounds are 2.5-5× that.
LOSS_BOUND = {"nf4": 0.01, "int8": 0.001, "fp8": 0.003}


def assert_only_trained_changed(before: dict, after: dict, trained: set, version: int) -> None:
    """Every trained tensor moved (but RWKV-7 layer 0's unused v0/v1/v2), every other one is bit-identical."""
    for k in after:
        if k in trained:
            assert not torch.equal(after[k], before[k]) or (version == 7 and k.startswith("blocks.0.att.v")), k
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed"


# ------------------------------------------------------------------------------------------ the formats
def nf4_reference(w: torch.Tensor):
    """Block by block, as written in the format's description: nearest level to w / absmax."""
    levels = torch.tensor(Q.NF4_LEVELS)
    flat = w.to(torch.bfloat16).float().reshape(-1)
    flat = torch.cat([flat, torch.zeros((-flat.numel()) % 64)])
    codes, absmax = [], []
    for block in flat.view(-1, 64):
        a = block.abs().max()
        absmax.append(a)
        for x in block:
            codes.append(int(torch.argmin((x / a - levels).abs())) if a > 0 else 7)
    codes = torch.tensor(codes, dtype=torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], torch.stack(absmax)


def test_nf4_codes_against_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 50, generator=g) * 0.1            # 300 weights: 4 full blocks and a padded one
    w[0, :] = 0.0                                          # part of a block all zero... not a whole block
    w.view(-1)[64:128] = 0.0                               # ...and a whole zero block
    codes, absmax = Q.quantize_weight(w, "nf4")
    ref_codes, ref_absmax = nf4_reference(w)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    d = Q.dequantize_weight(codes, absmax, (6, 50), "nf4")
    assert d.dtype == torch.bfloat16 and d.shape == (6, 50)
    assert torch.equal(d.reshape(-1)[64:128].float(), torch.zeros(64))
    # each weight is within half the widest gap between levels (1 − 0.7230) of its block's absmax (+ bf16)
    per = torch.cat([absmax.repeat_interleave(64)])[:300].view(6, 50)
    wb = w.to(torch.bfloat16).float()
    assert ((d.float() - wb).abs() <= 0.1386 * per + 2 ** -8 * wb.abs() + 1e-12).all()
    # the block maximum is stored exactly (its code is ±1)
    assert torch.equal(d.float().abs().reshape(-1)[:64].max(), absmax[0])


def test_int8_codes_against_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 40, generator=g)
    w[2] = 0.0
    codes, rowmax = Q.quantize_weight(w, "int8")
    wb = w.to(torch.bfloat16).float()
    for i in range(5):
        m = wb[i].abs().max()
        assert rowmax[i] == m
        want = torch.round(wb[i] * (127.0 / m)) if m > 0 else torch.zeros(40)
        assert torch.equal(codes[i].float(), want)
    d = Q.dequantize_weight(codes, rowmax, (5, 40), "int8")
    assert torch.equal(d[2].float(), torch.zeros(40))
    assert ((d.float() - wb).abs() <= rowmax[:, None] / 254 + 2 ** -8 * wb.abs() + 1e-12).all()


def test_fp8_codes_against_reference():
    """One scale per row (absmax / 448: the row's largest weight is e4m3's largest number), each weight w / scale
    rounded to the nearest e4m3 (PyTorch's conversion), stored as its byte; dequantised: code × scale in fp32,
    then bf16. A zero row has scale 1/448 and zero codes."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 48, generator=g) * 0.04
    w[2] = 0.0
    codes, scale = Q.quantize_weight(w, "fp8")
    assert codes.dtype == torch.uint8 and codes.shape == (5, 48) and scale.dtype == torch.float32
    wb = w.to(torch.bfloat16).float()
    for i in range(5):
        m = wb[i].abs().max()
        want_scale = (m if m > 0 else torch.tensor(1.0)) / 448.0
        assert scale[i] == want_scale
        assert torch.equal(codes[i].view(torch.float8_e4m3fn).float(), (wb[i] / want_scale).to(torch.float8_e4m3fn).float())
    d = Q.dequantize_weight(codes, scale, (5, 48), "fp8")
    assert torch.equal(d[2].float(), torch.zeros(48))
    assert torch.equal(d.float().abs().amax(dim=1), wb.abs().amax(dim=1))           # the row maximum is exact
    # e4m3 rounds to 3 bits of mantissa: within 1/16 of the weight (and 2^-10 scale near zero), then bf16's 2^-9
    assert ((d.float() - wb).abs() <= wb.abs() / 16 + scale[:, None] * 2 ** -9 + 2 ** -8 * wb.abs() + 1e-12).all()


FP8_PRODUCT_ERR = 0.035       # relative error of an fp8 × fp8 product against the dequantised weight's product


def test_fp8_product_and_its_gradient():
    """QUANT=fp8's forward on an fp8 GPU (``_fp8_mm``; PyTorch runs the same product on the CPU, so it is checked
    here): x Wᵀ with x rounded to e4m3 per row, against x Wᵀ with the dequantised W: within the activations'
    rounding. Its backward is exactly the dequantised weight's (gradients are not rounded to fp8); compiled, the
    same numbers."""
    lin, ql = _layer("fp8")
    w = ql.dequantised().float()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = Q._fp8_mm(x, ql.qweight, ql.qscale, 96, 128)
    ref = F.linear(x, w)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert 0.005 < rel(y, ref) < FP8_PRODUCT_ERR, rel(y, ref)
    # by hand: the activation's rows rounded to e4m3 with their own scales, the weight as stored
    sx = x.detach().reshape(-1, 128).abs().amax(dim=1, keepdim=True) / 448
    x8 = (x.detach().reshape(-1, 128) / sx).to(torch.float8_e4m3fn).float() * sx
    assert rel(y.detach().reshape(-1, 96), x8 @ w.t()) < 4e-3          # bf16's rounding of the output
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g @ w)
    compiled = torch.compile(lambda a: Q._fp8_mm(a, ql.qweight, ql.qscale, 96, 128), backend="aot_eager")
    assert torch.equal(compiled(x), y)


def test_fp8_refused_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 6))
    with pytest.raises(UserError, match=r"QUANT=fp8: this GPU \(NVIDIA GeForce RTX 3090, compute capability 8.6\) "
                                        r"has no fp8 tensor cores") as err:
        Q.check_quant("fp8", "lora", "cuda")
    assert "QUANT=int8" in err.value.fix
    with pytest.raises(UserError, match="NVIDIA GPU with fp8 tensor cores"):
        Q.check_quant("fp8", "lora", "cpu")


@pytest.mark.parametrize("quant", Q.QUANTS)
def test_requantising_is_exact(quant):
    """quantise(dequantise(quantise(W))) = quantise(W): a PiSSA resume re-quantises the dequantised residual."""
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(2)) * 0.03
    c, s = Q.quantize_weight(w, quant)
    c2, s2 = Q.quantize_weight(Q.dequantize_weight(c, s, (64, 192), quant), quant)
    assert torch.equal(c, c2) and torch.equal(s, s2)


NF4_WEIGHT_ERR, INT8_WEIGHT_ERR, FP8_WEIGHT_ERR = 0.095, 0.0080, 0.027


def test_weight_error_of_gaussian_weights():
    """The per-weight relative RMS errors the logit bounds above start from."""
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    for quant, bound in (("nf4", NF4_WEIGHT_ERR), ("int8", INT8_WEIGHT_ERR), ("fp8", FP8_WEIGHT_ERR)):
        c, s = Q.quantize_weight(w, quant)
        err = ((Q.dequantize_weight(c, s, (512, 512), quant).float() - w).norm() / w.norm()).item()
        assert bound * 0.8 < err < bound, (quant, err)


def test_bytes_per_weight():
    assert Q.bytes_per_weight("none") == 2.0
    assert Q.bytes_per_weight("nf4") == 0.5625
    assert Q.bytes_per_weight("int8", 4096) == 1 + 4 / 4096


# ------------------------------------------------------------------------------------------ the matmul
def _layer(quant, out_f=96, in_f=128, seed=4):
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05)
    lin.weight.requires_grad_(False)
    return lin, Q.QuantLinear(lin, quant)


@pytest.mark.parametrize("quant", Q.QUANTS)
def test_quant_matmul_output_and_gradient(quant):
    lin, ql = _layer(quant)
    w = ql.dequantised().float()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = ql(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    # under bf16 autocast: the product in bf16, like F.linear there; the gradient reaches x in x's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = ql(x)
        yb2 = F.linear(x, w)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, yb2)
    (gxb,) = torch.autograd.grad(yb, x, g.to(torch.bfloat16))
    assert gxb.dtype == torch.float32
    torch.testing.assert_close(gxb, (g.to(torch.bfloat16) @ w.to(torch.bfloat16)).float())


@pytest.mark.parametrize("quant", Q.QUANTS)
def test_quant_matmul_keeps_no_weight_for_backward(quant):
    """The backward keeps the layer's own codes and scales (references, no copy), never a weight."""
    lin, ql = _layer(quant, out_f=256, in_f=256)
    saved = []
    own = {ql.qweight.data_ptr(), ql.qscale.data_ptr()}

    def pack(t):
        saved.append(0 if t.data_ptr() in own else t.numel())
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ql(x).sum().backward()
    assert max(saved, default=0) < 256 * 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(x, lin.weight.float()).sum()            # plain F.linear keeps its weight
    assert max(saved) == 256 * 256


# ------------------------------------------------------------------------------------------ models
def plain_from(version: int, sd: dict, dtype=torch.float32, device="cpu") -> RWKV:
    model = random_model(version, N_LAYER, N_EMBD, VOCAB)
    for k, v in sd.items():
        if k.endswith(".time_state"):
            model.get_submodule(k[: -len(".time_state")]).time_state = nn.Parameter(v.clone().float())
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def tokens(seed: int, B: int = 2, T: int = 8, device="cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def loss_of(model, idx) -> torch.Tensor:
    logits = model(idx[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build(method_name, version, quant, device="cpu", dtype=torch.float32, seed=0):
    """(base_sd, quantised adapted model, method, report): the trainer's order -- apply, quantise, fp32 cast."""
    base = random_model(version, N_LAYER, N_EMBD, VOCAB).to(device=device, dtype=dtype)
    base_sd = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    torch.manual_seed(seed)
    method = get_method(method_name)(SETTINGS[method_name])
    method.apply(base, train_parts=())
    report = Q.quantize_model(base, quant)
    for p in base.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return base_sd, base.eval(), method, report


def train_steps(model, n=2, lr=1e-2, device="cpu", autocast_dtype=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for i in range(n):
        idx = tokens(100 + i, device=device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = loss_of(model, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def snapshot(model) -> dict:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def merged_model(method, base_sd, adapter, quant, version, dtype=torch.float32, device="cpu") -> RWKV:
    settings = method.metadata()
    merged = type(method).merge(Q.dequantised_base(base_sd, quant, adapter), adapter, settings)
    return plain_from(version, {k: v for k, v in merged.items()}, dtype=dtype, device=device)


CASES = [(m, q, v) for m in METHODS for q in Q.QUANTS for v in (5, 6, 7)]


@pytest.mark.parametrize("method_name,quant,version", CASES)
def test_method_with_quant_cpu(method_name, quant, version):
    base_sd, model, method, report = build(method_name, version, quant)
    qmods = Q.quantised_modules(model)
    targets = [n for n, _ in random_model(version, N_LAYER, N_EMBD, VOCAB).named_modules() if TARGET_RE.match(n)]
    assert sorted(qmods) == sorted(targets)
    # storage: exactly the format's bytes; nothing of it in the state dict, no quantised weight is a parameter
    weights = sum(base_sd[n + ".weight"].numel() for n in targets)
    rows = sum(base_sd[n + ".weight"].shape[0] for n in targets)
    want = weights * 0.5625 if quant == "nf4" else weights + 4 * rows
    assert (report.layers, report.weights, report.bf16_bytes, report.quantised_bytes) == \
        (len(targets), weights, 2 * weights, want)
    keys = set(model.state_dict())
    assert not any(n + ".weight" in keys or n + ".qweight" in keys for n in targets)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(method.trainable_names(model))
    for m in qmods.values():                    # adapted layers keep their method's class (PiSSA relies on it)
        original = type(m).__bases__[-1]
        assert isinstance(m, Q.QuantLinear) if method_name == "state" else \
            (type(m).__name__ == "Quant" + original.__name__ and isinstance(m, original))

    # at init: the quantised model is the unquantised one up to the format's error
    idx = tokens(1)
    ref = plain_from(version, base_sd)
    with torch.no_grad():
        logits_q, logits = model(idx), ref(idx)
        assert rel(logits_q, logits) < LOGIT_BOUND[quant]
        lq, l0 = loss_of(model, idx).item(), loss_of(ref, idx).item()
        assert abs(lq - l0) / l0 < LOSS_BOUND[quant]

    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    assert_only_trained_changed(before, after, set(method.trainable_names(model)), version)

    # merge on the base file + dequantised_base gives the trained quantised model
    adapter = {k: v.detach().clone() for k, v in method.adapter_state_dict(model).items()}
    merged = merged_model(method, base_sd, adapter, quant, version)
    with torch.no_grad():
        out_q, out_m = model(tokens(2)), merged(tokens(2))
    assert rel(out_m, out_q) < 1e-5
    # dequantised_base leaves every other tensor as it was (the same objects)
    dq = Q.dequantised_base(base_sd, quant, adapter)
    for k, v in base_sd.items():
        if k[: -len(".weight")] in qmods:
            assert dq[k].dtype == torch.float32 and not torch.equal(dq[k], v)
        else:
            assert dq[k] is v


def _assert_trained_then_resumed(mode, quant, model, method, seed):
    """A few training steps, then the adapter loaded into a fresh quantised model of another seed (as the loop
    resumes: load_adapter after quantisation): exactly the trained model."""
    train_steps(model)
    adapter = {k: v.detach().clone() for k, v in method.adapter_state_dict(model).items()}
    _, fresh, method2, _ = build(mode, 7, quant, seed=seed)
    method2.load_adapter(fresh, adapter)
    with torch.no_grad():
        assert torch.equal(fresh(tokens(3)), model(tokens(3)))


@pytest.mark.parametrize("quant", Q.QUANTS)
def test_pissa_resume_after_quantisation(quant):
    """The loop loads a saved adapter after prepare(): PiSSA then rebuilds its residual through ``weight``
    (the dequantised one) and ``set_residual`` (re-quantised): the model is the one that was saved."""
    base_sd, model, method, _ = build("pissa", 7, quant)
    _assert_trained_then_resumed("pissa", quant, model, method, seed=0)
    # (exact because the run's SVD is the saved one: the loop seeds it with SEED. A run whose SVD differed
    # would rebuild the residual from an already quantised one and carry the format's error twice.)


@pytest.mark.parametrize("quant", Q.QUANTS)
def test_dora_norms_follow_the_quantised_weight(quant):
    """DoRA with QUANT: once quantised, each layer's n = ‖W + s·B A‖ is the dequantised weight's (base_changed), m
    the norms of the weights as loaded: at the start out = (‖W‖ / ‖Wq‖) ⊙ Wq x, each quantised row rescaled to
    its original norm. A resume (load_adapter after quantisation, as the loop does) gives the saved model."""
    base_sd, model, method, _ = build("dora", 7, quant)
    name = "blocks.1.ffn.key"
    layer = model.get_submodule(name)
    wq = layer.base_weight().float()
    w = base_sd[name + ".weight"].float()
    torch.testing.assert_close(layer.row_norm(torch.float32), wq.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.dora_magnitude.detach(), w.norm(dim=1), rtol=1e-6, atol=0)
    x = torch.randn(3, N_EMBD)
    with torch.no_grad():
        want = F.linear(x, wq * (w.norm(dim=1) / wq.norm(dim=1))[:, None])
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    _assert_trained_then_resumed("dora", quant, model, method, seed=1)


def test_dequantised_base_pissa_needs_the_adapter():
    """Without the adapter a PiSSA merge would start from quantise(W), not quantise(W − B0 A0): different."""
    base_sd, model, method, _ = build("pissa", 6, "nf4")
    adapter = {k: v.detach().clone() for k, v in method.adapter_state_dict(model).items()}
    k = "blocks.0.att.key.weight"
    with_a = Q.dequantised_base(base_sd, "nf4", adapter)[k]
    without = Q.dequantised_base(base_sd, "nf4", {})[k]
    assert not torch.equal(with_a, without)
    assert Q.dequantised_base(base_sd, "none") is base_sd
    with pytest.raises(UserError, match="QUANT=nf4; its base cannot be rebuilt without the checkpoint's tensors"):
        Q.dequantised_base(base_sd, "nf4")              # a caller that forgot the tensors is refused


# ------------------------------------------------------------------------------------------ refusals
def test_refusals():
    with pytest.raises(UserError, match="full fine-tuning"):
        Q.check_quant("nf4", "full")
    with pytest.raises(UserError, match="not one of"):
        Q.check_quant("fp4", "lora")
    Q.check_quant("none", "full", "cpu")                      # nothing to check
    with pytest.raises(UserError, match="NVIDIA GPU") as err:
        Q.check_quant("int8", "lora", "cpu")
    assert "QUANT=none" in err.value.fix
    assert Q.quant_unavailable_reason("cpu") == "quantisation needs an NVIDIA GPU (bitsandbytes)"
    # full fine-tuning reaching quantize_model anyway
    model = random_model(7, N_LAYER, N_EMBD, VOCAB)
    get_method("full")({}).apply(model)
    with pytest.raises(UserError, match="cannot be"):
        Q.quantize_model(model, "int8")
    # twice
    model = random_model(7, N_LAYER, N_EMBD, VOCAB)
    get_method("lora")(SETTINGS["lora"]).apply(model)
    Q.quantize_model(model, "int8")
    with pytest.raises(ValueError, match="twice"):
        Q.quantize_model(model, "int8")
    assert Q.quantize_model(model, "none") is None


def test_refusal_without_bitsandbytes(monkeypatch):
    """A CUDA machine without bitsandbytes (faked: CUDA reported present, the module hidden)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)        # import raises ImportError
    why = Q.quant_unavailable_reason("cuda", "nf4")
    assert "pip install bitsandbytes" in why and "not installed" in why
    with pytest.raises(UserError, match="bitsandbytes package") as err:
        Q.check_quant("nf4", "lora", "cuda")
    assert "pip install bitsandbytes" in err.value.fix
    assert err.value.message.count("QUANT=nf4") == 1 and "pip install" not in err.value.message, err.value.message
    assert Q.quant_unavailable_reason("cuda", "int8") is None     # int8 is plain torch
    Q.check_quant("int8", "state", "cuda")


def test_refusal_broken_bitsandbytes(monkeypatch, failing_import):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    failing_import("bitsandbytes", RuntimeError("CUDA Setup failed"))
    assert "does not load (RuntimeError: CUDA Setup failed)" in Q.quant_unavailable_reason("cuda", "nf4")


# ------------------------------------------------------------------------------------------ bitsandbytes
def test_formats_equal_bitsandbytes():
    """Our codes, scales and dequantised weights are bitsandbytes' own (its reference backend on the CPU,
    its CUDA kernels' format). Runs wherever bitsandbytes is installed."""
    bnb = pytest.importorskip("bitsandbytes")
    BF = bnb.functional
    w = (torch.randn(256, 320, generator=torch.Generator().manual_seed(6)) * 0.05).to(torch.bfloat16)
    codes, absmax = Q.quantize_weight(w, "nf4")
    qb, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qb.reshape(-1), codes) and torch.equal(st.absmax, absmax)
    assert torch.equal(BF.dequantize_4bit(qb, st), Q.dequantize_weight(codes, absmax, (256, 320), "nf4"))
    cb, sb, _ = BF.int8_vectorwise_quant(w.float())
    ci, si = Q.quantize_weight(w, "int8")
    assert torch.equal(cb, ci) and torch.equal(sb, si)
    assert torch.equal(BF.int8_vectorwise_dequant(cb, sb).to(torch.bfloat16),
                       Q.dequantize_weight(ci, si, (256, 320), "int8"))


# ------------------------------------------------------------------------------------------ GPU
def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")


@pytest.fixture
def no_tf32():
    """True fp32 matmuls for the 1e-4 comparisons (a training run in the same process may have set TF32)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.gpu
def test_gpu_kernels_equal_ours():
    """Training dequantises with bnb's CUDA kernel, merge with our torch code: the same bits. Our quantiser
    gives the same bits on the GPU as on the CPU. bnb's own CUDA quantiser may differ only at exact ties."""
    _need_gpu()
    import bitsandbytes.functional as BF
    w = (torch.randn(1024, 768, generator=torch.Generator().manual_seed(7)) * 0.02).to(torch.bfloat16)
    for quant in Q.QUANTS:
        c_cpu, s_cpu = Q.quantize_weight(w, quant)
        c_gpu, s_gpu = Q.quantize_weight(w.cuda(), quant)
        assert torch.equal(c_gpu.cpu(), c_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        d_bnb = Q.dequantize_weight(c_gpu, s_gpu, (1024, 768), quant, use_bnb=(quant == "nf4"))
        d_torch = Q.dequantize_weight(c_cpu, s_cpu, (1024, 768), quant, use_bnb=False)
        assert torch.equal(d_bnb.cpu(), d_torch)
    qb, st = BF.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4")
    c, s = Q.quantize_weight(w, "nf4")
    assert torch.equal(st.absmax.cpu(), s)
    def unpack(p):
        return torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)

    differ = unpack(qb.reshape(-1).cpu()) != unpack(c)
    if differ.any():                                   # only where w/absmax sits on a midpoint (to fp32 rounding)
        scaled = (w.float().reshape(-1) / s.repeat_interleave(64))[differ]
        _, mids = Q._nf4_tables("cpu")
        assert ((scaled.reshape(-1, 1) - mids).abs().min(dim=1).values < 1e-6).all()


GPU_CASES = [(m, q, v) for m in METHODS for q in Q.QUANTS for v in (6, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("method_name,quant,version", GPU_CASES)
def test_method_with_quant_gpu(method_name, quant, version, no_tf32):
    """bf16 weights on the GPU, bnb's kernel, bf16 autocast as Fabric's bf16-mixed."""
    _need_gpu()
    dev = "cuda"
    torch.cuda.synchronize()
    model = random_model(version, N_LAYER, N_EMBD, VOCAB).to(dev, torch.bfloat16)
    base_sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ref = plain_from(version, base_sd, dtype=torch.bfloat16, device=dev)
    torch.manual_seed(0)
    method = get_method(method_name)(SETTINGS[method_name])
    method.apply(model, train_parts=())
    torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated()
    report = Q.quantize_model(model, quant)
    torch.cuda.synchronize()
    mem1 = torch.cuda.memory_allocated()
    # the bf16 weights are gone and only the codes + scales came in (the allocator rounds each of the
    # 3 tensors per layer up to 512 bytes)
    n_layers = report.layers
    assert abs((mem0 - mem1) - (report.bf16_bytes - report.quantised_bytes)) <= 512 * 3 * n_layers
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.eval()

    idx = tokens(1, device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lq, l0 = loss_of(model, idx).item(), loss_of(ref, idx).item()
        assert rel(model(idx), ref(idx)) < LOGIT_BOUND[quant] + 0.01          # + bf16 noise
    assert abs(lq - l0) / l0 < LOSS_BOUND[quant] + 0.005

    before = snapshot(model)
    train_steps(model, device=dev, autocast_dtype=torch.bfloat16)
    after = snapshot(model)
    assert_only_trained_changed(before, after, set(method.trainable_names(model)), version)

    # merge on the CPU (as merge.sh) from the bf16 base file, compared in fp32 on the GPU (no autocast):
    # the same weights up to fp32 rounding; PiSSA's residual W − B0 A0 was summed by the GPU in another order,
    # which can move it by one bf16 step in rare places (so a few nf4/int8 codes): bf16 noise, looser bound.
    adapter = {k: v.detach().cpu().clone() for k, v in method.adapter_state_dict(model).items()}
    merged = merged_model(method, base_sd, adapter, quant, version, dtype=torch.float32, device=dev)
    fp32_model = model.float()                 # codes stay as they are (integer buffers)
    idx = tokens(2, device=dev)
    if quant == "fp8":       # the GPU multiplies in fp8 (activations rounded too); the weights: on the CPU, below
        with torch.no_grad():
            assert rel(merged(idx), fp32_model(idx)) < FP8_PRODUCT_ERR * 2
        merged, fp32_model, idx = merged.cpu(), fp32_model.cpu(), idx.cpu()
    with torch.no_grad():
        err = rel(merged(idx), fp32_model(idx))
        assert err < (5e-3 if method_name == "pissa" else 1e-4), err
        # and in bf16 as merge.sh writes it, under autocast: bf16 noise
        merged_bf16 = merged.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert rel(merged_bf16(idx), fp32_model(idx)) < 2e-2


# ------------------------------------------------------------------------------------------ loading
def test_quantising_from_the_file_gives_the_same_model(tmp_path):
    """QLoRA's loading path (the trainer on a GPU): the weights to quantise stay in the file (mmap, stored
    dtype, here fp16) and are quantised one at a time; the result equals quantising the model loaded in
    bf16: the same codes and scales, the other tensors bf16, the same logits with the same adapter."""
    from trainer import checkpoint
    sd = {k: v.half() for k, v in random_model(7, N_LAYER, N_EMBD, VOCAB, seed=3).state_dict().items()}
    path = tmp_path / "m.pth"
    checkpoint.save_atomic(sd, path)
    models = []
    for keep in (None, Q.is_quantised_key):
        m = checkpoint.load_model(path, dtype=torch.bfloat16, device="cpu", keep_on_cpu=keep)
        if keep is not None:
            kept = {k for k, v in m.state_dict().items() if v.dtype == torch.float16}
            assert kept == {k for k in sd if Q.is_quantised_key(k)} and len(kept) == 6 * N_LAYER
        torch.manual_seed(0)
        get_method("lora")(SETTINGS["lora"]).apply(m, train_parts=("ln",))
        Q.quantize_model(m, "nf4", device="cpu")
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        models.append(m)
    a, b = models
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" in k}, strict=False)
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert bufs_a.keys() == bufs_b.keys() and any(k.endswith("qweight") for k in bufs_a)
    assert all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a)
    assert {n: p.dtype for n, p in a.named_parameters()} == {n: p.dtype for n, p in b.named_parameters()}
    idx = tokens(5)
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


@pytest.mark.gpu
def test_trainer_quantises_into_the_gpu_without_the_bf16_weights(tmp_path, monkeypatch):
    """loop.prepare with QUANT=nf4 on a GPU: every tensor ends on the GPU (adapters fp32) but the frozen
    embedding, which stays in pinned CPU memory (memory.embedding_on_cpu), and the GPU never held the
    quantised layers' bf16 weights (its peak stays below them plus what it keeps)."""
    _need_gpu()
    from test_train import VOCAB as TRAIN_VOCAB, config, make_project
    from trainer import checkpoint, loop
    from trainer.memory import QUANTISE_WORK
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    checkpoint.save_atomic(random_model(7, 6, 256, vocab_size=TRAIN_VOCAB).state_dict(), tmp_path / "model" / "tiny.pth")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    prep = loop.prepare(config(QUANT="nf4", PRECISION="bf16", ACCELERATOR="cuda", COMPILE="0"), log=lambda *_: None)
    model = prep.model
    assert model.emb.weight.device.type == "cpu" and model.emb.weight.is_pinned()
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t is not model.emb.weight]
    assert all(t.is_cuda for t in tensors)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    kept = sum(t.numel() * t.element_size() for t in tensors)
    sizes = [m.qshape[0] * m.qshape[1] for m in model.modules() if hasattr(m, "qshape")]
    bf16_targets, temp = 2 * sum(sizes), (QUANTISE_WORK + 2) * max(sizes)   # quantising the largest one
    assert bf16_targets > 2 * temp                         # so that the bound below tells the two paths apart
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < kept + temp + bf16_targets / 2, (peak, kept, temp, bf16_targets)
