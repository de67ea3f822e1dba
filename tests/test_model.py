"""The model against the reference (the `rwkv` pip package), state handling, time_state, grad_cp, init."""
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_ref import random_model, start_many
from trainer import ops
from trainer.checkpoint import config_from_sizes, init_model, load_model, save_atomic
from trainer.model import RWKV

SIZES = {5: (2, 128), 6: (3, 192), 7: (3, 256)}     # (layers, width): 2, 3 and 4 heads of 64
VOCAB = 1024
T, SPLIT, SPLIT_TS = 64, 23, 40
TOKENS = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(7)).tolist()
TOKENS[10] = 0                                       # an end-of-document token inside the sequence


def with_time_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    for blk in model.blocks:
        blk.att.time_state = torch.nn.Parameter(torch.randn(cfg.n_head, cfg.head_size, cfg.head_size, generator=g))
    return model


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Tiny random fp32 checkpoints per version (with and without time_state) and the package's results."""
    d = tmp_path_factory.mktemp("ref")
    paths = {}
    for v, (L, C) in SIZES.items():
        m = random_model(v, L, C, VOCAB, seed=v)
        paths[v] = d / f"v{v}.pth"
        save_atomic(m.state_dict(), paths[v])
        ts = with_time_state(random_model(v, L, C, VOCAB, seed=10 + v), seed=v)
        paths[(v, "ts")] = d / f"v{v}_ts.pth"
        save_atomic(ts.state_dict(), paths[(v, "ts")])
    job = lambda p, **kw: dict(model=str(p), tokens=TOKENS, **kw)  # noqa: E731
    # RWKV-7 ignores time_state in checkpoints: hand it over as the starting state instead.
    ts7 = load_model(paths[(7, "ts")])
    z = torch.zeros(ts7.cfg.n_embd)
    state7 = [(z, blk.att.time_state.detach().clone(), z) for blk in ts7.blocks]
    res = start_many({
        "56": (5, [job(paths[5], split=SPLIT), job(paths[6], split=SPLIT),
                   job(paths[(5, "ts")], split=SPLIT_TS), job(paths[(6, "ts")], split=SPLIT_TS)]),
        "7": (7, [job(paths[7], split=SPLIT), job(paths[(7, "ts")], split=SPLIT_TS, state=state7)]),
    })
    out = {5: res["56"][0], 6: res["56"][1], (5, "ts"): res["56"][2], (6, "ts"): res["56"][3],
           7: res["7"][0], (7, "ts"): res["7"][1]}
    return paths, out


def _close(a, b, atol=1e-4):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("version", [5, 6, 7])
def test_logits_and_state_match_rwkv_package(ref, version):
    paths, out = ref
    r = out[version]
    model = load_model(paths[version])
    assert model.cfg.version == version and model.op == "torch"
    idx = torch.tensor([TOKENS])
    with torch.no_grad():
        logits, state = model.forward_with_state(idx)
        assert logits.shape == (1, T, VOCAB) and logits.dtype == torch.float32
        assert logits.std() > 0.3                          # not a degenerate model
        _close(logits[0], r["logits"])
        # two parts with the state carried == at once, both for us and for the package
        l1, s1 = model.forward_with_state(idx[:, :SPLIT])
        l2, s2 = model.forward_with_state(idx[:, SPLIT:], s1)
    _close(torch.cat([l1, l2], 1)[0], r["logits"])
    _close(r["logits_split"], r["logits"])
    assert len(state) == model.cfg.n_layer
    for ours, theirs in zip(state, r["state"]):
        assert ours[1].dtype == torch.float32 and ours[1].shape == (1, *theirs[1].shape)
        for a, b in zip(ours, theirs):
            _close(a[0], b)
    for a, b in zip(s2, state):                                    # the split run's final state too
        for x, y in zip(a, b):
            _close(x, y)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_time_state_is_the_initial_state(ref, version):
    """A checkpoint with time_state: loaded as parameters and used when no state is given (package:
    v5/v6 use it themselves, v7 got it passed as its state)."""
    paths, out = ref
    r = out[(version, "ts")]
    model = load_model(paths[(version, "ts")])
    assert all(isinstance(b.att.time_state, torch.nn.Parameter) for b in model.blocks)
    idx = torch.tensor([TOKENS])
    with torch.no_grad():
        _close(model(idx)[0], r["logits"])
        _close(r["logits_split"], r["logits"])
        l1, s1 = model.forward_with_state(idx[:, :SPLIT_TS])
        l2, _ = model.forward_with_state(idx[:, SPLIT_TS:], s1)
        _close(torch.cat([l1, l2], 1)[0], r["logits"])
        # an explicit state overrides time_state: the zero state gives other logits
        assert (model(idx, model.zero_state(1)) - model(idx)).abs().max() > 1e-2


@pytest.mark.parametrize("version", [5, 6, 7])
def test_time_state_gets_gradient_and_batch_expansion(version):
    L, C = SIZES[version]
    model = with_time_state(random_model(version, 2, C, 256, seed=3), seed=4)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    # same as passing the expanded time_state explicitly
    state = [(s[0], blk.att.time_state.detach().expand(2, -1, -1, -1), s[2])
             for s, blk in zip(model.zero_state(2), model.blocks)]
    with torch.no_grad():
        _close(logits, model(idx, state), atol=1e-5)
        assert [tuple(s[1].shape) for s in model.initial_state(2)] == [(2, C // 64, 64, 64)] * 2
    F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    for blk in model.blocks:
        g = blk.att.time_state.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0


@pytest.mark.parametrize("version", [5, 6, 7])
def test_batch_rows_are_independent_and_zero_state_is_default(version):
    model = random_model(version, 2, 128, 256, seed=5)
    idx = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        for b in range(3):
            _close(full[b], model(idx[b:b + 1])[0], atol=1e-5)
        _close(full, model(idx, model.zero_state(3)), atol=0)


def test_ffn_pieces_rule():
    from trainer.model import FFN_MAX_PIECES, ffn_pieces
    assert ffn_pieces(1024, 4096) == 1 and ffn_pieces(4096, 4096) == 1 and ffn_pieces(4096 * 8, 0) == 1
    assert ffn_pieces(8192, 4096) == 2 and ffn_pieces(4096 * 8, 4096) == FFN_MAX_PIECES == 4
    assert ffn_pieces(3 * 4096, 4096) == 3 and ffn_pieces(4097 * 3, 4096) == 3
    assert ffn_pieces(2 * 6151, 4096) == 2                  # 3 does not divide 12302: 2 does
    assert ffn_pieces(3 * 5003, 4096) == 3 and ffn_pieces(13001, 4096) == 1   # 13001 is prime


@pytest.mark.parametrize("version", [5, 6, 7])
def test_ffn_in_pieces_gives_the_same_loss_and_gradients(version):
    """RWKV.ffn_piece_tokens: the FFN over pieces of the B·T tokens, with and without checkpointing, gives
    the whole FFN's loss and gradients (2 x 24 tokens in pieces of at least 10: 4 pieces of 12)."""
    model = random_model(version, 2, 128, 256, seed=6).train()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    for cp in (False, True):
        model.grad_cp = cp
        results = []
        for piece in (0, 10):
            model.zero_grad()
            model.ffn_piece_tokens = piece
            loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
        (l0, g0), (l1, g1) = results
        assert l0 == pytest.approx(l1, abs=1e-6)
        assert g0.keys() == g1.keys() and len(g0) > 10
        for n in g0:
            _close(g0[n], g1[n], atol=1e-5)
    model.ffn_piece_tokens = 0


@pytest.mark.parametrize("version", [5, 6, 7])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(version):
    model = random_model(version, 2, 128, 256, seed=6).train()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for cp in (False, True):
        model.zero_grad()
        model.grad_cp = cp
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        _close(g0[n], g1[n], atol=1e-5)


def test_model_op_selects_the_wkv_function():
    calls = []

    def counting7(*args):
        calls.append(7)
        return ops.reference.wkv7_reference(*args)

    def counting6(*args):
        calls.append(6)
        return ops.reference.wkv6_reference(*args)

    ops.register("test_counting", counting7, counting6, lambda device: None)
    for v in (6, 7):
        model = random_model(v, 2, 128, 64, seed=1)
        idx = torch.randint(0, 64, (1, 5))
        with torch.no_grad():
            want = model(idx)
            model.op = "test_counting"
            _close(model(idx), want, atol=0)
        assert calls == [v, v]
        calls.clear()


def test_state_dict_is_the_official_layout():
    for v, extra in ((5, ["blocks.1.att.time_mix_g", "blocks.1.att.gate.weight", "blocks.1.ffn.time_mix_r"]),
                     (6, ["blocks.1.att.time_maa_w1", "blocks.1.att.time_decay_w2", "blocks.1.ffn.time_maa_k"]),
                     (7, ["blocks.1.att.x_r", "blocks.1.att.r_k", "blocks.0.att.v0", "blocks.1.ffn.x_k"])):
        cfg = config_from_sizes(v, 2, 128, 1000)
        with torch.device("meta"):
            sd = RWKV(cfg).state_dict()
        for k in ["emb.weight", "blocks.0.ln0.weight", "blocks.1.ln1.bias", "blocks.1.att.receptance.weight",
                  "blocks.1.att.output.weight", "blocks.1.att.ln_x.weight", "blocks.1.ffn.key.weight",
                  "ln_out.weight", "head.weight"] + extra:
            assert k in sd, k
        assert "blocks.1.ln0.weight" not in sd
        assert sd["emb.weight"].shape == (1000, 128) and sd["head.weight"].shape == (1000, 128)
        assert sd["blocks.0.ffn.key.weight"].shape == ((512, 128) if v == 7 else (448, 128))
        assert ("blocks.0.ffn.receptance.weight" in sd) == (v != 7)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_fresh_init_is_sane(version):
    """Starting loss close to ln(V), moderate logits, deterministic per seed."""
    V = 4096
    model = init_model(config_from_sizes(version, 2, 128, V), seed=0)
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).item()
    assert abs(loss - math.log(V)) < 0.4, loss
    assert 0.3 < logits.std().item() < 1.0
    assert torch.isfinite(logits).all()
    same = init_model(config_from_sizes(version, 2, 128, V), seed=0).state_dict()
    other = init_model(config_from_sizes(version, 2, 128, V), seed=1).state_dict()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], same[k]) for k in sd)
    assert not torch.equal(sd["head.weight"], other["head.weight"])
    # decays lie in (0, 1) and spread over the channels
    blk = model.blocks[0].att
    if version == 7:
        logw = -math.exp(-0.5) * torch.sigmoid(blk.w0)
    else:
        logw = -torch.exp(blk.time_decay)
    assert (logw < 0).all() and logw.min() < -0.3 and logw.max() > -0.05


@pytest.mark.parametrize("version", [5, 6, 7])
def test_fresh_tiny_model_learns(version):
    """A fresh model trains sensibly: in 10 Adam steps it learns a pattern that needs context (after 11
    comes 12 or 13 depending on the token before), beating the best bigram loss ln 2."""
    torch.manual_seed(0)
    V = 64
    model = init_model(config_from_sizes(version, 2, 128, V), seed=0).train()
    seq = torch.tensor([11, 12, 11, 13, 12, 13]).repeat(5)[None, :25]
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.4
    assert losses[-1] < 0.5 * math.log(2), losses


def _cpu_ops():
    try:
        return [name for name in ops.OP_NAMES if name not in ("auto", "torch")
                and ops.why_unavailable(name, "cpu") is None]
    except ImportError:                       # an op module not written yet
        return []


@pytest.mark.parametrize("version", [5, 6, 7])
def test_every_cpu_op_gives_the_oracles_logits_and_gradients(version):
    names = _cpu_ops()
    if not names:
        pytest.skip("no op besides torch runs on the CPU yet")
    model = with_time_state(random_model(version, 2, 128, 256, seed=8), seed=9)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    results = {}
    for name in ["torch"] + names:
        model.op = name
        model.zero_grad()
        logits, state = model.forward_with_state(idx)
        F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        results[name] = (logits.detach(), state[-1][1].detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    want = results.pop("torch")
    for name, (logits, s, grads) in results.items():
        _close(logits, want[0], atol=1e-4)
        _close(s, want[1], atol=1e-4 * max(1.0, want[1].abs().max().item()))
        for n, g in want[2].items():
            _close(grads[n], g, atol=1e-4 * max(1.0, g.abs().max().item()))


@pytest.mark.parametrize("version", [5, 6, 7])
def test_bf16_weights_with_fp32_trainables_under_autocast(version):
    """How training runs: frozen weights bf16, trained tensors fp32, autocast bf16. The WKV op gets
    r/k/v/a/b in one dtype and a fp32 decay; logits stay close to the fp32 model; gradients flow."""
    seen = []

    def check7(r, k, v, logw, a, b, state):
        seen.append({t.dtype for t in (r, k, v, a, b)} | {("logw", logw.dtype)})
        return ops.reference.wkv7_reference(r, k, v, logw, a, b, state)

    def check6(r, k, v, logw, u, state):
        seen.append({t.dtype for t in (r, k, v)} | {("logw", logw.dtype)})
        return ops.reference.wkv6_reference(r, k, v, logw, u, state)

    ops.register("test_dtypes", check7, check6, lambda device: None)
    model = with_time_state(random_model(version, 2, 128, 256, seed=11), seed=1)
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(idx)
    model = model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        trained = "ln" in name or name.split(".")[-1] in ("time_state", "x_k", "w0", "time_maa_x", "time_mix_k",
                                                            "time_decay", "k_k", "a0")
        p.requires_grad_(trained)
        if trained:
            p.data = p.data.float()
    model.op = "test_dtypes"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), idx.roll(-1, 1).flatten())
    loss.backward()
    assert seen and all(s == {torch.bfloat16, ("logw", torch.float32)} for s in seen), seen
    assert (logits.float() - want).abs().max() < 0.05 * want.abs().max()
    ts = model.blocks[0].att.time_state
    assert ts.dtype == torch.float32 and ts.grad is not None and ts.grad.abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_residual_stream_keeps_act_dtype_under_autocast(version):
    """RWKV.act_dtype sets the dtype every block receives and returns (what gradient checkpointing keeps),
    although the norms return fp32 under autocast; bf16 stays close to the fp32 model, and the trainer
    picks bf16 for bf16 autocast, fp32 for fp16 (overflow), nothing for fp32."""
    from trainer.plan import activation_dtype
    model = random_model(version, 3, 128, 256, seed=13)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(idx)
    model = model.to(torch.bfloat16)
    for name, p in model.named_parameters():       # frozen bf16 (embedding included), norms trained in fp32
        p.requires_grad_("ln" in name)
        if p.requires_grad:
            p.data = p.data.float()
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out[0].dtype)))
             for b in model.blocks]
    for act in (torch.bfloat16, torch.float32):
        seen.clear()
        model.act_dtype = act
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1).float(), idx.roll(-1, 1).flatten()).backward()
        assert seen == [(act, act)] * 3, seen
        assert (logits.float() - want).abs().max() < 0.05 * want.abs().max()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in model.parameters() if p.requires_grad)
    seen.clear()
    with torch.no_grad():                          # no autocast (DeepSpeed's engine): the weights' dtype
        model(idx)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 3, seen
    for h in hooks:
        h.remove()
    assert activation_dtype("bf16-mixed") == torch.bfloat16
    assert activation_dtype("16-mixed") == torch.float32 and activation_dtype("32-true") is None


@pytest.mark.parametrize("version", [5, 6, 7])
def test_state_tuning_with_frozen_weights_and_grad_cp(version):
    """Only time_state trainable (state tuning), gradient checkpointing on and off: same gradient."""
    model = with_time_state(random_model(version, 2, 128, 256, seed=12), seed=2).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("time_state"))
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(6))
    grads = []
    for cp in (False, True):
        model.grad_cp = cp
        model.zero_grad()
        F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        grads.append([b.att.time_state.grad.clone() for b in model.blocks])
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        _close(a, b, atol=1e-7)


def test_embedding_kept_on_the_cpu_gives_the_same_logits():
    """tables.hold_on_cpu on the embedding (a GPU run's frozen embedding): refused while it trains; the same logits
    after it. Its cross-device lookup is checked on a GPU in test_train."""
    from trainer.tables import hold_on_cpu
    model = random_model(7, 2, 64, vocab_size=97, seed=3)
    idx = torch.randint(0, 97, (2, 9))
    before = model(idx)
    with pytest.raises(ValueError, match="frozen"):
        hold_on_cpu(model.emb)
    model.emb.weight.requires_grad_(False)
    hold_on_cpu(model.emb)
    assert model.emb.weight.device.type == "cpu" and not model.emb.weight.requires_grad
    assert torch.equal(model(idx), before)
