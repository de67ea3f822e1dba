"""trainer/memory.py: the estimate's terms, its shape (monotone, GRAD_CP, quantisation, strategies), the
suggestions (trainer/advice.py), the trainer's print, the plan's memory searches (trainer/plan.py), the driver and
allocator calls (trainer/device.py), and the estimate's accuracy against two references: the fake-tensor
simulation of our own training step (bench/calibrate_memory.py, CPU) and measured GPU rows
(bench/memory_measured.jsonl, skipped until the file has some)."""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import advice
from trainer import device as gpu
from trainer import memory as M
from trainer import plan as PL
from trainer.checkpoint import (config_from_sizes, detect_config, expected_shapes, init_model, load_checkpoint,
                                save_atomic)
from trainer.config import TrainConfig
from trainer.counts import param_table
from trainer.memory import GiB
from trainer.peft.base import TARGET_RE
from trainer.plan import Machine, nominal, resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def cfg_(**kw) -> TrainConfig:
    env = dict(MODEL="m.pth", DATA="d", FINETUNE_MODE="lora", LORA_R="64", CTX_LEN="1024", MICRO_BSZ="1",
               GRAD_CP="1", PRECISION="bf16", OP="fla")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


def plan_(cfg, sizes, op=None, plain_top=0, keep_products=0, **fixed) -> PL.RunPlan:
    """The plan on the nominal GPU (a current GPU, free memory unknown: no searches) with GRAD_CP's tiers
    (plain_top, keep_products) and ``fixed`` plan fields (emb_on_cpu=, ffn_pieces=, cudagraphs=, ...)."""
    return nominal(cfg, sizes, op=op, tiers=(plain_top, keep_products), **fixed)


def estimate(cfg, sizes, op=None, plain_top=0, keep_products=0, **fixed) -> M.Estimate:
    """What the memory estimate says for that plan."""
    return plan_(cfg, sizes, op, plain_top, keep_products, **fixed).estimate


def on_gpu(cfg, sizes, free, op=None, host=None, **machine) -> PL.RunPlan:
    """The plan on a GPU with ``free`` bytes free (as nvidia-smi shows it before the run) and ``host`` bytes of
    CPU memory available (None: unknown): GRAD_CP=auto's and OFFLOAD_BLOCKS=auto's searches run."""
    return resolve(cfg, sizes, Machine(free=free, host=host, **machine), op=op)


def preflight(cfg, sizes, free, op=None, host=None) -> tuple[PL.RunPlan, list[str]]:
    """The plan on such a GPU and the lines the trainer prints before loading (advice.report)."""
    plan = on_gpu(cfg, sizes, free, op=op, host=host)
    return plan, advice.report(plan)


def sizes_of(path: Path):
    """The ModelConfig of a model file (as loop.prepare reads it)."""
    return detect_config(load_checkpoint(path), path)


B15 = config_from_sizes(7, 24, 2048)           # RWKV-7 1.5B
TINY = config_from_sizes(7, 2, 128, vocab_size=256)


# ------------------------------------------------------------------------------------------ the counts
@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("mode,parts", [("lora", ()), ("pissa", ("ln",)), ("bone", ("time",)), ("bat", ()),
                                        ("state", ("time", "ln")), ("full", ()), ("lora", ("emb", "head")),
                                        ("dora", ("ln",)), ("miss", ())])
def test_param_table_counts_what_the_trainer_builds(monkeypatch, version, mode, parts):
    """Trained and total elements equal those of a model with the method applied as loop.prepare does; so
    does one block's streamed part (OFFLOAD_BLOCKS; its size limit lowered to the tiny model's matrices)."""
    from trainer import offload
    monkeypatch.setattr(offload, "STREAM_MIN_NUMEL", 1024)
    from trainer.peft import get_method
    sizes = config_from_sizes(version, 2, 128, vocab_size=256)
    cfg = cfg_(FINETUNE_MODE=mode, TRAIN_PARTS=" ".join(parts), LORA_R=8, PISSA_R=8, DISHA_R=32)
    model = init_model(sizes)
    total = sum(p.numel() for p in model.parameters())
    method = get_method(mode)(get_method(mode).settings_from(cfg))
    method.apply(model, train_parts=cfg.TRAIN_PARTS)
    if version == 7:                     # as prepare: layer 0's unused v0/v1/v2 never train
        for name in ("v0", "v1", "v2"):
            getattr(model.blocks[0].att, name).requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for n, b in model.named_buffers() if "pissa_init" in n)
    t = param_table(cfg, sizes)
    assert (t.total, t.trained, t.buffers) == (total, trained, buffers)
    assert t.frozen + t.trained_base == total
    from trainer.strategy import BNB_MIN_8BIT          # what OPTIMIZER=adamw8bit keeps fp32 states for
    small = sum(p.numel() for p in model.parameters() if p.requires_grad and p.numel() < BNB_MIN_8BIT)
    assert t.trained_small == small
    if mode != "full":
        assert t.block_streamed == sum(p.numel() for p in offload.streamable(model.blocks[1]).values()) > 0


@pytest.mark.parametrize("mode,parts", [("lora", ()), ("full", ()), ("full", ("deepembed",)),
                                        ("state", ("deepembed", "time")), ("bat", ("ln",))])
def test_7a_deep_embed_counts_as_frozen_base_unless_trained(mode, parts):
    """RWKV-7a: the DeepEmbed tensors are base weights, frozen (full fine-tuning too) unless TRAIN_PARTS has
    deepembed: the counts equal the model's with the method applied, and the estimate holds their weights."""
    from trainer.peft import get_method
    sizes = dataclasses.replace(config_from_sizes(7, 2, 128, vocab_size=256), deep_embed=32)
    cfg = cfg_(FINETUNE_MODE=mode, TRAIN_PARTS=" ".join(parts), LORA_R=8, DISHA_R=32)
    model = init_model(sizes)
    total = sum(p.numel() for p in model.parameters())
    method = get_method(mode)(get_method(mode).settings_from(cfg))
    method.apply(model, train_parts=cfg.TRAIN_PARTS)
    for name in ("v0", "v1", "v2"):
        getattr(model.blocks[0].att, name).requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t = param_table(cfg, sizes)
    assert (t.total, t.trained) == (total, trained)
    de = sum(p.numel() for n, p in model.named_parameters() if ".s_emb" in n or n.rsplit(".", 1)[-1] in
             ("s0", "s1", "s2"))
    assert de == 2 * (256 * 1024 + 1024 * 128 + 128 * 32 + 32 * 512 + 512)
    assert t.frozen + t.trained_base == total and t.frozen >= (0 if "deepembed" in parts else de)
    if mode != "full":                # offload streams the DeepEmbed matrices, never the table (tables.is_table)
        from trainer import offload
        assert t.block_streamed == sum(p.numel() for p in offload.streamable(model.blocks[1]).values()) > 0
    big = dataclasses.replace(B15, deep_embed=32)      # a 1.5B 7a: 1.6B DeepEmbed numbers, 3 GiB in bf16
    a, b = estimate(cfg_(), B15), estimate(cfg_(), big, deep_embed_on_cpu=False)
    assert b.peak_allocated - a.peak_allocated >= 2 * 24 * 65536 * 1024


@pytest.mark.parametrize("changes, on_cpu", [
    ({}, True), (dict(FINETUNE_MODE="state"), True), (dict(FINETUNE_MODE="full"), True), (dict(QUANT="nf4"), True),
    (dict(TRAIN_PARTS="deepembed"), False), (dict(GPU_COUNT=2), False), (dict(STRATEGY="deepspeed_stage_2"), False)])
def test_deep_embed_tables_stay_on_the_cpu_where_frozen_on_one_gpu(changes, on_cpu):
    """A 1.5B RWKV-7a model's s_emb tables (24 x 65536 x 32², 3 GiB in bf16) stay in CPU memory where they are
    frozen (every method, full fine-tuning included, unless TRAIN_PARTS has deepembed) on one GPU without
    DeepSpeed, as the embedding does: the weights drop by exactly their bytes, the peak by that less the rows
    the checkpointed blocks then keep as an input (r² a token; a table on the GPU is looked up inside the block,
    so its blocks keep the ids), and the plan says where they are. A plain RWKV-7 has none."""
    big = dataclasses.replace(B15, deep_embed=32)
    cfg = cfg_(**changes)
    plan = plan_(cfg, big)
    assert PL.deep_embed_on_cpu(cfg, big) is on_cpu and plan.deep_embed_on_cpu is on_cpu
    assert f"DeepEmbed tables (ffn.s_emb) in {'CPU' if on_cpu else 'GPU'} memory" in plan.describe()[3]
    tables = 24 * 65536 * 32 ** 2 * 2
    on_gpu_ = estimate(cfg, big, deep_embed_on_cpu=False)
    assert on_gpu_.terms["weights"] - plan.estimate.terms["weights"] == (tables if on_cpu else 0)
    rows = plan.estimate.terms["saved"] - on_gpu_.terms["saved"]
    assert 0 <= rows <= 24 * 1024 * 32 ** 2 * 2 and (on_cpu or rows == 0)        # 1 x 1024 tokens in bf16, a layer
    if not changes:                  # every block checkpointed: each keeps its rows
        assert rows == 24 * 1024 * 32 ** 2 * 2
    drop = on_gpu_.peak_allocated - plan.estimate.peak_allocated      # the rows count where the peak is the step's
    assert (tables - rows - 1 <= drop <= tables) if on_cpu else drop == 0
    plain = plan_(cfg, B15)
    assert not PL.deep_embed_on_cpu(cfg, B15) and "DeepEmbed" not in " ".join(plain.describe())



@pytest.mark.parametrize("version", [5, 6, 7])
def test_dora_counts_are_loras_plus_a_magnitude_per_output_row(version):
    """DoRA trains LoRA's A and B plus m [out] per adapted linear: its trained count is LoRA's + the adapted
    linears' output widths, its pieces the same plus the m vectors (small: adamw8bit keeps fp32 states for them);
    the row norms cost 2·r·out·in (A Wᵀ) + 2·r²·(in + out) per forward pass; the estimate keeps each linear's
    unscaled output (bf16) per token beside LoRA's: saved grows by that."""
    sizes = config_from_sizes(version, 2, 128, vocab_size=256)
    lora, dora = (param_table(cfg_(FINETUNE_MODE=m, LORA_R=8), sizes) for m in ("lora", "dora"))
    targets = [s for k, s in expected_shapes(sizes).items()
               if k.endswith(".weight") and TARGET_RE.match(k[: -len(".weight")])]
    rows = sum(s[0] for s in targets)
    assert dora.trained - lora.trained == rows and dora.trained_small - lora.trained_small == rows
    assert dora.adapter_matmul == lora.adapter_matmul and dora.adapted_layers == lora.adapted_layers
    assert dora.adapter_step_flops == sum(2 * 8 * o * i + 2 * 64 * (i + o) for o, i in targets)
    assert dora.block_saved == rows // 2 and lora.block_saved == 0
    kw = dict(LORA_R=8, CTX_LEN=64, MICRO_BSZ=2, GRAD_CP=0, OP="chunk", COMPILE=0)
    e_lora, e_dora = (estimate(cfg_(FINETUNE_MODE=m, **kw), sizes, emb_on_cpu=False) for m in ("lora", "dora"))
    BT = 128
    # (the m vectors are counted among the trained matrix elements, whose bf16 autocast copy a block keeps: 2 bytes
    # each, an over-count of a few KiB per block, as m is only multiplied element-wise)
    assert e_dora.terms["saved"] - e_lora.terms["saved"] == pytest.approx(
        M.ADAPTED_SAVED_BYTES * rows * BT + M.CAST_BYTES * rows)
    assert e_dora.terms["trained"] - e_lora.terms["trained"] == 4 * rows


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_bytes_equal_quantize_model(quant):
    from trainer.peft import get_method
    from trainer.quant import quantize_model
    cfg = cfg_(QUANT=quant, LORA_R=8)
    model = init_model(TINY)
    get_method("lora")(get_method("lora").settings_from(cfg)).apply(model)
    report = quantize_model(model, quant)
    t = param_table(cfg, TINY)
    assert (t.quantised, t.quantised_bytes) == (report.weights, report.quantised_bytes)


def test_breakdown_of_a_tiny_config_by_hand():
    """RWKV-7, 2 layers × 128, vocabulary 256, LoRA r 8 on its 6 linears per layer, CTX_LEN 64, MICRO_BSZ 2,
    GRAD_CP 0, op chunk, bf16, not compiled: every term written out from the formula in the module docstring."""
    cfg = cfg_(LORA_R=8, CTX_LEN=64, MICRO_BSZ=2, GRAD_CP=0, OP="chunk", COMPILE=0)
    C, L, V, BT = 128, 2, 256, 128
    lora = L * (4 * 8 * (C + C) + 2 * 8 * (C + 4 * C))          # att r/k/v/o, ffn key and value
    assert lora == 36_864
    t = param_table(cfg, TINY)
    total = t.total
    # base: emb + head 2·V·C; per layer 4·C² + 2·4C·C linears, the low-rank w, a, v, g pairs C·d each way, and
    # 19 tensors of C elements (11 time-mix vectors, r_k [H, N], ln_x 2, ln1 2, ln2 2, ffn x_k); ln0, ln_out 2·C
    d_decay, d_aaa, d_mv, d_gate = TINY.d_decay, TINY.d_aaa, TINY.d_mv, TINY.d_gate
    assert (d_decay, d_aaa, d_mv, d_gate) == (32, 32, 32, 64)
    per_layer = 12 * C * C + 2 * C * (d_decay + d_aaa + d_mv + d_gate) + 19 * C
    assert total == 2 * V * C + L * per_layer + 2 * 2 * C
    p = plan_(cfg, TINY)
    e = p.estimate
    assert PL.embedding_on_cpu(cfg, p.method) and p.emb_on_cpu       # one GPU, the embedding frozen
    assert e.terms["weights"] == (total - V * C) * 2
    assert estimate(cfg, TINY, emb_on_cpu=False).terms["weights"] == total * 2
    total -= V * C                                                   # what stays on the GPU
    assert e.terms["trained"] == lora * 4
    assert (e.terms["optimizer"], e.terms["grads"], e.terms["step"]) == (lora * 8, lora * 4, 0)
    layer = (M.ACT[7]["low_rank"] + M.WKV_SAVED["chunk"][7]) * C + 2 * (8 - 64) * 6   # per token and layer
    block_lora = 4 * 8 * 2 * C + 2 * 8 * 5 * C                                     # autocast's bf16 copies
    assert e.terms["saved"] == pytest.approx(L * (layer * BT + M.CAST_BYTES * block_lora))
    assert e.terms["head"] == M.HEAD_BYTES * BT * V + 2 * BT * C     # one chunk (BT < 1024 tokens) + dx
    assert e.terms["layer"] == (M.BWD_WORK[False] + M.WKV_WORK["chunk"][7]) * C * BT
    start = e.terms["saved"] + e.terms["head"]                       # the head's backward
    after = e.terms["saved"] + e.terms["layer"] + e.terms["grads"] / L  # the top block's backward
    assert e.train_peak == pytest.approx(total * 2 + lora * 4 + lora * 8 + max(start, after, lora * 4))
    assert e.peak_allocated == max(e.train_peak, e.load_peak)
    slack = M.ALLOCATOR_SLACK if p.grow_segments else M.ALLOCATOR_SLACK_FIXED   # the plan's allocator
    assert not p.cudagraphs
    assert e.total == pytest.approx(e.peak_allocated * (1 + slack) + M.CUDA_CONTEXT)
    assert "head" in e.table() and "total" in e.table()


# ------------------------------------------------------------------------------------------ its shape
@pytest.mark.parametrize("mode", ["lora", "state", "full", "bone"])
def test_monotone_in_ctx_and_batch(mode):
    from trainer.memory import CUDA_GRAPHS

    def total(cfg):     # without the CUDA graphs' pool, which small steps alone have (it stops at a size)
        p = plan_(cfg, B15)
        return p.estimate.total - (CUDA_GRAPHS if p.cudagraphs else 0)
    for cp in (0, 1):
        by_ctx = [total(cfg_(FINETUNE_MODE=mode, CTX_LEN=t, GRAD_CP=cp)) for t in (256, 512, 1024, 2048, 4096)]
        by_bsz = [total(cfg_(FINETUNE_MODE=mode, MICRO_BSZ=b, GRAD_CP=cp)) for b in (1, 2, 4, 8)]
        assert all(a <= b for a, b in zip(by_ctx, by_ctx[1:])), by_ctx
        assert all(a <= b for a, b in zip(by_bsz, by_bsz[1:])), by_bsz
    # (full fine-tuning at GRAD_CP=1 peaks in the optimizer step until the activations outgrow it)
    small, large = (estimate(cfg_(FINETUNE_MODE=mode, CTX_LEN=t, MICRO_BSZ=b), B15).total
                    for t, b in ((256, 1), (8192, 8)))
    assert large > small


@pytest.mark.parametrize("mode", ["lora", "state", "pissa", "bone", "bat"])
def test_grad_cp_lowers_the_peak(mode):
    for ctx, bsz in ((1024, 1), (4096, 4)):
        on = estimate(cfg_(FINETUNE_MODE=mode, CTX_LEN=ctx, MICRO_BSZ=bsz, GRAD_CP=1), B15)
        off = estimate(cfg_(FINETUNE_MODE=mode, CTX_LEN=ctx, MICRO_BSZ=bsz, GRAD_CP=0), B15)
        assert on.total < off.total
        assert on.terms["saved"] < off.terms["saved"]


@pytest.mark.parametrize("mode", ["lora", "state", "full", "bat"])
@pytest.mark.parametrize("ctx,bsz,compile_", [(1024, 1, "auto"), (4096, 8, "auto"), (2048, 2, "0")])
def test_leaving_top_blocks_uncheckpointed_costs_memory_step_by_step(mode, ctx, bsz, compile_):
    """GRAD_CP with plain_top k (GRAD_CP=auto's plan): the estimate grows with k, from GRAD_CP=1's at k 0 to
    GRAD_CP=0's at k = L, term by term."""
    cfg = cfg_(FINETUNE_MODE=mode, CTX_LEN=ctx, MICRO_BSZ=bsz, GRAD_CP="auto", COMPILE=compile_, OP="triton")
    L = B15.n_layer
    ests = [estimate(cfg, B15, plain_top=k) for k in range(L + 1)]
    # (full: may peak elsewhere; the first block left out can lower the peak by the one input it no longer keeps)
    assert all(a.peak_allocated <= b.peak_allocated * 1.01 for a, b in zip(ests, ests[1:]))
    assert all(a.terms["saved"] < b.terms["saved"] for a, b in zip(ests, ests[1:]))
    one = estimate(dataclasses.replace(cfg, GRAD_CP="1"), B15)
    none = estimate(dataclasses.replace(cfg, GRAD_CP="0"), B15)
    assert estimate(cfg, B15).terms == one.terms and plan_(cfg, B15).plain_top == 0
    assert estimate(cfg, B15, plain_top=L).terms == pytest.approx(none.terms)
    assert plan_(cfg, B15, plain_top=L + 5).plain_top == L
    assert plan_(dataclasses.replace(cfg, GRAD_CP="0"), B15, plain_top=3).plain_top == 0


def test_plan_checkpointing_takes_the_most_blocks_that_fit(monkeypatch):
    """Without the products tier (COMPILE=0 or fla: nothing keeps products), the most top blocks that fit
    (plan.resolve's GRAD_CP=auto search on a GPU with that much free)."""
    for extra in (dict(OP="fla"), dict(OP="triton", COMPILE="0")):
        cfg = cfg_(FINETUNE_MODE="full", CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP="auto", **extra)
        assert not plan_(cfg, B15).keeps_products()
        L = B15.n_layer
        for free in (40 * GiB, 60 * GiB, 79 * GiB, 500 * GiB, 10 * GiB):
            plan = on_gpu(cfg, B15, free)
            k, est = plan.plain_top, plan.estimate
            assert plan.keep_products == 0 and est.total == estimate(cfg, B15, plain_top=k).total
            if k:
                assert est.total <= M.FIT_FRACTION * free
            if k < L:   # one more would not fit (or none fits: all checkpointed)
                assert estimate(cfg, B15, plain_top=k + 1).total > M.FIT_FRACTION * free
        assert on_gpu(cfg, B15, 500 * GiB).plain_top == L
        assert on_gpu(cfg, B15, 10 * GiB).plain_top == 0
    # measured on an H100 (bench/RESULTS.md, session 8, before the products tier): 79 GiB free -> 7 blocks,
    # 63.3 GiB allocated
    cfg = cfg_(FINETUNE_MODE="full", CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP="auto", OP="triton")
    monkeypatch.setattr(M, "KP_SAVED", {})
    assert on_gpu(cfg, B15, 79 * GiB).plain_top == 7
    monkeypatch.undo()
    for other in (dict(GRAD_CP="1"), dict(TRAIN_TYPE="infctx", CHUNK_CTX=512),
                  dict(STRATEGY="deepspeed_stage_2", GPU_COUNT=2)):
        for op in ("fla", "triton"):
            plan = on_gpu(dataclasses.replace(cfg, OP=op, **other), B15, 500 * GiB)
            assert plan.plain_top == plan.keep_products == 0, (other, op)


def test_blocks_keeping_their_products_cost_memory_and_the_plan_uses_them():
    """The middle tier (compiled blocks, our Triton op, full and LoRA): each block that keeps its products
    adds KP_SAVED per channel and token; the plan maximises plain + KP_SPEED * kept among what fits."""
    cfg = cfg_(FINETUNE_MODE="full", CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP="auto", OP="triton")
    L = B15.n_layer
    assert plan_(cfg, B15).keeps_products()
    # not with CUDA graphs (small steps: ctx 1024 x 1 at this width)
    assert not plan_(dataclasses.replace(cfg, CTX_LEN=1024, MICRO_BSZ=1), B15).keeps_products()
    assert plan_(dataclasses.replace(cfg, CTX_LEN=1024, MICRO_BSZ=1), B15, keep_products=3).keep_products == 0
    ests = [estimate(cfg, B15, keep_products=m) for m in range(L + 1)]
    steps = [b.terms["saved"] - a.terms["saved"] for a, b in zip(ests, ests[1:])]
    assert steps == pytest.approx([M.KP_SAVED["full"] * 2048 * 4096 * 8] * L)
    # (the first few can lower the peak a little: it comes at the first fully checkpointed block's recompute)
    assert all(a.peak_allocated <= b.peak_allocated * 1.01 for a, b in zip(ests, ests[1:]))
    assert plan_(cfg, B15, plain_top=20, keep_products=10).keep_products == 4      # at most the rest
    all_plain = estimate(cfg, B15, plain_top=L)
    assert all_plain.terms == pytest.approx(estimate(cfg, B15, plain_top=L, keep_products=3).terms)
    # no tier where it was not measured (state) or cannot run (COMPILE=0, fla)
    for other in (dict(FINETUNE_MODE="state"), dict(COMPILE="0"), dict(OP="fla")):
        assert plan_(dataclasses.replace(cfg, **other), B15, keep_products=5).keep_products == 0, other
    for free in (30 * GiB, 45 * GiB, 79 * GiB, 200 * GiB):
        plan = on_gpu(cfg, B15, free)
        est, p, m = plan.estimate, plan.plain_top, plan.keep_products
        assert (est.total <= M.FIT_FRACTION * free or p == m == 0) and p + m <= L
        score = p + M.KP_SPEED * m
        for q in range(L + 1):           # no plan that fits scores better
            for n in range(L + 1 - q):
                if estimate(cfg, B15, plain_top=q, keep_products=n).total <= M.FIT_FRACTION * free:
                    assert q + M.KP_SPEED * n <= score + 1e-9, (free, (p, m), (q, n))
    # the H100 of session 9: 79 GiB free -> 1 block not checkpointed, 23 keeping their products
    plan = on_gpu(cfg, B15, 79 * GiB)
    assert (plan.plain_top, plan.keep_products) == (1, 23)
    # the plan in words (Estimate.plan() is gone: RunPlan.tiers(), which the trainer prints and describe() shows)
    said = plan.tiers()
    assert "the top block keeps its activations" in said and "23 of those keep their matrix products" in said


def test_preflight_says_what_grad_cp_auto_planned(tiny_world_model, monkeypatch):
    """What the trainer prints before loading (advice.report of the plan resolved on the GPU at hand, whose free
    memory device.gpu_free_before reads)."""
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(80 * GiB), 80 * GiB))
    sizes, free = sizes_of(tiny_world_model), gpu.gpu_free_before(torch.device("cuda"))
    for grad_cp, said in (("auto", "GRAD_CP=auto: 0 of 2 blocks checkpointed, the top 2 keep their activations"),
                          ("1", None)):
        plan, lines = preflight(cfg_(GRAD_CP=grad_cp), sizes, free)
        assert plan.plain_top == (2 if grad_cp == "auto" else 0)
        assert any(ln.startswith(said) for ln in lines) if said else not any("GRAD_CP" in ln for ln in lines)
    plan, lines = preflight(cfg_(GRAD_CP="auto", TRAIN_TYPE="infctx", CTX_LEN=2048, CHUNK_CTX=512), sizes, free)
    assert plan.plain_top == 0
    assert "GRAD_CP=auto: 2 of 2 blocks checkpointed (infctx and DeepSpeed checkpoint every block)" in lines
    # a plan with each tier (forced: the tiny model fits whole), as the trainer words it
    monkeypatch.setattr(PL, "_search_tiers", lambda plan: dataclasses.replace(plan, plain_top=1, keep_products=1))
    _, lines = preflight(cfg_(GRAD_CP="auto"), sizes, free)
    assert ("GRAD_CP=auto: 1 of 2 blocks checkpointed, the top block keeps its activations (no recompute: "
            "faster); 1 of those keeps their matrix products (only the rest is recomputed)") in lines, lines


def test_nf4_below_int8_below_bf16():
    w = {q: estimate(cfg_(QUANT=q), B15).terms["weights"] for q in ("none", "int8", "nf4")}
    assert w["nf4"] < w["int8"] < w["none"]
    # the quantised linears hold most of the model: about 0.56 and 1.0 bytes instead of 2 per weight
    t = param_table(cfg_(QUANT="nf4"), B15)
    assert w["none"] - w["nf4"] == pytest.approx(t.quantised * 2 - t.quantised_bytes)
    assert t.quantised_bytes == pytest.approx(t.quantised * 0.5625, rel=1e-3)


def test_quantised_load_peak():
    """QLoRA (but PiSSA) quantises from the file into the GPU one weight at a time: 7B nf4 loads in far less
    than its bf16 weights, and its peak is training. PiSSA loads every weight in bf16 first (its SVD)."""
    b7 = config_from_sizes(6, 32, 4096)
    bf16 = param_table(cfg_(), b7).total * 2
    e = estimate(cfg_(QUANT="nf4", TRAIN_PARTS="time ln"), b7)
    assert e.load_peak < 0.45 * bf16 and e.peak_at != "loading"
    p = estimate(cfg_(QUANT="nf4", FINETUNE_MODE="pissa"), b7)
    assert p.load_peak >= bf16 and p.peak_at == "loading"


def test_strategies_shard_what_they_should():
    """DDP: everything per GPU + gradient buckets. DeepSpeed (bf16 working copies, fp32 masters in its
    optimizer) over 4 GPUs: stage 1 shards masters and AdamW states, stage 2 also the grads, stage 3 also
    the weights; offload moves the optimizer to the CPU."""
    base = dict(FINETUNE_MODE="full", CTX_LEN=512, GPU_COUNT=4)
    P = param_table(cfg_(**base), B15).trained
    ddp = estimate(cfg_(**base), B15).terms
    s1 = estimate(cfg_(**base, STRATEGY="deepspeed_stage_1"), B15).terms
    s2 = estimate(cfg_(**base, STRATEGY="deepspeed_stage_2"), B15).terms
    s2o = estimate(cfg_(**base, STRATEGY="deepspeed_stage_2_offload"), B15).terms
    s3 = estimate(cfg_(**base, STRATEGY="deepspeed_stage_3"), B15).terms
    assert (ddp["trained"], ddp["optimizer"], ddp["grads"]) == (4 * P, 8 * P, 4 * P)
    assert ddp["buckets"] == M.DDP_BUCKET_BYTES * P
    assert (s1["trained"], s1["optimizer"], s1["grads"]) == (2 * P, (8 + 4) * P / 4, 2 * P)
    assert (s2["optimizer"], s2["grads"]) == ((8 + 4) * P / 4, 2 * P / 4)
    assert s2o["optimizer"] == 0 and s2o["step"] == 0 and s2o["grads"] == 2 * P / 4
    assert s3["weights"] + s3["trained"] < (s2["weights"] + s2["trained"]) / 3
    assert s1["buckets"] == 2 * min(M.DEEPSPEED_BUCKET_ELEMS, P) * 2
    one_gpu = estimate(cfg_(FINETUNE_MODE="full", CTX_LEN=512), B15)
    assert one_gpu.terms["buckets"] == 0
    # DeepSpeed runs bf16 through: its blocks keep bf16 inputs, as our bf16 stream does; with fp16 autocast
    # the stream stays fp32 (GRAD_CP=1 keeps twice the bytes)
    lora = dict(CTX_LEN=4096, MICRO_BSZ=4)
    saved = estimate(cfg_(**lora), B15).terms["saved"]
    assert estimate(cfg_(**lora, STRATEGY="deepspeed_stage_1"), B15).terms["saved"] == saved
    assert M.CP_SAVED_DS == M.CP_SAVED["bf16"] == 2.0
    assert estimate(cfg_(**lora, PRECISION="fp16"), B15).terms["saved"] == 2 * saved


# ------------------------------------------------------------------------------------------ suggestions
@pytest.mark.parametrize("case", [dict(CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP=0, TRAIN_PARTS="time ln"),
                                  dict(CTX_LEN=8192, MICRO_BSZ=8, GRAD_CP=1, COMPILE=0),
                                  dict(FINETUNE_MODE="state", CTX_LEN=16384, MICRO_BSZ=8),
                                  dict(FINETUNE_MODE="full", CTX_LEN=4096, MICRO_BSZ=8)])
@pytest.mark.parametrize("free_gib", [12, 24])
def test_every_suggestion_fits_when_re_estimated(case, free_gib):
    cfg = cfg_(**case)
    free = free_gib * GiB
    assert estimate(cfg, B15).total > free                 # it does not fit as it is
    found = advice.suggestions(nominal(cfg, B15), free)
    lines = advice.suggest(nominal(cfg, B15), free)
    assert len(lines) == max(1, len(found))
    for change in found:
        again = estimate(dataclasses.replace(cfg, **change.settings), B15)
        assert again.total <= free and again.total == change.estimate.total
        for k, v in change.settings.items():
            assert f"{k}={v}" in change.line()
        if "MICRO_BSZ" in change.settings:                  # the batch per optimizer step is kept
            assert change.settings["MICRO_BSZ"] * change.settings["MINI_BSZ"] == cfg.MICRO_BSZ * cfg.MINI_BSZ


def test_compiled_blocks_are_estimated_leaner_and_suggested():
    """COMPILE (auto: on a GPU, QUANT or not) scales the per-token activations by the fitted factor; with
    COMPILE=0 at a size that does not fit, COMPILE=auto is the first change suggested."""
    big = dict(CTX_LEN=4096, MICRO_BSZ=8)
    eager, compiled = estimate(cfg_(**big, COMPILE=0), B15), estimate(cfg_(**big), B15)
    assert compiled.terms["layer"] < 0.5 * eager.terms["layer"] and compiled.terms["saved"] == eager.terms["saved"]
    assert estimate(cfg_(**big, QUANT="nf4"), B15).terms["layer"] < 0.5 * estimate(
        cfg_(**big, QUANT="nf4", COMPILE=0), B15).terms["layer"]
    found = advice.suggestions(nominal(cfg_(**big, COMPILE=0), B15), (eager.total + compiled.total) / 2)
    assert found[0].settings == {"COMPILE": "auto"}


def test_suggestions_start_with_the_cheapest():
    found = advice.suggestions(nominal(cfg_(CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP=0), B15), 24 * GiB)
    assert len(found) >= 2 and [c.cost for c in found] == sorted(c.cost for c in found)
    found = advice.suggestions(nominal(cfg_(CTX_LEN=4096, MICRO_BSZ=1, GRAD_CP=0), B15), 12 * GiB)
    assert found[0].settings == {"GRAD_CP": "auto"}        # no change of results, only slower (the least)
    assert found[0].estimate.total == estimate(cfg_(CTX_LEN=4096, MICRO_BSZ=1, GRAD_CP=1), B15).total
    # where GRAD_CP=auto checkpoints every block anyway (DeepSpeed, infctx), it says GRAD_CP=1
    ds = cfg_(CTX_LEN=4096, MICRO_BSZ=1, GRAD_CP=0, STRATEGY="deepspeed_stage_2", GPU_COUNT=2)
    found = advice.suggestions(nominal(ds, B15), estimate(dataclasses.replace(ds, GRAD_CP="1"), B15).total + GiB)
    assert {"GRAD_CP": 1} in [c.settings for c in found] and all("auto" not in c.line() for c in found)
    assert any(c.settings.get("TRAIN_TYPE") == "infctx" for c in found[1:])
    assert advice.suggest(nominal(cfg_(), B15), 80 * GiB) == []             # it fits: nothing to say


def test_adamw8bit_keeps_two_bytes_a_number_and_is_suggested():
    """OPTIMIZER=adamw8bit: the optimizer term is 8 bytes per trained number in tensors under 4096 numbers
    and OPT8_BYTES for the rest (nothing else changes); where it is the cheapest change that fits, it is
    the first suggestion, and never with DeepSpeed or on the CPU (which refuse it)."""
    from trainer.memory import OPT8_BYTES
    exact = estimate(cfg_(TRAIN_PARTS="ln"), B15)
    eight = estimate(cfg_(TRAIN_PARTS="ln", OPTIMIZER="adamw8bit"), B15)
    t = param_table(cfg_(TRAIN_PARTS="ln"), B15)
    assert t.trained_small == (24 * 6 + 4) * 2048      # ln1, ln2, ln_x (weight, bias) of 24 blocks; ln0, ln_out
    assert exact.terms["optimizer"] == 8 * t.trained
    assert eight.terms["optimizer"] == pytest.approx(8 * t.trained_small + OPT8_BYTES * (t.trained - t.trained_small))
    assert exact.total - eight.total == pytest.approx(exact.terms["optimizer"] - eight.terms["optimizer"])
    assert {k: v for k, v in exact.terms.items() if k != "optimizer"} == \
        {k: v for k, v in eight.terms.items() if k != "optimizer"}
    found = advice.suggestions(nominal(cfg_(TRAIN_PARTS="ln"), B15), (exact.total + eight.total) / 2)
    assert found[0].settings == {"OPTIMIZER": "adamw8bit"} and found[0].estimate.total == eight.total
    ds = cfg_(TRAIN_PARTS="ln", STRATEGY="deepspeed_stage_2", GPU_COUNT=2)
    found = advice.suggestions(nominal(ds, B15), estimate(ds, B15).total * 0.95)
    assert all("OPTIMIZER" not in c.settings for c in found)


def test_offload_takes_streamed_blocks_off_the_gpu_and_auto_takes_the_fewest_that_fit():
    """OFFLOAD_BLOCKS=N: the weights (and the loading peak) lose N - 2 blocks' frozen matrices (two slots stay),
    every block is checkpointed; nothing changes where the settings cannot stream. auto (plan.resolve's
    search on a GPU with that much free) takes the fewest blocks that fit, none where the plan fits already,
    all but block 0 where nothing fits; a set 0 gets OFFLOAD_BLOCKS among the suggestions."""
    from trainer.memory import FIT_FRACTION
    base = cfg_(TRAIN_PARTS="ln", OFFLOAD_BLOCKS=0)
    t = param_table(base, B15)
    # a block's att (4 C²) and ffn (8 C²) matrices and its low-rank time-mix ones (exact: the test above)
    assert 12 * 2048 ** 2 < t.block_streamed < 13 * 2048 ** 2
    none, six = plan_(base, B15), plan_(cfg_(TRAIN_PARTS="ln", OFFLOAD_BLOCKS=6), B15)
    assert six.offload == 6 and none.offload == 0
    assert none.estimate.terms["weights"] - six.estimate.terms["weights"] == 4 * t.block_streamed * 2
    assert none.estimate.load_peak - six.estimate.load_peak == 4 * t.block_streamed * 2
    # (a count is clamped and checked where the plan reads OFFLOAD_BLOCKS: RunPlan.but(offload=) takes it as is)
    assert plan_(dataclasses.replace(base, OFFLOAD_BLOCKS="40"), B15).offload == 23   # at most every block but 0
    q = cfg_(TRAIN_PARTS="ln", QUANT="nf4")
    streams_6 = dataclasses.replace(q, OFFLOAD_BLOCKS="6")     # (the config refuses it with QUANT; the plan too)
    assert estimate(streams_6, B15).terms == estimate(q, B15).terms      # cannot stream: unchanged
    auto = cfg_(TRAIN_PARTS="ln")
    assert auto.OFFLOAD_BLOCKS == "auto" and plan_(auto, B15).offload == 0
    assert on_gpu(auto, B15, 80 * GiB).offload == 0
    free = (estimate(auto, B15, offload=8).total + 1) / FIT_FRACTION
    assert on_gpu(auto, B15, free).offload == 8
    assert on_gpu(auto, B15, GiB).offload == 23
    assert on_gpu(base, B15, free).offload == 0            # set to 0: never
    found = advice.suggestions(nominal(base, B15), free)
    assert any(c.settings.get("OFFLOAD_BLOCKS") for c in found)


def test_preflight_streams_no_more_blocks_than_cpu_memory_holds(monkeypatch):
    auto = cfg_(TRAIN_PARTS="ln")
    per = PL.offload_host_bytes(auto, B15, "bf16")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(2 * GiB), 80 * GiB))
    free = gpu.gpu_free_before(torch.device("cuda"))
    plan, lines = preflight(auto, B15, free, host=int(5.5 * per / PL.HOST_FRACTION))
    # memory is tight: the plan leaves the CUDA graphs out, and its estimate is without them (the intended change
    # of the refactor; before it the estimate printed was the one with the graphs)
    assert plan.offload == 5 and not plan.cudagraphs and plan_(auto, B15).cudagraphs
    assert plan.estimate.total == estimate(auto, B15, offload=5, cudagraphs=False).total
    assert any(ln.startswith("OFFLOAD_BLOCKS=auto: 5 of 24 blocks") and "no more: 80% of the CPU memory "
               "available holds 5" in ln for ln in lines), lines
    assert any("WARNING" in ln for ln in lines)
    assert preflight(auto, B15, free, host=None)[0].offload == 23       # unknown: every block but block 0


def test_nothing_fits_says_so():
    lines = advice.suggest(nominal(cfg_(FINETUNE_MODE="full"), config_from_sizes(6, 32, 4096)), 8 * GiB)
    assert len(lines) == 1 and "smaller model" in lines[0]


# ------------------------------------------------------------------------------------------ the trainer's print
@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.pth"
    save_atomic(init_model(TINY).state_dict(), path)
    return path


@pytest.fixture
def tiny_world_model(tmp_path):
    """2 × 128 with the World vocabulary: its logits make the activations matter."""
    path = tmp_path / "tiny65k.pth"
    save_atomic(init_model(config_from_sizes(7, 2, 128)).state_dict(), path)
    return path


def test_preflight_on_the_cpu_is_one_line(tiny_model):
    plan = resolve(cfg_(OP="chunk"), sizes_of(tiny_model), Machine.probe(torch.device("cpu")), op="chunk")
    lines = advice.report(plan)
    est = plan.estimate
    assert len(lines) == 1 and "not checked" in lines[0] and f"{est.total / GiB:.1f} GiB" in lines[0]


def test_preflight_on_a_gpu_warns_with_fixes(tiny_world_model, monkeypatch):
    cfg = cfg_(CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP=0)
    sizes = sizes_of(tiny_world_model)
    need = estimate(cfg, config_from_sizes(7, 2, 128)).total
    # where memory is tight the plan leaves the CUDA graphs out and prints its estimate without them (the
    # intended change of the refactor; before it the figure printed was always ``need``, with the graphs)
    assert plan_(cfg, sizes).cudagraphs
    need_without_graphs = estimate(cfg, sizes, cudagraphs=False).total
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    ctx = M.CUDA_CONTEXT
    for free, warned in ((need * 2, False), (ctx + (need - ctx) * 0.5, True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda device=None, f=free: (int(f - gpu.CONTEXT_AT_PREFLIGHT), 80 * GiB))
        plan, lines = preflight(cfg, sizes, gpu.gpu_free_before(torch.device("cuda")))
        assert plan.cudagraphs is not warned
        shown = need_without_graphs if warned else need
        assert lines[0] == f"Estimated peak GPU memory: {shown / GiB:.1f} GiB (GPU has {int(free) / GiB:.1f} GiB free)"
        assert any("WARNING" in ln for ln in lines) == warned
        if warned:
            fixes = [ln for ln in lines if ln.startswith("  - ")]
            assert fixes and all("GiB" in ln for ln in fixes)
            assert any("MICRO_BSZ=" in ln for ln in fixes)


def test_preflight_leaves_a_bad_model_file_to_the_loader(tmp_path, monkeypatch):
    """loop.prepare plans only after the loader has read the model file: a bad one gets the loader's own error
    (naming the file), and nothing of the memory estimate is printed before it."""
    from trainer.data.binidx import write_binidx
    from trainer.errors import UserError
    from trainer.loop import prepare
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.pth").write_bytes(b"not a model")
    (tmp_path / "data").mkdir()
    write_binidx(tmp_path / "data" / "toy", [list(range(1, 40)) + [0]] * 4)
    cfg = TrainConfig.from_env(dict(MODEL="bad.pth", DATA="toy", CTX_LEN="32", EPOCH_STEPS="2", PRECISION="fp32",
                                    OP="chunk", LORA_R="8", ACCELERATOR="cpu"))
    lines = []
    with pytest.raises(UserError, match="bad.pth"):
        prepare(cfg, lines.append)
    assert lines == []


def test_dry_run_prints_the_estimate(tmp_path, monkeypatch):
    from trainer.data.binidx import write_binidx
    from trainer.loop import dry_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    save_atomic(init_model(TINY).state_dict(), tmp_path / "model" / "tiny.pth")
    (tmp_path / "data").mkdir()
    write_binidx(tmp_path / "data" / "toy", [list(range(1, 40)) + [0]] * 4)
    cfg = TrainConfig.from_env(dict(MODEL="tiny.pth", DATA="toy", CTX_LEN="32", EPOCH_STEPS="2", PRECISION="fp32",
                                    OP="chunk", LORA_R="8", SAMPLE_PROMPT="ab"))
    lines = []
    dry_run(cfg, log=lines.append)
    assert sum("Estimated peak GPU memory" in ln for ln in lines) == 1


# ------------------------------------------------------------------------------------------ accuracy
def test_estimate_matches_the_simulated_training_step():
    """The formula against the bytes OUR training step allocates (fake tensors, CUDA autocast rules):
    LoRA without GRAD_CP on the chunk op, state tuning, Bone with TRAIN_PARTS, full fine-tuning, PiSSA on an
    int8 base with a trained head, LoRA on nf4 with infctx."""
    import calibrate_memory
    errors = calibrate_memory.compare_simulated("small", log=lambda *_: None)
    assert max(map(abs, errors)) < 0.15, errors
    assert np.mean(np.abs(errors)) < 0.06, errors


MEASURED = ROOT / "bench" / "memory_measured.jsonl"


def test_estimate_matches_measured_gpu_rows():
    """Rows measured by bench/train_speed.py --json on a GPU (committed by whoever ran the grid): the
    estimated peak allocation within 15% of torch.cuda.max_memory_allocated for every row."""
    import calibrate_memory
    rows = calibrate_memory.load_rows(MEASURED)
    if not rows:
        pytest.skip(f"{MEASURED.name} has no measured GPU rows yet")
    compared = calibrate_memory.compare_rows(rows)
    bad = [(c.row["command"], round(c.est.peak_allocated / c.alloc - 1, 3)) for c in compared
           if abs(c.est.peak_allocated / c.alloc - 1) > 0.15]
    assert not bad, bad
    # what nvidia-smi shows (less the idle baseline): CUDA_CONTEXT and ALLOCATOR_SLACK were fitted on these
    # same rows, so this guards the fit against later changes rather than proving it. Three rows are known
    # to miss it (bench/RESULTS.md, sessions 4, 14 and 15): RWKV-6 7B on fla, the first run on a machine, held
    # about 3 GiB outside torch's allocator (used - reserved; 0.5-1.3 GiB in every other row): fla's
    # autotune grew the CUDA driver's thread-stack limit to 10,640 bytes in step 1 (2.68 GiB reserved on an
    # H100), which the formula does not model. Since session 15 the trainer gives it back after that step
    # (device.trim_grown_stack, recorded as cuda_stack_regrown_freed): that row's steady part is checked
    # like every row. Their allocation is checked above like every row's. No other row may be left out.
    odd = [c for c in compared if c.used and c.used - c.row["peak_reserved_bytes"] > 2 * GiB]
    assert len(odd) <= 3
    for c in odd:
        assert (c.row["version"], c.row["size"], c.row.get("op_resolved", "fla")) == (6, "7B", "fla")
        assert (c.row.get("cuda_stack_limit_end") in (None, 10640)     # None: session 4 did not record it
                or c.row.get("cuda_stack_regrown_freed"))
        if c.row.get("steady_used_bytes"):
            steady = c.row["steady_used_bytes"] - c.row["used_baseline_bytes"]
            assert abs(c.est.total / steady - 1) < 0.15, (c.row["command"], c.est.total / steady)
    bad = [(c.row["command"], round(c.est.total / c.used - 1, 3)) for c in compared
           if c.used and c not in odd and abs(c.est.total / c.used - 1) > 0.15]
    assert not bad, bad


def test_estimate_equals_the_old_formula_on_every_measured_row():
    """The refactor (one plan per run, memory.estimate a pure function of it) changed no number: for every
    measured row, as bench/calibrate_memory.py estimates it, the total, the peak allocation, where the peak is
    and every term are exactly (repr of the float) what the formula gave before (tests/data/estimate_rows.json,
    captured then, one entry per row in the same order)."""
    import calibrate_memory
    want = json.loads((ROOT / "tests" / "data" / "estimate_rows.json").read_text())
    compared = calibrate_memory.compare_rows(calibrate_memory.load_rows(MEASURED))
    assert len(compared) == len(want) > 0
    for c, w in zip(compared, want):
        e, what = c.est, c.row["command"]
        assert c.row["command"] == w["command"]
        got = dict(total=repr(float(e.total)), peak_allocated=repr(float(e.peak_allocated)), peak_at=e.peak_at,
                   terms={k: repr(float(v)) for k, v in e.terms.items()})
        assert list(got["terms"].items()) == list(w["terms"].items()), what        # the table's order too
        assert (got["total"], got["peak_allocated"], got["peak_at"]) == (w["total"], w["peak_allocated"],
                                                                         w["peak_at"]), what


def test_calibration_reads_rows_and_fits(tmp_path):
    """bench/calibrate_memory.py on rows made from the estimate itself with known distortions: activations
    × 1.2, head × 0.9, nvidia-smi = 0.5 GiB + 1.1 × allocated; the fit finds those numbers back."""
    import calibrate_memory
    import train_speed
    from trainer.model import ffn_pieces
    from trainer.plan import FFN_PIECE_TOKENS
    rows = []
    for method, ctx, bsz, cp in (("lora", 1024, 1, 1), ("lora", 4096, 8, 1), ("state", 2048, 2, 0),
                                 ("lora", 512, 4, 0), ("bone", 1024, 2, 1), ("state", 4096, 1, 1),
                                 ("state", 256, 1, 1), ("lora", 128, 1, 1)):
        # the last two peak in the head, which only the PyTorch cross-entropy (the CPU ops') can do
        op = "chunk" if ctx <= 256 else "fla"
        row = dict(version=7, size="1.5B", method=method, ctx=ctx, bsz=bsz, grad_cp=cp, op="auto", infctx=0,
                   train_parts="", vocab=65536, status="ok", gpu="NVIDIA H100", op_resolved=op,
                   command=f"{method} {ctx} {bsz} {cp}", ffn_pieces=ffn_pieces(ctx * bsz, FFN_PIECE_TOKENS))
        est = estimate(train_speed.row_config(row), train_speed.row_sizes(row), op=op)
        t = est.terms
        base = t["weights"] + t["trained"] + t["optimizer"]
        head_peak = est.train_peak - base == t["saved"] + t["head"]
        head = t["head"] if head_peak else 0.0
        alloc = base + 1.2 * (est.train_peak - base - head) + 0.9 * head
        row.update(peak_alloc_bytes=alloc, load_alloc_bytes=0, peak_used_bytes=0.5 * GiB + 1.1 * alloc,
                   used_baseline_bytes=0, cuda_stack_freed_bytes=264 * 2**20, cuda_stack_kept_bytes=0,
                   emb_on_cpu=True)
        rows.append(row)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows + [dict(status="OOM")]))
    loaded = calibrate_memory.load_rows(path)
    assert len(loaded) == len(rows)
    compared = calibrate_memory.compare_rows(loaded)
    lines = []
    calibrate_memory.report(compared, log=lines.append)
    assert len(lines) == len(rows) + 2
    fitted = calibrate_memory.fit(compared, log=lines.append)
    assert fitted["activation_scale"] == pytest.approx(1.2, rel=1e-6)
    assert fitted["head_scale"] == pytest.approx(0.9, rel=1e-6)
    assert fitted["slack"] == pytest.approx(0.1, abs=1e-6) and fitted["context"] == pytest.approx(0.5 * GiB, rel=1e-6)


def test_ffn_in_pieces_lowers_a_checkpointed_block_by_its_hidden_tensors():
    """The trainer runs a checkpointed block's FFN over pieces of at least FFN_PIECE_TOKENS tokens
    (model.ffn_pieces): the estimate's block term holds the hidden tensors of one piece instead of all."""
    from trainer.model import ffn_pieces
    from trainer.plan import FFN_PIECE_TOKENS
    big = cfg_(CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP=1, OP="triton")
    BT = 4096 * 8
    n = ffn_pieces(BT, FFN_PIECE_TOKENS)
    assert n == 4
    whole, pieces = estimate(big, B15, ffn_pieces=1), estimate(big, B15)
    assert whole.terms["layer"] - pieces.terms["layer"] == pytest.approx(M.FFN_HIDDEN * B15.ffn_dim * BT * 3 / 4)
    assert pieces.total < whole.total
    for small in (cfg_(CTX_LEN=1024, MICRO_BSZ=1, GRAD_CP=1), cfg_(CTX_LEN=4096, MICRO_BSZ=8, GRAD_CP=0)):
        assert estimate(small, B15).terms == estimate(small, B15, ffn_pieces=1).terms   # one piece / no checkpoint


@pytest.mark.parametrize("changes, on_cpu", [
    ({}, True), (dict(FINETUNE_MODE="state"), True), (dict(QUANT="nf4"), True),
    (dict(TRAIN_PARTS="emb ln"), False), (dict(FINETUNE_MODE="full"), False),
    (dict(GPU_COUNT=2), False), (dict(NODES=2), False), (dict(STRATEGY="deepspeed_stage_2"), False)])
def test_embedding_stays_on_the_cpu_where_frozen_on_one_gpu(changes, on_cpu):
    cfg = cfg_(**changes)
    assert PL.embedding_on_cpu(cfg, plan_(cfg, TINY).method) is on_cpu
    V, C = TINY.vocab_size, TINY.n_embd
    saved = estimate(cfg, TINY, emb_on_cpu=False).terms["weights"] - estimate(cfg, TINY).terms["weights"]
    assert saved == (V * C * 2 if on_cpu else 0)


def test_precision_auto_is_estimated_as_the_run_will_use_it():
    """PRECISION=auto: on the GPU at hand what the trainer picks (bf16, or fp16 on a GPU without it, whose
    checkpointed block inputs are fp32: twice the bytes); for a CPU run what a GPU with bf16 would need.
    The machines are built as Machine.probe would find them (the CPU: this one's), not marked probed: OP=fla is
    then not checked as installed here (the estimate is for a GPU)."""
    lora = dict(FINETUNE_MODE="lora", CTX_LEN=4096, MICRO_BSZ=8)
    bf16, fp16 = (estimate(cfg_(**lora, PRECISION=p), B15).terms for p in ("bf16", "fp16"))
    assert fp16["saved"] == 2 * bf16["saved"]
    cpu = dataclasses.replace(Machine.probe(torch.device("cpu")), probed=False)   # no GPU: the run is on the CPU
    assert nominal(cfg_(PRECISION="auto"), B15).precision == "bf16"  # its estimate is the nominal GPU's plan
    assert resolve(cfg_(**lora, PRECISION="auto"), B15, cpu).estimate.terms == bf16
    t4 = Machine(name="Tesla T4", capability=(7, 5), bf16=True, native_bf16=False)   # a T4: bf16 only emulated
    assert resolve(cfg_(PRECISION="auto"), B15, t4).precision == "fp16"
    assert resolve(cfg_(**lora, PRECISION="auto"), B15, t4).estimate.terms == fp16
    assert resolve(cfg_(**lora, PRECISION="auto", ACCELERATOR="cpu"), B15, cpu).estimate.terms == bf16
    assert resolve(cfg_(**lora, PRECISION="auto"), B15, Machine(bf16=True, native_bf16=True)).estimate.terms == bf16
    assert nominal(cfg_(PRECISION="fp32"), B15).precision == "fp32"


def test_allocator_grows_segments_except_on_wsl_or_when_the_user_set_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert gpu.configure_allocator("cpu") is None and not calls
    assert gpu.configure_allocator(torch.device("cuda"), wsl=True) is None and not calls
    assert gpu.configure_allocator(torch.device("cuda"), wsl=False) == "expandable_segments:True"
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert gpu.configure_allocator(torch.device("cuda"), wsl=False) is None and len(calls) == 1


class _FakeDriver:
    """cuCtxGetLimit / cuCtxSetLimit of the CUDA driver, as ctypes would call them."""

    def __init__(self, stack=1024, refuse=False):
        self.limits, self.refuse, self.calls = {gpu.CU_LIMIT_STACK_SIZE: stack}, refuse, []

    def cuCtxGetLimit(self, ptr, which):
        ptr._obj.value = self.limits[which]
        return 0

    def cuCtxSetLimit(self, which, value):
        self.calls.append((which, value.value))
        if self.refuse:
            return 1                      # CUDA_ERROR_INVALID_VALUE
        self.limits[which] = value.value
        return 0


def _fake_gpu(monkeypatch, driver):
    props = type("Props", (), {"multi_processor_count": 132, "max_threads_per_multi_processor": 2048})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    monkeypatch.setattr(gpu, "_libcuda", lambda: driver)


def test_thread_stack_is_given_back_once_and_counted(monkeypatch):
    """The driver's 1 KiB per resident thread (an H100: 132 SMs × 2048 threads = 264 MiB) is given back
    by setting the limit to 0; nothing happens off a GPU, without the driver, or when it refuses."""
    driver = _FakeDriver()
    _fake_gpu(monkeypatch, driver)
    assert gpu.trim_thread_stack("cpu") == 0 and not driver.calls
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert gpu.trim_thread_stack(torch.device("cuda")) == 264 * 2**20
    assert driver.calls == [(gpu.CU_LIMIT_STACK_SIZE, 0)] and driver.limits[gpu.CU_LIMIT_STACK_SIZE] == 0
    assert gpu.trim_thread_stack(torch.device("cuda", 0)) == 0 and len(driver.calls) == 1   # already trimmed
    refusing = _FakeDriver(refuse=True)
    monkeypatch.setattr(gpu, "_libcuda", lambda: refusing)
    assert gpu.trim_thread_stack(torch.device("cuda", 0)) == 0 and refusing.calls
    monkeypatch.setattr(gpu, "_libcuda", lambda: None)
    assert gpu.trim_thread_stack(torch.device("cuda", 0)) == 0


def test_a_grown_thread_stack_is_given_back_after_a_step_a_few_times_at_most(monkeypatch):
    """After an optimizer step: a limit the driver grew past its 1 KiB default (an autotune's tried kernel:
    10,640 bytes on fla's first run) is set back to 0; at or under the default nothing is called; a run
    whose kept kernels keep growing it stops trimming after GROWN_STACK_TRIMS; off a GPU nothing happens."""
    driver = _FakeDriver(stack=10640)
    _fake_gpu(monkeypatch, driver)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert gpu.trim_grown_stack("cpu", 3) == 3 and not driver.calls
    assert gpu.trim_grown_stack(torch.device("cuda"), 3) == 2
    assert driver.calls == [(gpu.CU_LIMIT_STACK_SIZE, 0)]
    driver.limits[gpu.CU_LIMIT_STACK_SIZE] = 192          # a kept kernel grew it a little: left alone
    assert gpu.trim_grown_stack(torch.device("cuda"), 2) == 2 and len(driver.calls) == 1
    trims = gpu.GROWN_STACK_TRIMS
    for _ in range(trims + 2):                            # regrown every step: trimmed GROWN_STACK_TRIMS times
        driver.limits[gpu.CU_LIMIT_STACK_SIZE] = 4096
        trims = gpu.trim_grown_stack(torch.device("cuda"), trims)
    assert trims == 0 and len(driver.calls) == 1 + gpu.GROWN_STACK_TRIMS


def test_thread_stack_of_a_4090(monkeypatch):
    props = type("Props", (), {"multi_processor_count": 128, "max_threads_per_multi_processor": 1536})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    assert gpu.thread_stack_bytes("cuda") == 192 * 2**20
