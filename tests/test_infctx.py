"""infctx (trainer/infctx.py): chunked training with the state and its gradient carried across chunk
boundaries equals ordinary training on the whole sequence; memory; ctx warm-up; refusals. CPU, fp32."""
import dataclasses

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer import model as model_mod
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.infctx import (InfctxLoss, check_infctx, chunk_bounds, ctx_len_at, cut_batch, infctx_loss,
                            infctx_problems)
from trainer.loop import masked_loss
from trainer.peft import get_method

from rwkv_ref import random_model, random_model_7a

VOCAB = 128
SETTINGS = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "dora": {"r": 4, "alpha": 8},
            "pissa": {"r": 4, "svd_niter": 2}, "bone": {"r": 16}, "bat": {"r": 16}, "state": {}, "full": {}}
TOL = 1e-5


def build(version, mode, op="torch", grad_cp=False, seed=0, train_parts=(), **settings):
    """A tiny model (2 layers, 64 wide, 2 heads of 32; version "7a": RWKV-7 with DeepEmbed) with ``mode`` applied
    and every trainable tensor moved off its init (LoRA B and time_state start at zero: their partners' gradients
    would be zero)."""
    torch.manual_seed(seed)
    model = (random_model_7a(2, 64, VOCAB, seed=seed, head_size=32) if version == "7a"
             else random_model(version, 2, 64, vocab_size=VOCAB, seed=seed, head_size=32))
    get_method(mode)({**SETTINGS[mode], **settings}).apply(model, train_parts=train_parts)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.op, model.grad_cp = op, grad_cp
    return model.train()


def make_batch(B, T, seed=0, pad=0):
    """Random ids and targets; a loss mask with zeros inside and ``pad`` trailing zeros in every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, T), generator=g)
    y = torch.randint(0, VOCAB, (B, T), generator=g)
    m = (torch.rand(B, T, generator=g) > 0.3).float()
    if pad:
        m[:, T - pad:] = 0
    return x, y, m


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, params, allow_unused=True)   # RWKV-7 layer 0 never uses v0/v1/v2
    return {n: (g if g is not None else torch.zeros_like(p))
            for (n, p), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], gs)}


def assert_same(loss_a, grads_a, loss_b, grads_b, tol=TOL):
    """Loss and every gradient tensor within ``tol`` relative (by norm, and elementwise against the
    tensor's largest entry)."""
    assert abs(loss_a.item() - loss_b.item()) <= tol * abs(loss_b.item()), (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys()
    for name, gb in grads_b.items():
        ga = grads_a[name]
        scale = gb.norm().item()
        if scale == 0:
            assert ga.norm().item() == 0, name
            continue
        assert (ga - gb).norm().item() <= tol * scale, (name, (ga - gb).norm().item() / scale)
        assert (ga - gb).abs().max().item() <= tol * gb.abs().max().item() * 4, name


def whole(model, x, y, m):
    loss = masked_loss(model(x), y, m)
    return loss, grads(model, loss)


def chunked(model, x, y, m, chunk, **kw):
    loss = infctx_loss(model, x, y, m, chunk, **kw)
    return loss, grads(model, loss)


# --------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("grad_cp", [False, True])
@pytest.mark.parametrize("mode", ["lora", "state", "full"])
@pytest.mark.parametrize("version", [5, 6, 7])
def test_equals_whole_sequence(version, mode, grad_cp):
    """4 chunks of 10, 10, 10, 8 tokens (10 does not divide 38; 5 trailing padding positions are
    trimmed from T = 43), a loss mask with zeros, batch of 2: loss and every gradient equal."""
    model = build(version, mode, grad_cp=grad_cp)
    x, y, m = make_batch(2, 43, seed=version, pad=5)
    assert len(chunk_bounds(38, 10)) == 4
    assert_same(*chunked(model, x, y, m, 10), *whole(model, x, y, m))


@pytest.mark.parametrize("train_parts", [(), ("deepembed",)], ids=["frozen", "trained"])
@pytest.mark.parametrize("mode", ["lora", "state", "full"])
def test_7a_deep_embed_equals_whole_sequence(mode, train_parts):
    """RWKV-7a: each chunk's tokens reach its FFNs' DeepEmbed; with TRAIN_PARTS=deepembed its tensors' gradients
    (the s_emb rows of the tokens of every chunk) equal the whole sequence's too."""
    model = build("7a", mode, grad_cp=True, train_parts=train_parts)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("blocks.1.ffn.s_emb.weight" in trained) == bool(train_parts)
    assert ("blocks.1.ffn.s1" in trained) == bool(train_parts)
    x, y, m = make_batch(2, 43, seed=7, pad=5)
    assert_same(*chunked(model, x, y, m, 10), *whole(model, x, y, m))


def test_7a_tables_held_in_cpu_memory_equal_whole_sequence(tables_elsewhere):
    """RWKV-7a with the frozen tables held in CPU memory (tables.hold_tables; their rows gathered as on one GPU):
    chunks recomputed inside the backward pass look each chunk's rows up again, and equal the whole sequence with
    the tables in place."""
    from trainer.tables import hold_tables
    model = build("7a", "lora", grad_cp=True)
    x, y, m = make_batch(2, 43, seed=7, pad=5)
    want = whole(model, x, y, m)
    hold_tables(model, emb=True, deep_embed=True)
    assert_same(*chunked(model, x, y, m, 10), *want)
    assert len(tables_elsewhere) == 3 * 4 * 2             # 3 tables, 4 chunks, each chunk's forward run twice


@pytest.mark.parametrize("mode", ["dora", "pissa", "bone", "bat"])
@pytest.mark.parametrize("version", [5, 6, 7])
def test_other_methods(version, mode):
    model = build(version, mode)
    x, y, m = make_batch(2, 37, seed=3)
    assert_same(*chunked(model, x, y, m, 10), *whole(model, x, y, m))


@pytest.mark.parametrize("version", [5, 6, 7])
def test_chunk_op(version):
    """The CPU training op. Chunks of 32 (the op's own block) keep the op's internal blocking the same in
    both runs, so only infctx's differences are measured; 116 = 3·32 + 20."""
    model = build(version, "lora", op="chunk", grad_cp=True)
    x, y, m = make_batch(1, 116, seed=5)
    assert_same(*chunked(model, x, y, m, 32), *whole(model, x, y, m))


@pytest.mark.parametrize("T,chunk", [(6, 1), (20, 20), (20, 64), (21, 7)])
def test_chunk_sizes(T, chunk):
    model = build(6, "state")
    x, y, m = make_batch(2, T, seed=T)
    assert_same(*chunked(model, x, y, m, chunk), *whole(model, x, y, m))


def test_trim_is_exact_and_optional():
    model = build(7, "lora")
    x, y, m = make_batch(2, 50, seed=2, pad=23)    # the last 2 of 5 chunks are padding only
    ref = whole(model, x, y, m)
    assert_same(*chunked(model, x, y, m, 10), *ref)
    assert_same(*chunked(model, x, y, m, 10, trim=False), *ref)


def test_all_masked_out():
    model = build(5, "lora")
    x, y, _ = make_batch(1, 25)
    m = torch.zeros(1, 25)
    loss, g = chunked(model, x, y, m, 10)
    assert loss.item() == 0 and all(t.abs().max() == 0 for t in g.values())
    assert_same(loss + 1, g, whole(model, x, y, m)[0] + 1, whole(model, x, y, m)[1])


def test_gradient_crosses_chunk_boundaries():
    """What the tools before us computed (state detached at each boundary) is measurably different: the
    equality above is not a test that cannot fail."""
    model = build(6, "lora")
    x, y, m = make_batch(1, 40, seed=4)
    loss, state = 0.0, None
    for s in range(0, 40, 10):
        logits, state = model.forward_with_state(x[:, s:s + 10], state)
        state = [tuple(t.detach() for t in layer) for layer in state]
        loss = loss + (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, s:s + 10].flatten(),
                                                         reduction="none") * m[:, s:s + 10].flatten()).sum()
    loss = loss / m.sum()
    cut = grads(model, loss)
    _, ref = whole(model, x, y, m)
    worst = max(((cut[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    assert worst > 1e-3


def test_dropout_masks_are_recomputed_identically():
    """LoRA dropout: each chunk's recompute in the backward pass must draw the same masks as its forward
    pass. Reference: the same chunks without checkpointing (same random stream, the full graph kept)."""
    model = build(7, "lora", dropout=0.5)
    x, y, m = make_batch(2, 30, seed=6)
    m[:, -1] = 1          # no trailing padding: the same three chunks of 10 in both runs
    torch.manual_seed(123)
    total, state = 0.0, None
    for s in range(0, 30, 10):
        logits, state = model.forward_with_state(x[:, s:s + 10], state)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, s:s + 10].flatten(), reduction="none")
        total = total + (ce * m[:, s:s + 10].flatten()).sum()
    ref_loss = total / m.sum()
    ref = grads(model, ref_loss)
    torch.manual_seed(123)
    assert_same(*chunked(model, x, y, m, 10), ref_loss, ref)
    model.eval()   # and dropout really was on: without it the loss differs
    assert abs(masked_loss(model(x), y, m).item() - ref_loss.item()) > 1e-4


def test_without_gradients_and_module_wrapper():
    model = build(7, "state", grad_cp=True)
    x, y, m = make_batch(2, 33, seed=7)
    with torch.no_grad():
        ref = masked_loss(model(x), y, m)
        assert abs(infctx_loss(model, x, y, m, 8).item() - ref.item()) <= TOL * ref.item()
    assert_same(*chunked(model, x, y, m, 8), *whole(model, x, y, m))
    wrapped = InfctxLoss(model, 8)
    loss = wrapped(x, y, m)
    assert_same(loss, grads(model, loss), *whole(model, x, y, m))
    assert model.grad_cp is True     # block checkpointing is restored after forcing it off inside


def test_autocast_applies_in_forward_and_recompute():
    """bf16 autocast on the CPU: the recompute must run under the same autocast as the forward pass (a
    different dtype would make checkpoint refuse the recomputed tensors); the result stays close to the
    ordinary run under the same autocast."""
    model = build(6, "lora")
    x, y, m = make_batch(1, 40, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = masked_loss(model(x), y, m)
    ref = grads(model, ref_loss)
    loss = infctx_loss(model, x, y, m, 10, autocast_ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    g = grads(model, loss)
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    for n in ref:
        assert (g[n] - ref[n]).norm() <= 5e-2 * ref[n].norm() + 1e-6, n


def test_block_cp_inside_chunks_counts():
    """Nested checkpointing: each block runs twice per chunk without block checkpointing (forward,
    recompute) and three times with it (+ the block's own recompute); both exact."""
    model = build(5, "lora", grad_cp=True)
    x, y, m = make_batch(1, 40, seed=9)
    calls = []
    orig = model_mod.Block.forward

    def counting(self, *a, **k):
        calls.append(self.layer_id)
        return orig(self, *a, **k)

    ref = whole(model, x, y, m)
    for block_cp, per_chunk in ((False, 2), (True, 3)):
        calls.clear()
        model_mod.Block.forward = counting
        try:
            got = chunked(model, x, y, m, 10, block_cp=block_cp)
        finally:
            model_mod.Block.forward = orig
        assert calls.count(0) == 4 * per_chunk and calls.count(1) == 4 * per_chunk
        assert_same(*got, *ref)


# --------------------------------------------------------------------------------- memory
class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops created and that are still alive: activations, what
    autograd saved, recomputed chunks, gradients (the parameters themselves are not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                old = self.live.get(s.data_ptr())
                if old is None or old[0].expired():
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        cur = 0
        for k, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[k]
            else:
                cur += n
        self.peak = max(self.peak, cur)
        return out


def peak_bytes(model, fn):
    for p in model.parameters():
        p.grad = None
    with LiveBytes() as mode:
        fn().backward()
    return mode.peak


def test_memory_grows_only_by_the_boundary_states():
    model = build(7, "lora", op="chunk")
    C, chunk = 64, 16
    H, N = 2, 32
    state_bytes = 2 * (2 * C + H * N * N) * 4         # per chunk boundary: 2 layers, B = 1, fp32
    peaks = {}
    for n in (4, 8):
        x, y, m = make_batch(1, n * chunk, seed=n)
        m.fill_(1.0)
        peaks["whole", n] = peak_bytes(model, lambda: masked_loss(model(x), y, m))
        peaks["infctx", n] = peak_bytes(model, lambda: infctx_loss(model, x, y, m, chunk))
    # at T = 8 chunks infctx needs a fraction of ordinary training (the rest: gradients, one chunk)
    assert peaks["infctx", 8] < 0.35 * peaks["whole", 8], peaks
    # 4 more chunks cost ordinary training 4 chunks of activations, infctx 4 boundary states
    grow_whole = peaks["whole", 8] - peaks["whole", 4]
    grow_inf = peaks["infctx", 8] - peaks["infctx", 4]
    assert grow_whole > 0.4 * peaks["whole", 8], peaks
    assert grow_inf <= 4 * state_bytes * 1.25 + 4096, (grow_inf, state_bytes)
    assert grow_inf < 0.1 * grow_whole, peaks


def test_block_cp_lowers_the_chunk_peak():
    """With 4 layers, block checkpointing inside the chunks keeps less of a chunk in the backward pass."""
    torch.manual_seed(0)
    model = random_model(6, 4, 64, vocab_size=VOCAB, seed=0, head_size=32)
    get_method("lora")(SETTINGS["lora"]).apply(model, train_parts=())
    model.op = "chunk"
    model.train()
    x, y, m = make_batch(1, 64, seed=1)
    off = peak_bytes(model, lambda: infctx_loss(model, x, y, m, 32, block_cp=False))
    on = peak_bytes(model, lambda: infctx_loss(model, x, y, m, 32, block_cp=True))
    assert on < 0.8 * off, (on, off)


# --------------------------------------------------------------------------------- warm-up
def test_ctx_len_at():
    # 1024 -> 4096 over 100 steps, whole chunks of 512
    got = [ctx_len_at(s, 1024, 4096, 100, 512) for s in (0, 1, 16, 17, 50, 99, 100, 10_000)]
    assert got == [1024, 1024, 1024, 1536, 2560, 4096 - 512, 4096, 4096]
    lengths = [ctx_len_at(s, 1000, 4096, 100, 512) for s in range(101)]
    assert lengths[0] == 512 and lengths[-1] == 4096          # 1000 rounds down to whole chunks
    assert all(a <= b for a, b in zip(lengths, lengths[1:])) and all(L % 512 == 0 for L in lengths)
    assert ctx_len_at(0, 100, 4000, 10, 512) == 512           # never below one chunk
    assert ctx_len_at(3, 0, 4096, 100, 512) == 4096           # off
    assert ctx_len_at(3, 1024, 4096, 0, 512) == 4096
    assert ctx_len_at(5, 4096, 4096, 100, 512) == 4096
    assert [ctx_len_at(s, 100, 300, 4) for s in range(5)] == [96, 144, 192, 240, 300]   # multiple 16
    assert ctx_len_at(99, 1024, 4100, 100, 512) == 3584 and ctx_len_at(100, 1024, 4100, 100, 512) == 4100


def test_cut_batch():
    b = {"input_ids": torch.arange(20).view(2, 10), "targets": torch.arange(20).view(2, 10) + 1,
         "mask": torch.ones(2, 10), "lengths": torch.tensor([10, 7])}
    c = cut_batch(b, 4)
    assert c["input_ids"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert c["targets"].shape == (2, 4) and c["mask"].shape == (2, 4)
    assert c["lengths"] is b["lengths"]
    assert cut_batch(b, 50)["input_ids"].shape == (2, 10)


# --------------------------------------------------------------------------------- refusals
def cfg(**kw):
    base = TrainConfig.from_env(dict(MODEL="m.pth", DATA="d", CTX_LEN="4096"))
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("kw,words", [
    (dict(TRAIN_TYPE="infctx", CHUNK_CTX=8192), ["CHUNK_CTX=8192", "larger than CTX_LEN=4096"]),
    (dict(TRAIN_TYPE="infctx", CHUNK_CTX=0), ["CHUNK_CTX=0"]),
    (dict(TRAIN_TYPE="infctx", STRATEGY="deepspeed_stage_3"), ["deepspeed_stage_3", "stage_2"]),
    (dict(TRAIN_TYPE="infctx", STRATEGY="deepspeed_stage_3_offload"), ["deepspeed_stage_3_offload"]),
    (dict(INITIAL_CTX_LEN=1024), ["INITIAL_CTX_LEN=1024", "CTX_WARMUP_STEPS=0"]),
    (dict(CTX_WARMUP_STEPS=50), ["CTX_WARMUP_STEPS=50", "INITIAL_CTX_LEN=0"]),
    (dict(INITIAL_CTX_LEN=8192, CTX_WARMUP_STEPS=50), ["INITIAL_CTX_LEN=8192", "larger than CTX_LEN=4096"]),
])
def test_refusals(kw, words):
    problems = infctx_problems(cfg(**kw))
    assert len(problems) == 1
    message, fix = problems[0]
    for w in words:
        assert w in message + " " + fix, (w, message, fix)
    with pytest.raises(UserError) as err:
        check_infctx(cfg(**kw))
    assert err.value.message == message and err.value.fix == fix


@pytest.mark.parametrize("kw", [
    dict(TRAIN_TYPE="infctx", CHUNK_CTX=512),
    dict(TRAIN_TYPE="infctx", CHUNK_CTX=4096),
    dict(TRAIN_TYPE="infctx", CHUNK_CTX=500),                       # does not divide CTX_LEN: fine
    dict(TRAIN_TYPE="infctx", CHUNK_CTX=512, DATALOAD="only", MICRO_BSZ=1, FINETUNE_MODE="state",
         GRAD_CP=False, OP="fla", LORA_DROPOUT=0.1, STRATEGY="deepspeed_stage_2"),
    dict(TRAIN_TYPE="infctx", CHUNK_CTX=512, INITIAL_CTX_LEN=1024, CTX_WARMUP_STEPS=100),
    dict(INITIAL_CTX_LEN=1024, CTX_WARMUP_STEPS=100),               # warm-up also in normal training
    dict(CHUNK_CTX=99999),                                          # ignored without infctx
])
def test_accepted(kw):
    assert infctx_problems(cfg(**kw)) == []
    check_infctx(cfg(**kw))


# --------------------------------------------------------------------------------- GPU (the lead runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["fla", "rwkvfla"])
@pytest.mark.parametrize("version", [6, 7])
def test_gpu_kernels_carry_the_state_gradient(op, version):
    """The Triton kernels take the final state's gradient (dht) and give the initial state's (dh0):
    infctx with them matches whole-sequence training with them, in bf16 (loose tolerance), state tuning
    included. 200 = 3·64 + 8: a short last chunk."""
    from trainer.ops import why_unavailable
    reason = why_unavailable(op, "cuda")
    if reason:
        pytest.skip(reason)
    model = build(version, "state").cuda()
    model.op = op
    x, y, m = (t.cuda() for t in make_batch(2, 200, seed=11))
    m[:, -1] = 1

    def run(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        return loss, grads(model, loss)

    ref_loss, ref = run(lambda: masked_loss(model(x), y, m))
    loss, got = run(lambda: infctx_loss(model, x, y, m, 64))
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    for n in ref:
        assert (got[n] - ref[n]).norm() <= 5e-2 * ref[n].norm() + 1e-6, n
