"""GPU memory: how much a training run will need, told before anything is loaded.

    est = estimate(plan, sizes)         # plan: a plan.RunPlan (every decision made); sizes: a ModelConfig
    est.total                           # bytes at the peak as nvidia-smi would show this process
    est.peak_allocated                  # bytes at the peak as torch.cuda.max_memory_allocated shows them
    print(est.table())                  # the breakdown, one line per term

A pure function of the plan: it decides nothing (trainer/plan.py does; its GRAD_CP=auto and OFFLOAD_BLOCKS=auto
searches estimate candidate plans), names no fine-tuning method (each says what it keeps: Method.ACT_FAMILY,
linear_counts, KEPT_PER_ADAPTED, REBUILD_WORK, in trainer/peft/) and imports nothing of the loop.

THE FORMULA (bytes). B = MICRO_BSZ, T = CTX_LEN (infctx: CHUNK_CTX), L layers, C width, V vocabulary,
BT = B·T; P = trained elements (the method's tensors + TRAIN_PARTS; a method that trains the base: every weight
but v7's unused layer-0 v0/v1/v2). Counts: trainer/counts.py.

  weights    frozen base elements × the weight bytes (2; 4 in fp32); the quantised att/ffn linears at their exact
             storage (nf4: 32 code bytes + 4 scale bytes per 64 weights; int8: 1 per weight + 4 per row); a
             method's buffers × 2; less the embedding (V·C × 2) and an RWKV-7a model's DeepEmbed tables
             (L·V·r² × 2) where the plan keeps them in CPU memory, less the streamed blocks' frozen matrices but two
             (OFFLOAD_BLOCKS)
  trained    P × 4                  the trainer keeps trained tensors in fp32
  optimizer  P × 8                  AdamW's exp_avg and exp_avg_sq (OPTIMIZER=adamw8bit: OPT8_BYTES, and 8
                                    for the numbers in tensors under 4096 numbers, which keep fp32 states)
  grads      P × 4
  step       0                      what the optimizer step needs besides: nothing with the fused AdamW
                                    the trainer runs on a GPU (DeepSpeed: below)
  saved      what the forward pass keeps for the backward pass:
               no checkpointing: L × (layer·BT + casts)
               checkpointing: L × CP_SAVED·C·BT (each block keeps only its inputs; RWKV-7a with its tables in
               CPU memory: + r²·BT of its s_emb rows, in the table's dtype), but the plan's p top blocks as
               without checkpointing and its m blocks below them plus KP_SAVED·C·BT (they keep their matrix
               products). The top blocks go back first, so the peak is the larger of all that plus a plain
               block's backward work and the fully checkpointed blocks' inputs plus one recomputed block
             layer = (ACT[version][family] + WKV_SAVED[op][version] + PARTS_ACT[version] if TRAIN_PARTS has
             time or ln)·C + the method's act_per_linear per adapted linear + ADAPTED_SAVED_BYTES × the
             block's LinearCounts.saved elements (DoRA's unscaled outputs) + DE_SAVED·(r² + F) on an RWKV-7a
             model (DeepEmbed rank r), per token; family: the method's
             ACT_FAMILY; casts = CAST_BYTES × the block's trained matrix elements (autocast's bf16 copies of
             fp32 weights) + KEPT_PER_ADAPTED × the block's adapted weights
  layer      one block while the backward pass runs through it: (BWD_WORK + WKV_WORK[op])·C·BT
             (+ REBUILD_WORK × the largest adapted weight), and when checkpointed the block's recomputed layer·BT
             + casts, less the FFN's hidden tensors but one piece's (FFN_HIDDEN, the plan's FFN pieces)
  head       the chunked head + loss (trainer/head_loss.py): one chunk's logits and their gradient,
             min(BT, chunk)·V logits of HEAD_BYTES each in PyTorch (the CPU ops) and of the weight bytes on a
             GPU (its Triton cross-entropy writes the gradient over them), the input's gradient (weight
             bytes·BT·C) and, when the head trains, its bf16 copy and fp32 gradient (6·V·C); chunk =
             head_loss.chunk_tokens(V, C if the head trains)
  dequant    QUANT: the largest adapted weight dequantised (nf4 2 B/weight; int8, fp8 INT8_DEQUANT_BYTES);
             fp8 at least its forward's rounded input (FP8_INPUT_BYTES per element of B·T × 4C)
  infctx     the states carried into each chunk, ceil(CTX_LEN/CHUNK_CTX)·L·S, one chunk's state gradients
             L²·S (S = B·(H·N² + 2C)·4), and L·INFCTX_ACT·C·BT

  train peak     = weights + trained + optimizer + max(saved + head,                        start of backward
                                                       saved + layer + grads / L,            top block
                                                       grads + step)                         optimizer step
                   (+ dequant and infctx in the first two)
  load peak      = (all base elements + the adapter + buffers) × 2: the trainer puts the whole model on the GPU
                   in bf16 (but what the plan keeps in CPU memory) before it turns trained tensors into fp32
                   (a method that trains the base: × 4); QUANT where the plan streams the quantised weights
                   from the file: weights + P × 2 + (QUANTISE_WORK + 2) × the largest quantised weight, else
                   the bf16 model + QUANTISE_WORK × the largest
  peak_allocated = max(train peak, load peak) + buckets (DDP: P × 4; DeepSpeed: see below)
  total          = peak_allocated × (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT (+ CUDA_GRAPHS where the plan replays
                   them; ALLOCATOR_SLACK_FIXED where the allocator cannot grow segments in place: WSL2, or
                   PYTORCH_CUDA_ALLOC_CONF set); the CUDA driver's thread-stack reserve is given back first
                   (device.trim_thread_stack), so CUDA_CONTEXT holds none of it

Strategies: DDP (STRATEGY=auto on several GPUs) needs the same per GPU plus its gradient buckets.
DeepSpeed ZeRO over W GPUs runs the model in bf16 without autocast (trainer/strategy.py): trained = P × 2
(working copies), optimizer = (8 + 4)·P / W (AdamW states and the fp32 masters), grads = P × 2 (stage 2 and 3:
/ W), step = 8·P / W (the fp32 gradient partition and AdamW's buffer); stage 3 also divides the weights by W and
adds one gathered block; *_offload puts the optimizer, masters and step on the CPU (stage 3 offload: the weights
too, two blocks on the GPU); buckets 2 × min(2e8, P) × 2. Its activations: ACT, PARTS_ACT and BWD_WORK ×
DS_ACT_SCALE, CP_SAVED_DS per channel, no autocast copies.

Where each constant comes from (a simulation of our training step on fake tensors, bench/calibrate_memory.py
--simulate, or measured GPU rows in bench/memory_measured.jsonl), and how well the formula agrees with both:
bench/RESULTS.md, "Memory estimate calibration history".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 2 ** 30

# ------------------------------------------------------------------------------------------ constants
# Saved for the backward pass per token per layer without checkpointing, bytes per unit of C, without the
# WKV op, by RWKV version and the method's ACT_FAMILY (simulated at C 1024-4096: within 1% of constant per C).
ACT = {7: {"frozen": 72.7, "low_rank": 94.9, "block": 75.3, "block_rebuilt": 75.3, "full": 121.0},
       6: {"frozen": 63.4, "low_rank": 90.5, "block": 67.5, "block_rebuilt": 67.5, "full": 103.0},
       5: {"frozen": 45.2, "low_rank": 72.4, "block": 49.2, "block_rebuilt": 49.2, "full": 82.0}}
PARTS_ACT = {7: 33.0, 6: 20.5, 5: 16.0}   # TRAIN_PARTS time and/or ln: their inputs are kept too
CP_SAVED = {"bf16": 2.0, "fp16": 4.0, "fp32": 4.0}   # checkpointed: each block keeps its input (the residual
                                         # stream: bf16 under bf16 autocast, else fp32; plan.activation_dtype)
CAST_BYTES = 2.0                         # per trained matrix element: autocast's bf16 copy, kept for backward
ADAPTED_SAVED_BYTES = 2.0                # per element a method's linear keeps beyond its family's row (counts'
                                         # block_saved: DoRA's unscaled outputs, bf16 under autocast)
BWD_WORK = {True: 50.0, False: 30.0}     # a block's backward temporaries (its activations' gradients), by checkpointing
DE_SAVED = 2.0                           # RWKV-7a (DeepEmbed): per token per layer, bytes per element of its r x r
                                         # matrix and of the FFN's gate [F], kept for backward (bf16; from the
                                         # code: trainer/deepembed.py, not measured)
FFN_HIDDEN = 14.0                        # of those, per token per FFN channel (F = ffn_dim), checkpointed: seven bf16
                                         # [B·T, F] tensors alive at once; in pieces (model.ffn_pieces) they exist
                                         # for one piece at a time
# The WKV op, bytes per token per channel: kept for backward by each layer (not checkpointed; checkpointed only
# while a layer is recomputed) and needed while it runs (one layer at a time), by op and RWKV version.
# "torch" (the per-token oracle) keeps far more; it is for tests, not for training on a GPU.
WKV_SAVED = {"chunk": {7: 171.5, 6: 110.0, 5: 58.2}, "fla": {7: 14.0, 6: 12.0, 5: 12.0},
             "null": {7: 0.0, 6: 0.0, 5: 0.0}}
WKV_SAVED["rwkvfla"] = WKV_SAVED["fla"]
WKV_SAVED["torch"] = WKV_SAVED["chunk"]
# "triton" (ours, RWKV-7): fp32 state checkpoints every 16 steps (N·4/16 = 16 B per token-channel at N=64)
# and sa (4), plus its inputs: from its docstring, not measured
WKV_SAVED["triton"] = {7: 34.0, 6: 34.0, 5: 34.0}
WKV_WORK = {"chunk": {7: 0.0, 6: 0.0, 5: 0.0}, "fla": {7: 78.0, 6: 60.0, 5: 60.0},
            "null": {7: 0.0, 6: 0.0, 5: 0.0}, "triton": {7: 118.0, 6: 118.0, 5: 118.0}}
WKV_WORK["rwkvfla"] = WKV_WORK["fla"]
WKV_WORK["torch"] = WKV_WORK["chunk"]
HEAD_BYTES = 7.0                         # per logit of one chunk of the chunked head + loss (trainer/head_loss.py),
                                         # in PyTorch (the CPU); on a GPU a chunk's logits in the compute dtype
CPU_OPS = ("chunk", "torch", "null")     # a CPU run (null: the calibration's simulation): the head in PyTorch
CUDA_CONTEXT = int(0.74 * GiB)           # CUDA context, cuBLAS, loaded kernels: used, never allocated (H100, torch
                                         # 2.11, the thread-stack reserve given back)
CUDA_GRAPHS = int(0.18 * GiB)            # CUDA graphs: their private memory pool's idle blocks and the graphs
FIT_FRACTION = 0.85                      # what the plan's own choices (CUDA graphs, GRAD_CP=auto, OFFLOAD_BLOCKS=auto)
                                         # may plan to use of the free memory: the estimate is within 15 %
ALLOCATOR_SLACK = 0.0                    # reserved / allocated - 1 at the peak, expandable segments: none
ALLOCATOR_SLACK_FIXED = 0.425            # the same without them (WSL2, or the user's own allocator settings)
OPT8_BYTES = 2.0 + 8.0 / 256            # OPTIMIZER=adamw8bit: two 1-byte states and two fp32 scales per 256
DDP_BUCKET_BYTES = 4.0                   # per trained element: DDP's gradient buckets
DEEPSPEED_BUCKET_ELEMS = int(2e8)        # strategy.py's reduce and allgather bucket sizes (elements)
DS_ACT_SCALE = 0.62                      # DeepSpeed (bf16 model, no autocast): activations vs autocast's
CP_SAVED_DS = 2.0                        # its blocks' inputs are bf16
INFCTX_ACT = 9.2                         # infctx: per chunk token and channel per layer, beside the above
INT8_DEQUANT_BYTES = 10.0                # int8 dequantisation: fp32 products then bf16, per weight (fp8 too)
FP8_INPUT_BYTES = 5.0                    # QUANT=fp8's forward: its input scaled in fp32 (4) and rounded to e4m3 (1)
QUANTISE_WORK = 11.0                     # while loading: quantising the largest weight (fp32 copies, codes)
DEFAULT_GPU_OP = "fla"                   # the constants for an op this table does not know
# Compiled blocks keep far fewer and smaller tensors for the backward pass than eager PyTorch, whose ops the
# constants above describe: the per-token activation terms (a block's saved tensors and backward work, infctx's
# per-chunk activations) are scaled by COMPILED_ACT_SCALE (fitted to measured compiled rows)
COMPILED_ACT_SCALE = 0.40
# ... but a compiled block that is not checkpointed keeps more of its layer·BT for the backward pass (fitted by
# family; the other families take the larger figure)
COMPILED_PLAIN_SCALE = {"full": 0.58, "low_rank": 0.49}
COMPILED_PLAIN_DEFAULT = 0.58
# A compiled checkpointed block that keeps its matrix products' outputs (model.keep_products: selective
# checkpointing) keeps this many bytes per channel per token beside its input, and its backward recomputes only
# the element-wise work and the WKV: it saves about KP_SPEED of what not checkpointing the block saves. Only the
# measured families use it (plan.keeps_products).
KP_SAVED = {"full": 24.2, "low_rank": 40.0}
KP_SPEED = 0.5


@dataclass
class Estimate:
    """Bytes: the terms of the formula (module docstring), the peaks, and what the peak is made of."""
    terms: dict[str, float]
    train_peak: float
    load_peak: float
    peak_allocated: float
    total: float
    peak_at: str                         # "backward pass", "optimizer step" or "loading"
    notes: list[str] = field(default_factory=list)
    free: float | None = None            # the GPU's free memory, where the plan looked
    slack: float = ALLOCATOR_SLACK       # the allocator's slack it counted

    def tight(self) -> bool:
        """Close to the GPU's free memory (within the estimate's 15 %), where the plan looked."""
        return self.free is not None and self.total > FIT_FRACTION * self.free

    def table(self) -> str:
        lines = [f"  {k:<14} {v / GiB:8.2f} GiB" for k, v in self.terms.items() if v]
        lines.append(f"  {'train peak':<14} {self.train_peak / GiB:8.2f} GiB   ({self.peak_at})"
                     if self.peak_at != "loading" else f"  {'train peak':<14} {self.train_peak / GiB:8.2f} GiB")
        lines.append(f"  {'load peak':<14} {self.load_peak / GiB:8.2f} GiB")
        lines.append(f"  {'allocated':<14} {self.peak_allocated / GiB:8.2f} GiB   (torch.cuda.max_memory_allocated)")
        lines.append(f"  {'total':<14} {self.total / GiB:8.2f} GiB   (as nvidia-smi shows it: + allocator "
                     f"slack {self.slack:.0%} + CUDA context {CUDA_CONTEXT / GiB:.1f} GiB)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


@dataclass
class _Resident:
    """What stays on the GPU through training: weights, trained tensors, optimizer states, gradients."""
    frozen: float
    trained: float
    opt: float
    grads: float
    step: float
    host: float                          # the tables' bytes kept in CPU memory instead (embedding, DeepEmbed)
    off: float                           # the streamed blocks' bytes kept in CPU memory instead
    ds: bool
    stage: int


def _resident(plan: Any, sizes: Any, t: Any, wbytes: int, notes: list[str]) -> _Resident:
    P = t.trained
    frozen_w = t.frozen * wbytes + t.quantised_bytes + t.buffers * wbytes
    host_w = host_table_bytes(plan, sizes, wbytes)
    frozen_w -= host_w                               # the frozen tables stay in CPU memory
    n_off = plan.offload
    off_w = (n_off - min(n_off, 2)) * t.block_streamed * wbytes    # streamed blocks take turns in two slots
    frozen_w -= off_w
    if n_off:
        notes.append(f"OFFLOAD_BLOCKS: {n_off} blocks' frozen weights "
                     f"({n_off * t.block_streamed * wbytes / GiB:.2f} GiB) in CPU memory, two of them on the GPU")
    trained_w = P * 4
    opt, grads, step = P * 8.0, P * 4.0, 0.0     # fused AdamW on the GPU: no buffer while it steps
    if plan.cfg.OPTIMIZER == "adamw8bit":        # bitsandbytes' blockwise 8-bit states, in place
        opt = t.trained_small * 8.0 + (P - t.trained_small) * OPT8_BYTES
    stage = plan.ds_stage
    if stage:
        # DeepSpeed (trainer/strategy.py): the model runs in the weight dtype, trained tensors included (working
        # copies), no autocast; its optimizer keeps fp32 masters and AdamW states partitioned over the W GPUs;
        # stage 2 also partitions the gradients, stage 3 the weights; offload keeps the masters and the
        # optimizer on the CPU (stage 3: the weights too)
        offload = plan.ds_offload
        W = max(plan.world, 1)
        trained_w = P * wbytes
        master = 0.0 if (offload or wbytes == 4) else P * 4.0 / W
        opt = 0.0 if offload else P * 8.0 / W + master
        grads = P * wbytes / (W if stage >= 2 else 1)
        step = 0.0 if offload else P * 8.0 / W           # the fp32 gradient partition + AdamW's sqrt buffer
        if stage == 3:
            gathered = t.block_params * wbytes
            if offload:
                frozen_w, trained_w = 2.0 * gathered, 0.0
                notes.append("ZeRO-3 offload: the weights live on the CPU; two blocks are on the GPU at a time")
            else:
                frozen_w, trained_w = frozen_w / W + gathered, trained_w / W
        notes.append("DeepSpeed: weights and optimizer follow its ZeRO layout; its activations are scaled from "
                     "the autocast ones (simulated, not measured yet)")
    return _Resident(frozen_w, trained_w, opt, grads, step, host_w, off_w, bool(stage), stage)


def host_table_bytes(plan: Any, sizes: Any, wbytes: int) -> float:
    """The frozen tables the plan keeps in CPU memory (trainer/tables.py): the embedding V·C, an RWKV-7a model's
    DeepEmbed tables L·V·r², in the weight dtype."""
    V = sizes.vocab_size
    emb = V * sizes.n_embd if plan.emb_on_cpu else 0
    de = sizes.n_layer * V * sizes.deep_embed ** 2 if plan.deep_embed_on_cpu else 0
    return float((emb + de) * wbytes)


def _activations(plan: Any, sizes: Any, t: Any, method: Any, ds: bool) -> tuple[float, float]:
    """(saved, layer): what the forward pass keeps for the backward pass, and one block's backward work."""
    v, L, C = sizes.version, sizes.n_layer, sizes.n_embd
    op = plan.op if plan.op in WKV_SAVED else DEFAULT_GPU_OP     # an op this table does not know yet: as fla
    family = method.ACT_FAMILY
    B, T = plan.batch
    BT = B * T
    cp = plan.checkpointing
    scale = DS_ACT_SCALE if ds else 1.0
    compiled = plan.compiled
    tok = COMPILED_ACT_SCALE if compiled else 1.0      # per-token activation bytes of compiled blocks
    layer = (ACT[v][family] * scale + WKV_SAVED[op][v]) * C
    if any(p in plan.cfg.TRAIN_PARTS for p in ("time", "ln")):
        layer += PARTS_ACT[v] * scale * C
    if t.adapted_layers:
        layer += method.act_per_linear() * t.adapted_layers / L
    layer += ADAPTED_SAVED_BYTES * t.block_saved
    layer += DE_SAVED * (sizes.deep_embed ** 2 + sizes.ffn_dim) if getattr(sizes, "deep_embed", 0) else 0.0
    cast = 0.0 if ds else CAST_BYTES          # without autocast nothing is cast
    fixed = cast * t.block_trained_mm + method.KEPT_PER_ADAPTED * t.block_targets

    def bwd_work(checkpointed: bool) -> float:      # one block's backward temporaries
        return (tok * (BWD_WORK[checkpointed] * scale + WKV_WORK[op][v]) * C * BT
                + method.REBUILD_WORK * t.largest_target)
    work = bwd_work(cp)
    L_plain, L_kp = plan.plain_top, plan.keep_products
    plain_tok = COMPILED_PLAIN_SCALE.get(family, COMPILED_PLAIN_DEFAULT) if compiled else 1.0
    plain_saved = plain_tok * layer * BT + fixed            # what an un-checkpointed block keeps
    if not cp:
        return L * plain_saved, work
    cp_in = (CP_SAVED_DS if ds else CP_SAVED.get(plan.precision, 4.0)) * C * BT
    if getattr(sizes, "deep_embed", 0) and plan.deep_embed_on_cpu:   # RWKV-7a with its tables in CPU memory: each
        cp_in += sizes.deep_embed ** 2 * BT * (4.0 if plan.precision == "fp32" else 2.0)   # block's rows an input
    cp_saved = (L - L_plain) * cp_in
    kp_saved = L_kp * KP_SAVED.get(family, 0.0) * C * BT
    saved = cp_saved + L_plain * plain_saved + kp_saved
    one_layer = tok * layer * BT + fixed + work
    one_layer -= FFN_HIDDEN * sizes.ffn_dim * BT * (1.0 - 1.0 / plan.ffn_pieces)
    if L_plain or L_kp:
        # the un-checkpointed top blocks go back first, each freeing what it kept, then the blocks that kept
        # their products (recomputing only element-wise work: a plain block's backward work); the first fully
        # checkpointed block is recomputed after them
        rest = L - L_plain - L_kp
        one_layer = max(bwd_work(False), (rest * cp_in + one_layer - saved) if rest else 0.0)
    return saved, one_layer


def _load_peak(plan: Any, t: Any, method: Any, wbytes: int, r: _Resident) -> float:
    """Set-up: the whole model in the weight dtype on the GPU, then the method's tensors."""
    P, quant = t.trained, plan.cfg.QUANT
    load_peak = (t.total + (P - t.trained_base) + t.buffers) * wbytes - r.host - r.off
    if quant != "none" and not plan.stream_quant:
        load_peak += QUANTISE_WORK * t.largest_target
    elif quant != "none":        # quantised from the file into the GPU one weight at a time (loop.prepare)
        load_peak = r.frozen + P * wbytes + (QUANTISE_WORK + wbytes) * t.largest_target
    if method.TRAINS_BASE:     # every tensor ends in fp32, one at a time from bf16 (but the frozen DeepEmbed
        load_peak = (t.total - r.host / wbytes) * max(wbytes, 4)      # tables kept in CPU memory)
    if r.stage == 3 and plan.world > 1:
        load_peak /= plan.world
    return load_peak


def estimate(plan: Any, sizes: Any) -> Estimate:
    """The peak GPU memory of the run ``plan`` (a plan.RunPlan) describes on a model of ``sizes``, per GPU."""
    from .counts import param_table
    from .head_loss import chunk_tokens
    method = plan.method
    L, C, V = sizes.n_layer, sizes.n_embd, sizes.vocab_size
    wbytes = 4 if plan.precision == "fp32" else 2
    B, T = plan.batch
    BT = B * T
    t = param_table(plan.cfg, sizes, method)
    P = t.trained
    notes: list[str] = []
    r = _resident(plan, sizes, t, wbytes, notes)
    saved, one_layer = _activations(plan, sizes, t, method, r.ds)
    chunk = min(BT, chunk_tokens(V, C if t.head_trained else 0))
    per_logit = HEAD_BYTES if plan.op in CPU_OPS else float(wbytes)   # a GPU's Triton cross-entropy works in place
    head = per_logit * chunk * V + wbytes * BT * C + (6.0 * V * C if t.head_trained else 0.0)
    quant = plan.cfg.QUANT
    dequant = t.largest_target * (INT8_DEQUANT_BYTES if quant in ("int8", "fp8") else 2.0) if quant != "none" else 0.0
    if quant == "fp8":      # the forward's fp8 product: the largest input (the FFN's 4C) in fp32, then in e4m3
        dequant = max(dequant, FP8_INPUT_BYTES * BT * 4 * C)
    carried = 0.0
    if plan.cfg.TRAIN_TYPE == "infctx":   # the states carried into every chunk, the gradients of one chunk's states
        chunks = -(-plan.cfg.CTX_LEN // T)               # (all layers, for each layer: L²), and what a chunk keeps
        state = B * (sizes.n_head * sizes.head_size ** 2 + 2 * C) * 4.0
        tok = COMPILED_ACT_SCALE if plan.compiled else 1.0
        carried = chunks * L * state + L * L * state + tok * L * INFCTX_ACT * C * BT
    act_start = saved + head + carried + dequant
    act_layer = saved + one_layer + r.grads / L + carried + dequant   # the top block's grads; the head's are gone
    parts = {"backward pass": max(act_start, act_layer), "optimizer step": r.grads + r.step}
    peak_at = max(parts, key=parts.get)
    train_peak = r.frozen + r.trained + r.opt + parts[peak_at]
    load_peak = _load_peak(plan, t, method, wbytes, r)
    extra = 0.0
    if plan.world > 1 and not r.ds:
        extra = DDP_BUCKET_BYTES * P
    elif r.ds:
        extra = 2 * min(DEEPSPEED_BUCKET_ELEMS, P) * float(wbytes)
    peak_alloc = max(train_peak, load_peak) + extra
    if load_peak > train_peak:
        peak_at = "loading"
        notes.append(f"the peak is while loading: the trainer puts all {t.total / 1e9:.2f} B base weights on "
                     f"the GPU in {'fp32' if wbytes == 4 else 'bf16'} before "
                     + (f"quantising them ({method.NEEDS_BASE_ON_GPU or 'the set-up'} needs them there)" if quant != "none"
                        else "converting the trained ones to fp32"))
    terms = {"weights": r.frozen, "trained": r.trained, "optimizer": r.opt, "grads": r.grads, "step": r.step,
             "saved": saved, "layer": one_layer, "head": head, "infctx states": carried,
             "dequant": dequant, "buckets": extra}
    slack = ALLOCATOR_SLACK if plan.grow_segments else ALLOCATOR_SLACK_FIXED
    total = peak_alloc * (1 + slack) + CUDA_CONTEXT
    if plan.cudagraphs:
        total += CUDA_GRAPHS
    return Estimate(terms, train_peak, load_peak, peak_alloc, total, peak_at, notes, free=plan.free, slack=slack)
