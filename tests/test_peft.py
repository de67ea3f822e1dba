"""The fine-tuning methods (trainer/peft), one table over method × RWKV version on a tiny model.

Checks: exactly the expected tensors train (with and without TRAIN_PARTS); at init the adapted model
gives the base's logits; after a few optimizer steps only the method's tensors changed; merge, loaded
into a plain model, gives the adapted model's logits (1e-4) and does not modify its inputs; load_adapter
round trip; the DiSHA divisibility error; the update formulas against explicit loops; which trained
tensors can never learn on zero output projections (a fresh init), proved by their gradients.
"""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from trainer.checkpoint import config_from_sizes, init_model
from trainer.errors import UserError
from trainer.model import RWKV
from trainer.peft import METHODS, get_method
from trainer.peft.base import AdaptedLinear, zero_weights

VERSIONS = (5, 6, 7)
N_LAYER, N_EMBD, HEAD, VOCAB = 2, 64, 32, 32
SETTINGS = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "scaling": "standard"},
    "dora": {"r": 4, "alpha": 8, "dropout": 0.0, "scaling": "standard"},
    "pissa": {"r": 4, "svd_niter": 2},
    "bone": {"r": 8},
    "miss": {"r": 8},
    "bat": {"r": 8},
    "state": {},
    "full": {},
}
ALL_PARTS = ("emb", "head", "time", "ln")
# Written out by hand per version, to check the name rule in base.py.
TIME_PARAMS = {
    5: (["time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay", "time_faaaa"],
        ["time_mix_k", "time_mix_r"]),
    6: (["time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g", "time_maa_w1",
         "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa"],
        ["time_maa_k", "time_maa_r"]),
    7: (["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a", "w1", "w2", "a1", "a2",
         "v1", "v2", "g1", "g2", "r_k"],
        ["x_k"]),
}
LINEARS = {
    5: (["receptance", "key", "value", "output", "gate"], ["key", "value", "receptance"]),
    6: (["receptance", "key", "value", "output", "gate"], ["key", "value", "receptance"]),
    7: (["receptance", "key", "value", "output"], ["key", "value"]),
}
# RWKV-7 stores v0/v1/v2 in layer 0 but never uses them: they get no gradient.
UNUSED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


@functools.lru_cache(maxsize=None)
def _base_sd(version: int) -> dict:
    """A tiny model's weights, every tensor perturbed so none is zero (RWKV-LM zero-inits some)."""
    model = init_model(config_from_sizes(version, N_LAYER, N_EMBD, vocab_size=VOCAB, head_size=HEAD), seed=0)
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


def base_sd(version: int) -> dict:
    return {k: v.clone() for k, v in _base_sd(version).items()}


def plain_model(version: int, sd: dict | None = None) -> RWKV:
    model = RWKV(config_from_sizes(version, N_LAYER, N_EMBD, vocab_size=VOCAB, head_size=HEAD))
    sd = base_sd(version) if sd is None else sd
    for k, v in sd.items():                         # a merged state: give the plain model its time_state
        if k.endswith(".time_state"):
            model.get_submodule(k[: -len(".time_state")]).time_state = nn.Parameter(v.clone())
    model.load_state_dict(sd, strict=True)
    return model.eval()


def tokens(seed: int, B: int = 2, T: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted(method_name: str, version: int, parts=(), seed: int = 0):
    torch.manual_seed(seed)
    model = plain_model(version)
    method = get_method(method_name)(SETTINGS[method_name])
    method.apply(model, train_parts=parts)
    return model, method


def train_steps(model: nn.Module, n: int = 2, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for i in range(n):
        idx = tokens(100 + i, T=7)   # 2 steps: LoRA's A gets a gradient once B is non-zero
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def expected_names(method_name: str, version: int, parts=()) -> set[str]:
    sd = _base_sd(version)
    if method_name == "full":
        return set(sd)
    att_lin, ffn_lin = LINEARS[version]
    mods = [f"blocks.{i}.{part}.{lin}" for i in range(N_LAYER)
            for part, lins in (("att", att_lin), ("ffn", ffn_lin)) for lin in lins]
    own = {
        "lora": {f"{m}.{s}" for m in mods for s in ("lora_A", "lora_B")},
        "dora": {f"{m}.{s}" for m in mods for s in ("lora_A", "lora_B", "dora_magnitude")},
        "pissa": {f"{m}.{s}" for m in mods for s in ("lora_A", "lora_B")},
        "bone": {f"{m}.disha" for m in mods},
        "miss": {f"{m}.disha" for m in mods},
        "bat": {f"{m}.disha" for m in mods},
        "state": {f"blocks.{i}.att.time_state" for i in range(N_LAYER)},
    }[method_name]
    extra = set()
    if "emb" in parts:
        extra.add("emb.weight")
    if "head" in parts:
        extra.add("head.weight")
    if "time" in parts:
        att_t, ffn_t = TIME_PARAMS[version]
        extra |= {f"blocks.{i}.att.{n}" for i in range(N_LAYER) for n in att_t}
        extra |= {f"blocks.{i}.ffn.{n}" for i in range(N_LAYER) for n in ffn_t}
    if "ln" in parts:
        lns = ["ln_out"] + ["blocks.0.ln0"] + [f"blocks.{i}.{n}" for i in range(N_LAYER)
                                                for n in ("ln1", "ln2", "att.ln_x")]
        extra |= {f"{n}.{wb}" for n in lns for wb in ("weight", "bias")}
    assert extra <= set(sd)
    return own | extra


CASES = [(m, v) for m in METHODS for v in VERSIONS]


@pytest.mark.parametrize("method_name,version", CASES)
@pytest.mark.parametrize("parts", [(), ("time",), ALL_PARTS], ids=["none", "time", "all"])
def test_trainable_names(method_name, version, parts):
    model, method = adapted(method_name, version, parts)
    names = method.trainable_names(model)
    assert len(names) == len(set(names))
    assert set(names) == expected_names(method_name, version, parts)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == set(names)
    # The official keys are all still there, under the same names.
    assert set(_base_sd(version)) <= set(model.state_dict())


@pytest.mark.parametrize("method_name,version", CASES)
def test_identity_at_init(method_name, version):
    idx = tokens(1)
    with torch.no_grad():
        ref = plain_model(version)(idx)
        model, _ = adapted(method_name, version)
        out = model.eval()(idx)
    if method_name == "pissa":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method_name,version", CASES)
@pytest.mark.parametrize("parts", [(), ALL_PARTS], ids=["none", "all"])
def test_train_merge_and_round_trip(method_name, version, parts):
    model, method = adapted(method_name, version, parts)
    before = _snapshot(model)
    train_steps(model)
    after = _snapshot(model)
    trained = set(method.trainable_names(model))

    # Only the method's tensors (and the parts) changed, and they did.
    for k in after:
        if k in trained:
            if not (version == 7 and k in UNUSED):
                assert not torch.equal(after[k], before[k]), f"{k} did not train"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed but is not trained"
    if method_name != "pissa":                     # PiSSA keeps residuals in `weight`, the others the base
        base = _base_sd(version)
        for k in base:
            if k not in trained:
                assert torch.equal(after[k], base[k])

    idx = tokens(2)
    with torch.no_grad():
        want = model(idx)
    adapter = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    assert set(adapter) >= trained
    meta = method.metadata()
    assert meta == SETTINGS[method_name]
    assert json.loads(json.dumps(meta)) == meta

    # Merge into the ORIGINAL base, load into a plain model: same logits; merge is pure.
    base_in = base_sd(version)
    base_copy = {k: v.clone() for k, v in base_in.items()}
    adapter_copy = {k: v.clone() for k, v in adapter.items()}
    merged = get_method(method_name).merge(base_in, adapter, meta)
    assert set(base_in) == set(base_copy) and all(torch.equal(base_in[k], base_copy[k]) for k in base_copy)
    assert set(adapter) == set(adapter_copy) and all(torch.equal(adapter[k], adapter_copy[k]) for k in adapter)
    extra = {k for k in merged if k not in base_in}
    assert extra == ({f"blocks.{i}.att.time_state" for i in range(N_LAYER)} if method_name == "state" else set())
    assert set(base_in) <= set(merged)
    with torch.no_grad():
        got = plain_model(version, merged)(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if method_name != "full":
        assert not torch.allclose(got, plain_model(version)(idx).detach(), atol=1e-3), "training had no effect"

    # load_adapter: a fresh run (other random init / SVD) given the saved adapter gives the same logits.
    fresh, fresh_method = adapted(method_name, version, parts, seed=1)
    fresh_method.load_adapter(fresh, adapter)
    with torch.no_grad():
        again = fresh(idx)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method_name", ["bone", "bat"])
@pytest.mark.parametrize("version", VERSIONS)
def test_disha_r_must_divide_widths(method_name, version):
    model = plain_model(version)
    method = get_method(method_name)({"r": 48})
    with pytest.raises(UserError) as err:
        method.apply(model)
    msg = str(err.value)
    assert "DISHA_R=48" in msg and "64" in msg
    assert "1, 2, 4, 8, 16, 32" in msg                  # the valid values: divisors of gcd(64, F)


def test_bone_and_bat_formulas_against_loops():
    from trainer.peft.disha import BatLinear, BoneLinear, bat_delta, bone_delta
    torch.manual_seed(0)
    out_f, in_f, r = 6, 9, 3
    w = torch.randn(out_f, in_f)
    d_bone = torch.randn(r, out_f)
    want = torch.empty(out_f, in_f)
    for o in range(out_f):
        for c in range(in_f):
            want[o, c] = d_bone[c % r, o]
    torch.testing.assert_close(bone_delta(d_bone, (out_f, in_f)), want)

    d_bat = torch.randn(in_f // r, r, r)
    want = torch.empty(out_f, in_f)
    for a in range(out_f // r):
        for b in range(in_f // r):
            blk = w[a * r:(a + 1) * r, b * r:(b + 1) * r]
            want[a * r:(a + 1) * r, b * r:(b + 1) * r] = blk @ d_bat[b] + d_bat[b]
    torch.testing.assert_close(bat_delta(w, d_bat), want)

    # The layers compute (W + ΔW) x.
    x = torch.randn(2, 5, in_f)
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data.copy_(w)
    bone = BoneLinear(lin, r)
    bone.disha.data.copy_(d_bone)
    torch.testing.assert_close(bone(x), x @ (w + bone_delta(d_bone, (out_f, in_f))).T)
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data.copy_(w)
    bat = BatLinear(lin, r)
    bat.disha.data.copy_(d_bat)
    torch.testing.assert_close(bat(x), x @ (w + bat_delta(w, d_bat)).T)


def test_lora_formula_scale_and_dropout():
    from trainer.peft.lora import LoraLinear
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=False)
    w = lin.weight.detach().clone()
    m = LoraLinear(lin, r=2, scale=16 / 2, dropout=0.5)
    m.lora_B.data.normal_()
    x = torch.randn(3, 8)
    m.eval()
    torch.testing.assert_close(m(x), x @ (w + 8.0 * m.lora_B @ m.lora_A).T)
    m.train()                                            # dropout acts on the LoRA input path only
    torch.manual_seed(1)
    y = m(x)
    assert not torch.allclose(y, x @ (w + 8.0 * m.lora_B @ m.lora_A).T)
    m.lora_B.data.zero_()
    torch.testing.assert_close(m(x), x @ w.T)


def test_pissa_init_is_the_principal_part():
    from trainer.peft.pissa import PissaLinear
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=False)
    q1, _ = torch.linalg.qr(torch.randn(12, 12))
    q2, _ = torch.linalg.qr(torch.randn(16, 12))
    spectrum = torch.tensor([8.0, 5.0, 3.0] + [0.5 / (i + 1) for i in range(9)])   # decaying, like weights
    lin.weight.data.copy_(q1 @ torch.diag(spectrum) @ q2.T)
    w = lin.weight.detach().clone()
    m = PissaLinear(lin, r=3, niter=4)
    u, s, vh = torch.linalg.svd(w)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(m.lora_B @ m.lora_A, best, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(m.weight + m.lora_B @ m.lora_A, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.lora_A, m.pissa_init_A)


# ------------------------------------------------------------------------------- DoRA, rslora, MiSS
def _dora(out_f=12, in_f=16, r=4, alpha=8.0, scaling="standard", trained=True, seed=0):
    """A DoraLinear on a random W (returned too); ``trained``: B and m moved away from their start."""
    from trainer.peft.dora import DoraLinear
    from trainer.peft.lora import lora_scale
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    w = lin.weight.detach().clone()
    layer = DoraLinear(lin, r, lora_scale(alpha, r, scaling), 0.0)
    if trained:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)
            layer.dora_magnitude.mul_(torch.rand(out_f) + 0.5)
    return layer, w


def test_dora_formula_start_and_detached_norm():
    """out = m ⊙ (W + s·B A) / ‖W + s·B A‖ (norm of each output row over the inputs), from the weight written
    out; the norm computed without forming W + s·B A equals the direct one; the gradients are those of that
    formula with the norm held constant (detached); at the start (B = 0, m = ‖W‖ per row) the layer is W x
    exactly."""
    layer, w = _dora()
    a, b, m = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.dora_magnitude))
    v = w + layer.scale * b @ a
    n = torch.linalg.vector_norm(v, dim=1)
    torch.testing.assert_close(layer.row_norm(torch.float32), n.detach(), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 5, 16)
    g = torch.randn(3, 5, 12)
    want = x @ (m[:, None] * v / n.detach()[:, None]).T
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (want * g).sum().backward()
    (got * g).sum().backward()
    for mine, ref in ((layer.lora_A, a), (layer.lora_B, b), (layer.dora_magnitude, m)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)
    start, w = _dora(trained=False)
    torch.testing.assert_close(start.dora_magnitude.detach(), w.norm(dim=1), rtol=1e-6, atol=0)
    assert start.dora_magnitude.dtype == torch.float32 and start.dora_magnitude.shape == (12,)
    assert torch.equal(start(x), nn.functional.linear(x, w))


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_dora_equals_peft(scaling):
    """Our DoRA layer against peft's (LoraConfig(use_dora=True), use_rslora for rslora) on an nn.Linear with the
    same W, A, B, m and scaling, fp32: the output and the gradients of x, A, B and m agree to 1e-5."""
    pytest.importorskip("peft", reason="the peft library is not installed (pip install peft): the comparison "
                                       "with peft's DoRA needs it")
    from peft import LoraConfig, get_peft_model
    layer, w = _dora(scaling=scaling)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 12, bias=False)

        def forward(self, x):
            return self.lin(x)
    one = One()
    one.lin.weight.data.copy_(w)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lin"], use_dora=True,
                        use_rslora=scaling == "rslora")
    theirs = get_peft_model(one, config).base_model.model.lin
    assert theirs.scaling["default"] == pytest.approx(layer.scale)
    pa, pb = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    pm = theirs.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        pa.copy_(layer.lora_A)
        pb.copy_(layer.lora_B)
        pm.copy_(layer.dora_magnitude)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 12)
    ours, ref = layer(x), theirs(x2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    for mine, peft_t in ((x, x2), (layer.lora_A, pa), (layer.lora_B, pb), (layer.dora_magnitude, pm)):
        torch.testing.assert_close(mine.grad, peft_t.grad, rtol=1e-5, atol=1e-5)


def test_dora_zero_rows_stay_zero_without_nan():
    """A zero row of W starts at magnitude 0: its output and the gradients of its m, B row are exactly 0, and
    nothing is NaN (n is clamped: peft's 0 / 0)."""
    from trainer.peft.dora import DoraLinear
    lin = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight[2].zero_()
    layer = DoraLinear(lin, 2, 1.0, 0.0)
    x = torch.randn(4, 8)
    out = layer(x)
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], torch.zeros(4))
    out.square().sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.dora_magnitude):
        assert torch.isfinite(p.grad).all()
    assert layer.dora_magnitude.grad[2] == 0 and not layer.lora_B.grad[2].any()
    assert layer.dora_magnitude.grad[[0, 1, 3, 4, 5]].abs().min() > 0


@pytest.mark.parametrize("method_name", ["lora", "dora"])
def test_rslora_scale_is_alpha_over_root_r_and_merge_reads_it_back(method_name):
    """LORA_SCALING=rslora: s = alpha / √r (r 4, alpha 8: 4, not 2); the setting is in the metadata and merge
    uses it: the merged model gives the adapted model's logits (1e-4), a merge taking it as standard does not.
    A file from before rslora (no "scaling") is standard."""
    from trainer.peft.lora import LoraLinear
    torch.manual_seed(0)
    model = plain_model(7)
    method = get_method(method_name)({**SETTINGS[method_name], "scaling": "rslora"})
    method.apply(model)
    assert {m.scale for m in model.modules() if isinstance(m, LoraLinear)} == {8 / math.sqrt(4)} == {4.0}
    train_steps(model)
    idx = tokens(2)
    with torch.no_grad():
        want = model(idx)
    adapter = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    meta = json.loads(json.dumps(method.metadata()))
    assert meta["scaling"] == "rslora"
    with torch.no_grad():
        got = plain_model(7, get_method(method_name).merge(base_sd(7), adapter, meta))(idx)
        other = plain_model(7, get_method(method_name).merge(base_sd(7), adapter, {**meta, "scaling": "standard"}))(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (other - want).abs().max() > 1e-3
    assert get_method(method_name)({"r": 4, "alpha": 8}).metadata()["scaling"] == "standard"


def test_miss_is_bone_under_its_new_name():
    """FINETUNE_MODE=miss trains exactly as bone: the same tensors after the same steps, the same settings and
    merge; it records its own name and says what it is."""
    bone, bone_method = adapted("bone", 6)
    miss, miss_method = adapted("miss", 6)
    train_steps(bone)
    train_steps(miss)
    a, b = bone_method.adapter_state_dict(bone), miss_method.adapter_state_dict(miss)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert miss_method.metadata() == bone_method.metadata() == {"r": 8}
    merged_b = get_method("bone").merge(base_sd(6), a, bone_method.metadata())
    merged_m = get_method("miss").merge(base_sd(6), b, miss_method.metadata())
    assert merged_b.keys() == merged_m.keys() and all(torch.equal(merged_b[k], merged_m[k]) for k in merged_b)
    assert miss_method.name == "miss" and miss_method.TITLE == "MiSS" and "Bone" in miss_method.NOTE


def test_base_forward_is_the_one_base_product():
    """A quantised base overrides base_forward only: the adapted output goes through it."""
    from trainer.peft.lora import LoraLinear
    m = LoraLinear(nn.Linear(4, 4, bias=False), r=2, scale=1.0, dropout=0.0)
    m.base_forward = lambda x: torch.full((*x.shape[:-1], 4), 7.0)
    assert torch.equal(m(torch.randn(2, 4)), torch.full((2, 4), 7.0))
    assert isinstance(m, AdaptedLinear)


def test_errors_are_user_errors():
    with pytest.raises(UserError, match="FINETUNE_MODE"):
        get_method("qlora")
    with pytest.raises(UserError, match="LORA_R"):
        get_method("lora")({"r": 0, "alpha": 8})
    with pytest.raises(UserError, match="LORA_ALPHA"):
        get_method("lora")({"r": 4, "alpha": 0})
    with pytest.raises(UserError, match="LORA_SCALING='rs' is not one of: standard | rslora"):
        get_method("dora")({"r": 4, "alpha": 8, "scaling": "rs"})
    with pytest.raises(UserError, match="SVD_NITER"):
        get_method("pissa")({"r": 4, "svd_niter": -1})
    with pytest.raises(UserError, match="TRAIN_PARTS"):
        adapted("lora", 7, parts=("norms",))
    with pytest.raises(UserError, match="PISSA_R"):
        m = plain_model(7)
        get_method("pissa")({"r": 100}).apply(m)


def test_adapter_from_another_model_is_refused():
    model, method = adapted("lora", 6)
    adapter = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    other = base_sd(7)                                   # another version: no gate
    with pytest.raises(UserError, match="gate"):
        get_method("lora").merge(other, adapter, method.metadata())
    big = {k: v.clone() for k, v in adapter.items()}
    big["blocks.0.att.key.lora_A"] = torch.zeros(4, 128)
    with pytest.raises(UserError, match="shape"):
        get_method("lora").merge(base_sd(6), big, method.metadata())
    fresh, fresh_method = adapted("lora", 6)
    with pytest.raises(UserError, match="does not fit"):
        fresh_method.load_adapter(fresh, {k: v for k, v in adapter.items() if "lora_B" not in k})
    with pytest.raises(UserError, match="shape"):
        fresh_method.load_adapter(fresh, big)


@pytest.mark.parametrize("version", VERSIONS)
def test_state_tuning_takes_a_high_learning_rate(version):
    """State tuning is run with LR 1 -> 0.01: Adam steps at lr=1 must stay finite and lower the loss."""
    model, method = adapted("state", version)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1.0)
    idx = tokens(7, B=1, T=7)
    losses = []
    for _ in range(8):
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses         # a tiny model's state fits only so much


# ------------------------------------------------------------------------------- which tensors can learn
ZERO_PATTERNS = {   # base linear weights set to zero on the perturbed base (the "fresh" base: RWKV-LM's init)
    "out0-val1": ("blocks.0.att.output.weight", "blocks.1.ffn.value.weight"),
    "out1-val0": ("blocks.1.att.output.weight", "blocks.0.ffn.value.weight"),
    # a zero key too (no init or training makes one): it cuts more paths than dead_tensors names
    "key0-out1": ("blocks.0.att.key.weight", "blocks.1.att.output.weight"),
}


def _zero_base(version: int, pattern: str) -> dict:
    if pattern == "fresh":
        cfg = config_from_sizes(version, N_LAYER, N_EMBD, vocab_size=VOCAB, head_size=HEAD)
        return init_model(cfg, seed=0).state_dict()
    sd = base_sd(version)
    for k in ZERO_PATTERNS[pattern]:
        sd[k].zero_()
    return sd


def _never_moved(method_name, version, parts, sd, steps=3, same_batch=False):
    """Train ``steps`` Adam steps as the trainer sets a model up (v7's unused layer-0 v0/v1/v2 frozen);
    return (the method, the model, the trained tensors whose gradient was exactly zero at every step, the
    losses). ``same_batch``: every step on the first batch."""
    torch.manual_seed(0)
    model = plain_model(version, sd)
    method = get_method(method_name)(SETTINGS[method_name])
    method.apply(model, train_parts=parts)
    if version == 7:
        for n in ("v0", "v1", "v2"):
            getattr(model.blocks[0].att, n).requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    moved, losses = set(), []
    model.train()
    for i in range(steps):
        idx = tokens(100 + (0 if same_batch else i), T=9)
        loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        moved |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.any())}
        losses.append(loss.item())
        opt.step()
    return method, model, set(params) - moved, losses


DEAD_CASES = ([(m, v, k) for m in ("state", "pissa", "dora") for v in VERSIONS for k in ("fresh", *ZERO_PATTERNS)]
              + [(m, v, "fresh") for m in ("lora", "bone", "miss", "bat", "full") for v in VERSIONS])


@pytest.mark.parametrize("method_name,version,pattern", DEAD_CASES)
def test_dead_tensors_are_exactly_those_whose_gradient_stays_zero(method_name, version, pattern):
    """On zero output projections (a fresh RWKV-LM init: att.output and ffn.value zero in every layer; or
    some layers of a trained-like base), with every TRAIN_PARTS: the tensors dead_tensors names are exactly
    the trained tensors whose gradient is exactly zero at each of 3 optimizer steps (LoRA's inner A needs
    3: B of att.output moves first). State tuning and PiSSA: those of every silent attention / FFN (RWKV-7:
    layer 0's v_first tensors live on while a later att.output is not zero), PiSSA's adapters of a zero
    weight; DoRA as PiSSA (a zero weight's rows start at magnitude 0); LoRA, Bone, Bat and full: none. A zero
    key as well cuts more paths: then a part of them."""
    sd = _zero_base(version, pattern)
    zero = zero_weights(sd)
    method, model, never, _ = _never_moved(method_name, version, ALL_PARTS, sd)
    dead = set(method.dead_tensors(model, zero))
    if pattern.startswith("key"):
        assert dead < never
    else:
        assert dead == never
    if method_name in ("lora", "bone", "miss", "bat", "full"):
        assert not dead
    if pattern == "fresh" and method.ZERO_STAYS_ZERO:   # all but the embedding, head, ln0 and ln_out
        assert set(n for n, p in model.named_parameters() if p.requires_grad) - dead == {
            "emb.weight", "head.weight", "ln_out.weight", "ln_out.bias", "blocks.0.ln0.weight", "blocks.0.ln0.bias"}


@pytest.mark.parametrize("method_name", ["state", "pissa", "dora"])
@pytest.mark.parametrize("version", VERSIONS)
def test_state_pissa_dora_on_a_fresh_model_learn_nothing_and_are_refused(method_name, version):
    """Without TRAIN_PARTS, on a fresh init, the loss is the same number at every step (nothing moves); the
    check refuses it in one line with the fix; LoRA on the same base is not refused."""
    sd = _zero_base(version, "fresh")
    method, model, never, losses = _never_moved(method_name, version, (), sd, steps=3, same_batch=True)
    assert never == {n for n, p in model.named_parameters() if p.requires_grad}
    assert losses[0] == losses[1] == losses[2]
    with pytest.raises(UserError) as err:
        method.check_base(model, zero_weights(sd), "fresh.pth")
    msg = str(err.value)
    assert f"FINETUNE_MODE={method_name} cannot learn on fresh.pth" in msg and "zero in every layer" in msg
    assert "freshly initialised" in msg and "the loss would not move" in msg and "\n" not in msg
    assert "a trained base model" in err.value.fix and "FINETUNE_MODE=lora" in err.value.fix
    lora, lora_model, _, lora_losses = _never_moved("lora", version, (), sd, steps=3, same_batch=True)
    assert lora.check_base(lora_model, zero_weights(sd), "fresh.pth") == [] and lora_losses[2] < lora_losses[0]


def test_state_refused_even_where_train_parts_learn_and_warned_where_some_layers_learn():
    sd = _zero_base(7, "fresh")
    method, model, _, _ = _never_moved("state", 7, ("emb", "head"), sd, steps=1)
    with pytest.raises(UserError, match=r"only TRAIN_PARTS' 2 tensors would learn \(emb.weight, head.weight\), "
                                         r"the method's own would stay as they start"):
        method.check_base(model, zero_weights(sd), "fresh.pth")
    sd = _zero_base(7, "out1-val0")                # layer 0's attention learns, layer 1's does not
    method, model, never, _ = _never_moved("state", 7, (), sd, steps=1)
    notes = method.check_base(model, zero_weights(sd), "half.pth")
    assert never == {"blocks.1.att.time_state"}
    assert notes == ["warning: 1 of the 2 tensors FINETUNE_MODE=state trains get an exactly zero gradient at every "
                     "step on half.pth (att.output.weight is zero in layer 1; ffn.value.weight is zero in layer 0): "
                     "blocks.1.att.time_state will stay as they start"]
    assert get_method("state")({}).check_base(model, set(), "trained.pth") == []


def test_zero_weights_finds_only_all_zero_adapted_linears():
    sd = base_sd(7)
    sd["blocks.1.att.output.weight"].zero_()
    sd["blocks.0.ffn.value.weight"].zero_()
    sd["blocks.0.ffn.value.weight"][-1, -1] = 1e-30      # one value, past the ones read first: not zero
    sd["blocks.0.att.x_k"].zero_()                         # not a linear weight
    assert zero_weights(sd) == {"blocks.1.att.output.weight"}
    fresh = zero_weights(_zero_base(6, "fresh"))         # RWKV-5/6 zero their FFN receptance too
    assert fresh == {f"blocks.{i}.{n}.weight" for i in range(N_LAYER) for n in ("att.output", "ffn.value",
                                                                                 "ffn.receptance")}
