"""The fine-tuning methods (trainer/peft), one table over method × RWKV version on a tiny model.

Checks: exactly the expected tensors train (with and without TRAIN_PARTS); at init the adapted model
gives the base's logits; after a few optimizer steps only the method's tensors changed; merge, loaded
into a plain model, gives the adapted model's logits (1e-4) and does not modify its inputs; load_adapter
round trip; the DiSHA divisibility error; the update formulas against explicit loops.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from trainer.checkpoint import config_from_sizes, init_model
from trainer.errors import UserError
from trainer.model import RWKV
from trainer.peft import METHODS, get_method
from trainer.peft.base import AdaptedLinear

VERSIONS = (5, 6, 7)
N_LAYER, N_EMBD, HEAD, VOCAB = 2, 64, 32, 32
SETTINGS = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "pissa": {"r": 4, "svd_niter": 2},
    "bone": {"r": 8},
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
        "pissa": {f"{m}.{s}" for m in mods for s in ("lora_A", "lora_B")},
        "bone": {f"{m}.disha" for m in mods},
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
