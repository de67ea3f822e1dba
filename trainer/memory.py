"""GPU memory pre-flight: how much a training run will need, told before anything is loaded.

    est = estimate(cfg, sizes)          # cfg: a TrainConfig (or anything with its names); sizes: ModelConfig
    est.total                           # bytes at the peak as nvidia-smi would show this process
    est.peak_allocated                  # bytes at the peak as torch.cuda.max_memory_allocated shows them
    print(est.table())                  # the breakdown, one line per term
    suggest(cfg, sizes, free_bytes)     # the cheapest changes of settings that fit, each re-estimated
    preflight(cfg, sizes, device, log, op)        # the trainer's call: one line, or a warning with fixes

THE FORMULA (bytes). B = MICRO_BSZ, T = CTX_LEN (infctx: CHUNK_CTX), L layers, C width, V vocabulary,
BT = B·T; P = trained elements (the method's tensors + TRAIN_PARTS; full: every weight but v7's unused
layer-0 v0/v1/v2). Counts come from the official layout (checkpoint.expected_shapes) and the methods' rules.

  weights    frozen base elements × 2 (bf16/fp16; 4 in fp32; PRECISION=auto as precision_of resolves it); the quantised att/ffn linears at their exact
             storage (nf4: 32 code bytes + 4 scale bytes per 64 weights; int8: 1 per weight + 4 per row);
             PiSSA's initial A and B × 2; less the embedding (V·C × 2) where it stays in CPU memory
             (embedding_on_cpu: frozen, one GPU, no DeepSpeed)
  trained    P × 4                  the trainer keeps trained tensors in fp32
  optimizer  P × 8                  AdamW's exp_avg and exp_avg_sq (OPTIMIZER=adamw8bit: OPT8_BYTES, and 8
                                    for the numbers in tensors under 4096 numbers, which keep fp32 states)
  grads      P × 4
  step       0                      what the optimizer step needs besides: nothing with the fused AdamW
                                    the trainer runs on a GPU (foreach's would need P × 4; DeepSpeed: below)
  saved      what the forward pass keeps for the backward pass:
               GRAD_CP=0: L × (layer·BT + casts)
               GRAD_CP=1: L × CP_SAVED·C·BT   (each block keeps only its input: 2 B bf16, 4 B fp32)
               GRAD_CP=auto: p top blocks as GRAD_CP=0, m below them as GRAD_CP=1 plus KP_SAVED·C·BT (they
               keep their matrix products; compiled blocks with the Triton op, full and LoRA families only),
               the rest as GRAD_CP=1; plan_checkpointing takes the (p, m) that maximises p + KP_SPEED·m with
               the total within FIT_FRACTION of the free memory (none without a GPU, with infctx or
               DeepSpeed). The top blocks go back first, so the peak is the larger of all that plus a plain
               block's backward work and the fully checkpointed blocks' inputs plus one recomputed block
             layer = (ACT[version][family] + WKV_SAVED[op][version] + PARTS_ACT[version] if TRAIN_PARTS has
             time or ln)·C + 2·(r − 64) per adapted linear (LoRA/PiSSA rank r), per token;
             family: frozen (state) | lora (lora, pissa) | bone | bat | full;
             casts = CAST_BYTES × the block's trained matrix elements (autocast's bf16 copies of fp32
             weights; full fine-tuning: the whole block) + Bat's BAT_BYTES × the block's adapted weights;
  layer      one block while the backward pass runs through it: (BWD_WORK + WKV_WORK[op])·C·BT
             (+ Bat's BAT_WORK × its largest weight), and with GRAD_CP=1 the block's recomputed layer·BT + casts
  head       the chunked head + loss (trainer/head_loss.py): one chunk's logits and their gradient,
             min(BT, chunk)·V logits of HEAD_BYTES each in PyTorch (the CPU ops) and of the weight bytes on a
             GPU (its Triton cross-entropy writes the gradient over them), the input's gradient (weight
             bytes·BT·C) and, when the head trains, its bf16 copy and fp32 gradient (6·V·C); chunk =
             head_loss.chunk_tokens(V, C if the head trains) (256 at V 65536, at least C tokens when it trains)
  dequant    QUANT: the largest adapted weight dequantised (nf4 2 B/weight; int8 INT8_DEQUANT_BYTES)
  infctx     the states carried into each chunk, ceil(CTX_LEN/CHUNK_CTX)·L·S, one chunk's state gradients
             L²·S (S = B·(H·N² + 2C)·4), and L·INFCTX_ACT·C·BT

  train peak     = weights + trained + optimizer + max(saved + head,                        start of backward
                                                       saved + layer + grads / L,            top block
                                                       grads + step)                         optimizer step
                   (+ dequant and infctx in the first two)
  load peak      = (all base elements + the adapter + PiSSA's buffers) × 2: the trainer puts the whole model
                   on the GPU in bf16 (but an embedding kept in CPU memory) before it turns trained tensors
                   into fp32 (full: × 4); QUANT (but
                   PiSSA): weights + P × 2 + (QUANTISE_WORK + 2) × the largest quantised weight, since those
                   weights go from the file into the GPU one at a time, quantised
  peak_allocated = max(train peak, load peak) + buckets (DDP: P × 4; DeepSpeed: see below)
  total          = peak_allocated × (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT (ALLOCATOR_SLACK_FIXED where the
                   allocator cannot grow segments in place: WSL2, or PYTORCH_CUDA_ALLOC_CONF set); the
                   trainer gives the CUDA driver's thread-stack reserve back first (trim_thread_stack), so
                   CUDA_CONTEXT holds none of it

Strategies: DDP (STRATEGY=auto on several GPUs) needs the same per GPU plus its gradient buckets.
DeepSpeed ZeRO over W = GPU_COUNT × NODES GPUs runs the model in bf16 without autocast (trainer/strategy.py):
trained = P × 2 (working copies), optimizer = (8 + 4)·P / W (AdamW states and the fp32 masters), grads =
P × 2 (stage 2 and 3: / W), step = 8·P / W (the fp32 gradient partition and AdamW's buffer); stage 3 also
divides the weights by W and adds one gathered block; *_offload puts the optimizer, masters and step on
the CPU (stage 3 offload: the weights too, two blocks on the GPU); buckets 2 × min(2e8, P) × 2. Its
activations: ACT, PARTS_ACT and BWD_WORK × DS_ACT_SCALE, CP_SAVED_DS per channel, no autocast copies.

Where the constants come from. ACT, PARTS_ACT, CP_SAVED, CAST_BYTES, BWD_WORK, BAT_*, HEAD_BYTES,
INFCTX_ACT, QUANTISE_WORK, DS_ACT_SCALE, CP_SAVED_DS and the "chunk" op's WKV_SAVED come from a simulation
of OUR training step on fake tensors under CUDA's autocast rules (bench/calibrate_memory.py --simulate:
the bytes of every tensor the real code allocates, for any model size, on a CPU). Against it the formula
is within 6% (mean 1%) in 353 cases at widths 768 to 4096: RWKV-5/6/7, every method, TRAIN_PARTS,
GRAD_CP 0/1, int8/nf4, infctx, 2 to 32 layers, vocabularies 256 to 65536; the chunk op (for CPUs) on
short 2-layer cases up to 10%, and up to 15% at width 512.
Not simulated, so guessed until measured GPU rows calibrate them: the fla kernels' WKV_* (from the anchor
measurement of fla's chunk_rwkv7: 13.5 GiB at B 8, T 4096, C 4096, about 108 B per token and channel with
inputs and gradients), DeepSpeed's masters, partitions and buckets (from its
configuration in trainer/strategy.py). Fitted to measured rows (bench/memory_measured.jsonl, on an H100
from bench/train_speed.py --json; bench/calibrate_memory.py compares and fits): COMPILED_ACT_SCALE (the 5
compiled RWKV-7 rows of 1.5B LoRA / state / full at ctx 1024 × 1 and 4096 × 8 and 7B LoRA infctx over 131072
tokens; re-fitted in session 5, when the checkpoint itself became part of the compiled graph), CUDA_CONTEXT
(session 6, all 14 rows) and ALLOCATOR_SLACK (session 4). In session 6 the 12 RWKV-7 rows (0.1B to 7B; LoRA,
QLoRA, state, full; ctx 1024 × 1, 4096 × 8, infctx 131072) were re-measured on the code of the time; the two
RWKV-6 7B rows (LoRA, QLoRA on fla) are from session 4. Allocation within 10.5% on all 14 (mean 4.6%), the
nvidia-smi figure within 10% on the RWKV-7 rows; RWKV-6 7B QLoRA is 25% under: it held
3.15 GiB outside torch's allocator (not modelled). Compiled blocks without checkpointing
(GRAD_CP=0 and auto's top blocks) keep COMPILED_PLAIN_SCALE of layer·BT: fitted in session 8 to two rows
(1.5B full and LoRA at 4096 × 8, 8 blocks un-checkpointed) and within 3.1% on the 8 other such rows since
(GRAD_CP 0 / auto / top:12 at 1024 × 1 and 4096 × 8, 0.4B to 3B, LoRA and state). All 24 rows of session 8:
allocation within 9.2% (mean 2.9%). Not measured: WSL2
(ALLOCATOR_SLACK_FIXED is the session-2 fit without expandable segments).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

GiB = 2 ** 30

# ------------------------------------------------------------------------------------------ constants
# Saved for the backward pass per token per layer (GRAD_CP=0), bytes per unit of C, without the WKV op,
# by RWKV version and method family (measured at C 1024-4096: within 1% of constant per C).
ACT = {7: {"frozen": 72.7, "lora": 94.9, "bone": 75.3, "bat": 75.3, "full": 121.0},
       6: {"frozen": 63.4, "lora": 90.5, "bone": 67.5, "bat": 67.5, "full": 103.0},
       5: {"frozen": 45.2, "lora": 72.4, "bone": 49.2, "bat": 49.2, "full": 82.0}}
PARTS_ACT = {7: 33.0, 6: 20.5, 5: 16.0}   # TRAIN_PARTS time and/or ln: their inputs are kept too
CP_SAVED = {"bf16": 2.0, "fp16": 4.0, "fp32": 4.0}   # GRAD_CP=1: each block keeps its input (the residual
                                         # stream: bf16 under bf16 autocast, else fp32; loop.activation_dtype)
CAST_BYTES = 2.0                         # per trained matrix element: autocast's bf16 copy, kept for backward
BWD_WORK = {True: 50.0, False: 30.0}     # a block's backward temporaries (its activations' gradients), by GRAD_CP
FFN_HIDDEN = 14.0                        # of those, per token per FFN channel (F = ffn_dim), GRAD_CP: seven bf16
                                         # [B·T, F] tensors alive at once; in pieces (model.ffn_pieces) they exist
                                         # for one piece at a time (1.5B LoRA, 4096 x 8: 2.56 GiB less with 4)
BAT_BYTES = 4.2                          # Bat: bytes per adapted weight kept (bf16 W blocks and bf16 ΔW)
BAT_WORK = 8.6                           # Bat: bytes per weight of the largest layer while its ΔW is rebuilt
# The WKV op, bytes per token per channel: kept for backward by each layer (GRAD_CP=0; with GRAD_CP=1 only
# while a layer is recomputed) and needed while it runs (one layer at a time), by op and RWKV version.
# "torch" (the per-token oracle) keeps far more; it is for tests, not for training on a GPU.
WKV_SAVED = {"chunk": {7: 171.5, 6: 110.0, 5: 58.2}, "fla": {7: 14.0, 6: 12.0, 5: 12.0},
             "null": {7: 0.0, 6: 0.0, 5: 0.0}}
WKV_SAVED["rwkvfla"] = WKV_SAVED["fla"]
WKV_SAVED["torch"] = WKV_SAVED["chunk"]
# "triton" (ours, RWKV-7): fp32 state checkpoints every 16 steps (N·4/16 = 16 B per token-channel at N=64)
# and sa (4), plus its inputs: from its docstring, not measured
WKV_SAVED["triton"] = {7: 34.0, 6: 34.0, 5: 34.0}
# "triton" (ours): fitted in session 3 to H100 rows of the then fp32 residual stream (about 98 B per token and
# channel more than the 20 first guessed); the one uncompiled measured row (QLoRA, ctx 1024) still agrees
WKV_WORK = {"chunk": {7: 0.0, 6: 0.0, 5: 0.0}, "fla": {7: 78.0, 6: 60.0, 5: 60.0},
            "null": {7: 0.0, 6: 0.0, 5: 0.0}, "triton": {7: 118.0, 6: 118.0, 5: 118.0}}
WKV_WORK["rwkvfla"] = WKV_WORK["fla"]
WKV_WORK["torch"] = WKV_WORK["chunk"]
HEAD_BYTES = 7.0                         # per logit of one chunk of the chunked head + loss (trainer/head_loss.py),
                                         # in PyTorch (the CPU); on a GPU a chunk's logits in the compute dtype
CPU_OPS = ("chunk", "torch", "null")     # a CPU run (null: the calibration's simulation): the head in PyTorch
CUDA_CONTEXT = int(0.74 * GiB)           # CUDA context, cuBLAS, loaded kernels: used, never allocated (H100 fit,
                                         # torch 2.11, the 38 rows of bench/memory_measured.jsonl, session 12, with
                                         # the thread-stack reserve given back (trim_thread_stack); 0.96 before it,
                                         # 1.23 before session 6's smaller head chunks)
CUDA_GRAPHS = int(0.18 * GiB)            # CUDA graphs (small steps, loop.use_cudagraphs): their private memory pool's
                                         # idle blocks and the graphs themselves (H100: +0.15 to +0.23 GiB used, 3 rows)
FIT_FRACTION = 0.85                      # what the trainer's own choices (CUDA graphs, GRAD_CP=auto) may plan to
                                         # use of the free memory: the estimate is within 15 % (measured rows)
CONTEXT_AT_PREFLIGHT = int(0.25 * GiB)   # the bare CUDA context when preflight asks for free memory, its stack
                                         # reserve given back (H100: 0.254 GiB measured; 0.511 with the reserve)
ALLOCATOR_SLACK = 0.0                    # reserved / allocated - 1 at the peak, expandable segments (configure_allocator):
                                         # fitted -0.007 on the same rows, i.e. none
ALLOCATOR_SLACK_FIXED = 0.425            # the same without them (WSL2, or the user's own allocator settings)
OPT8_BYTES = 2.0 + 8.0 / 256            # OPTIMIZER=adamw8bit: two 1-byte states and two fp32 scales per 256
DDP_BUCKET_BYTES = 4.0                   # per trained element: DDP's gradient buckets
DEEPSPEED_BUCKET_ELEMS = int(2e8)        # strategy.py's reduce and allgather bucket sizes (elements)
DS_ACT_SCALE = 0.62                      # DeepSpeed (bf16 model, no autocast): activations vs autocast's
CP_SAVED_DS = 2.0                        # its blocks' inputs are bf16
INFCTX_ACT = 9.2                         # infctx: per chunk token and channel per layer, beside the above
INT8_DEQUANT_BYTES = 10.0                # int8 dequantisation: fp32 products then bf16, per weight
QUANTISE_WORK = 11.0                     # while loading: quantising the largest weight (fp32 copies, codes)
DEFAULT_GPU_OP = "fla"                   # the constants for an op this table does not know
# torch.compile'd blocks (COMPILE; COMPILE=auto compiles on a GPU, QUANT included since session 8): the
# generated kernels keep far fewer and smaller tensors for the backward pass than eager PyTorch, whose ops
# the constants above describe. The per-token activation terms (a block's saved tensors and backward work,
# infctx's per-chunk activations) are scaled by COMPILED_ACT_SCALE and COMPILED_FLOOR is added: fitted to the 5 compiled rows of
# bench/memory_measured.jsonl (RWKV-7 1.5B and 7B on an H100, the checkpoint compiled with the block; 0.33
# before that, when the compiled block ran inside an eager checkpoint)
COMPILED_ACT_SCALE = 0.40
# ... but a compiled block that is not checkpointed keeps more of its layer·BT for the backward pass: fitted
# to GRAD_CP=auto rows forced to 8 un-checkpointed top blocks of RWKV-7 1.5B at ctx 4096 x 8 on an H100
# (session 8: full fine-tuning 5.04 GiB a block, LoRA 4.11); the other families take the larger figure
COMPILED_PLAIN_SCALE = {"full": 0.58, "lora": 0.49}
COMPILED_PLAIN_DEFAULT = 0.58
# A compiled checkpointed block that keeps its matrix products' outputs (model.keep_products: selective
# checkpointing, GRAD_CP=auto's middle tier) keeps this many bytes per channel per token beside its input,
# and its backward recomputes only the element-wise work and the WKV: it saves about KP_SPEED of what not
# checkpointing the block saves. Fitted in session 9 (H100) to full fine-tuning of 1.5B at 4096 x 8 with 12
# and 24 such blocks (42.23 / 60.38 GiB allocated; 3.7 ms a block against 7.5-8.2 not checkpointed) and
# LoRA + ln with 24 (70.26 GiB; 5 against 10 ms). Only the measured families use it.
KP_SAVED = {"full": 24.2, "lora": 40.0}
KP_SPEED = 0.5
COMPILED_FLOOR = 0

FAMILY = {"state": "frozen", "lora": "lora", "pissa": "lora", "bone": "bone", "bat": "bat", "full": "full"}
_TARGET_WEIGHT = re.compile(r"^(blocks\.\d+\.(att\.(receptance|key|value|output|gate)|ffn\.(key|value|receptance)))"
                            r"\.weight$")
_LOWRANK = {7: ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"),
            6: ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"), 5: ()}
_V7_LAYER0_UNUSED = ("v0", "v1", "v2")


def _get(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def precision_of(cfg: Any) -> str:
    """PRECISION as the run will use it, bf16 | fp16 | fp32. auto: what the GPU at hand gets
    (loop.precision_name: bf16, or fp16 on a GPU without bf16) where the run goes to a GPU; for a run on
    the CPU (whose estimate says what a GPU would need) bf16, what a current GPU gets."""
    value = _get(cfg, "PRECISION", "bf16")
    if value != "auto":
        return value
    try:
        import torch
        if _get(cfg, "ACCELERATOR", "auto") != "cpu" and torch.cuda.is_available():
            from .loop import precision_name
            return precision_name(cfg, torch.device("cuda"))
    except Exception:                      # no usable GPU after all: as on the CPU
        pass
    return "bf16"


# ------------------------------------------------------------------------------------------ parameters
@functools.lru_cache(maxsize=64)
def _shapes(sizes_key: tuple) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    """(key, shape, how many layers have it) of the official layout, from a 2-layer skeleton."""
    from .checkpoint import expected_shapes
    from .model import ModelConfig
    sizes = ModelConfig(*sizes_key)
    L = sizes.n_layer
    small = dataclasses.replace(sizes, n_layer=min(L, 2))
    out = []
    for k, shape in expected_shapes(small).items():
        out.append((k, shape, L - 1 if k.startswith("blocks.1.") else 1))
    return tuple(out)


def _sizes_key(sizes: Any) -> tuple:
    return tuple(getattr(sizes, f.name) for f in dataclasses.fields(sizes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ParamTable:
    """Element counts of a model with a method applied (what the trainer builds), by how they are stored."""
    total: int               # base model elements (official layout)
    trained: int             # elements trained, fp32: the method's tensors + TRAIN_PARTS (full: all)
    frozen: int              # base elements kept in the weight dtype
    quantised: int           # base elements stored quantised
    quantised_bytes: int     # their storage (codes + scales)
    buffers: int             # PiSSA's initial A and B (weight dtype)
    matmul: int              # base elements multiplied with every token (att/ffn linears, time-mix matrices, head)
    head_matmul: int         # the head's part of ``matmul``
    adapter_matmul: int      # adapter elements multiplied with every token
    adapter_step_flops: int  # Bat: FLOPs to rebuild every ΔW once per forward pass
    trained_matmul: int      # trained elements that are matrix operands (their weight gradient is a product)
    adapted_layers: int      # att/ffn linear layers the method wraps (LoRA/PiSSA/Bone/Bat), all layers
    largest_target: int      # elements of the largest att/ffn linear (what dequantisation materialises)
    block_targets: int       # elements of one block's att/ffn linears (Bat's ΔW per block)
    block_params: int        # elements of one block (ZeRO-3 gathers one at a time)
    block_trained_mm: int    # trained matrix elements of one block (autocast keeps a bf16 copy of each)
    head_trained: bool       # the head trains (TRAIN_PARTS head, full)
    trained_base: int        # base elements among ``trained`` (TRAIN_PARTS; full: all but v7's unused three)
    trained_small: int = 0   # trained elements in tensors of fewer than BNB_MIN_8BIT (adamw8bit keeps fp32 states)
    block_streamed: int = 0  # frozen elements of one block that OFFLOAD_BLOCKS streams (offload.STREAM_MIN_NUMEL)


def param_table(cfg: Any, sizes: Any) -> ParamTable:
    """Count what the trainer's ``prepare`` would hold for ``cfg`` on a model of ``sizes``."""
    from .peft.base import part_names
    from .quant import NF4_BLOCK
    mode = _get(cfg, "FINETUNE_MODE", "lora")
    quant = _get(cfg, "QUANT", "none") or "none"
    parts = tuple(_get(cfg, "TRAIN_PARTS", ()) or ())
    r = {"lora": _get(cfg, "LORA_R", 64), "pissa": _get(cfg, "PISSA_R", 64)}.get(mode, _get(cfg, "DISHA_R", 64))
    shapes = _shapes(_sizes_key(sizes))
    names = [k for k, _, _ in shapes]
    part_set = set(part_names(names, parts))
    lowrank = _LOWRANK[sizes.version]
    total = trained = frozen = quantised = qbytes = buffers = 0
    matmul = head = adapter_mm = adapter_step = trained_mm = adapted = largest = block_t = block_p = 0
    block_tmm, head_trained, trained_base, small, streamed = 0, False, 0, 0, 0
    from .offload import STREAM_MIN_NUMEL
    from .strategy import BNB_MIN_8BIT
    for key, shape, mult in shapes:
        n = _numel(shape)
        total += n * mult
        parts_ = key.split(".")
        unused = (sizes.version == 7 and key.startswith("blocks.0.att.") and parts_[-1] in _V7_LAYER0_UNUSED)
        is_target = bool(_TARGET_WEIGHT.match(key))
        is_mm = is_target or key == "head.weight" or (
            key.startswith("blocks.") and parts_[2] == "att" and parts_[-1] in lowrank and not unused)
        in_block = key.startswith("blocks.1.") or (sizes.n_layer == 1 and key.startswith("blocks.0."))
        if in_block:
            block_p += n
            if is_target:
                block_t += n
        if is_mm:
            matmul += n * mult
            if key == "head.weight":
                head += n
        train_it = (mode == "full" or key in part_set) and not unused
        if is_target:
            largest = max(largest, n)
        if train_it:
            trained += n * mult
            trained_base += n * mult
            small += n * mult if n < BNB_MIN_8BIT else 0
            if is_mm:
                trained_mm += n * mult
                block_tmm += n if in_block else 0
                head_trained = head_trained or key == "head.weight"
        elif is_target and quant != "none":
            out_f, in_f = shape
            quantised += n * mult
            if quant == "nf4":
                blocks = -(-n // NF4_BLOCK)
                qbytes += (blocks * NF4_BLOCK // 2 + blocks * 4) * mult
            else:
                qbytes += (n + 4 * out_f) * mult
        else:
            frozen += n * mult
            streamed += n if in_block and n >= STREAM_MIN_NUMEL else 0
        if is_target and mode in ("lora", "pissa", "bone", "bat"):
            out_f, in_f = shape
            adapted += mult
            own = {"lora": r * (in_f + out_f), "pissa": r * (in_f + out_f), "bone": r * out_f,
                   "bat": in_f * r}[mode]
            trained += own * mult
            pieces = (r * in_f, r * out_f) if mode in ("lora", "pissa") else (own,)    # its tensors (A, B)
            small += sum(n_ for n_ in pieces if n_ < BNB_MIN_8BIT) * mult
            trained_mm += own * mult
            block_tmm += own if in_block else 0
            adapter_mm += ({"bat": in_f * out_f}.get(mode, own)) * mult
            if mode == "pissa":
                buffers += own * mult
            if mode == "bat":
                adapter_step += 2 * out_f * in_f * r * mult
    if mode == "state":
        one = sizes.n_head * sizes.head_size ** 2                       # one layer's state tensor
        trained += sizes.n_layer * one
        small += sizes.n_layer * one if one < BNB_MIN_8BIT else 0
    return ParamTable(total, trained, frozen, quantised, qbytes, buffers, matmul, head, adapter_mm, adapter_step,
                      trained_mm, adapted, largest, block_t, block_p, block_tmm, head_trained,
                      trained_base, small, streamed)


# ------------------------------------------------------------------------------------------ the estimate
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
    free: float | None = None            # the GPU's free memory, where preflight looked
    plain_top: int = 0                   # top blocks not checkpointed (GRAD_CP=auto: plan_checkpointing)
    keep_products: int = 0               # blocks below those that keep their matrix products (the same)
    offload: int = 0                     # blocks whose frozen weights stream from CPU memory (OFFLOAD_BLOCKS)

    def plan(self) -> str:
        """GRAD_CP=auto's plan in words ("" when every block is plainly checkpointed)."""
        said, p, m = [], self.plain_top, self.keep_products
        if p:
            said.append("the top block not checkpointed" if p == 1 else f"the top {p} blocks not checkpointed")
        if m:
            said.append(f"{m} {'more ' if p else ''}block{'s keep' if m > 1 else ' keeps'} their matrix products "
                        "(only the rest is recomputed)")
        return "GRAD_CP=auto: " + ", ".join(said) if said else ""

    def tight(self) -> bool:
        """Close to the GPU's free memory (within the estimate's 15 %), where preflight looked."""
        return self.free is not None and self.total > FIT_FRACTION * self.free

    def table(self) -> str:
        lines = [f"  {k:<14} {v / GiB:8.2f} GiB" for k, v in self.terms.items() if v]
        lines.append(f"  {'train peak':<14} {self.train_peak / GiB:8.2f} GiB   ({self.peak_at})"
                     if self.peak_at != "loading" else f"  {'train peak':<14} {self.train_peak / GiB:8.2f} GiB")
        lines.append(f"  {'load peak':<14} {self.load_peak / GiB:8.2f} GiB")
        lines.append(f"  {'allocated':<14} {self.peak_allocated / GiB:8.2f} GiB   (torch.cuda.max_memory_allocated)")
        lines.append(f"  {'total':<14} {self.total / GiB:8.2f} GiB   (as nvidia-smi shows it: + allocator "
                     f"slack {allocator_slack():.0%} + CUDA context {CUDA_CONTEXT / GiB:.1f} GiB)")
        if self.plain_top or self.keep_products:
            lines.append(f"  ({self.plan()})")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _resolve_op(cfg: Any, op: str | None, version: int) -> str:
    """The op whose constants apply: ``op``, else cfg.OP, where auto means what a GPU with every op
    installed gets (ops.AUTO_ORDER_CUDA: our triton kernel for RWKV-7, fla for RWKV-5/6)."""
    op = op or _get(cfg, "OP", "auto")
    if op == "auto":
        from .ops import AUTO_ORDER_CUDA
        op = AUTO_ORDER_CUDA.get(version, (DEFAULT_GPU_OP,))[0]
    return op if op in WKV_SAVED else DEFAULT_GPU_OP     # an op this table does not know yet: as fla


def embedding_on_cpu(cfg: Any) -> bool:
    """Whether a GPU run keeps the embedding in CPU memory (RWKV.keep_embedding_on_cpu): where it is frozen
    (not FINETUNE_MODE=full, not in TRAIN_PARTS) and one process trains without DeepSpeed (DDP wants every
    parameter on the GPU; DeepSpeed moves the whole model there)."""
    from .peft.base import part_names
    if _get(cfg, "FINETUNE_MODE", "lora") == "full":
        return False
    if part_names(["emb.weight"], tuple(_get(cfg, "TRAIN_PARTS", ()) or ())):
        return False
    world = int(_get(cfg, "GPU_COUNT", 1)) * int(_get(cfg, "NODES", 1))
    return world == 1 and not (_get(cfg, "STRATEGY", "auto") or "auto").startswith("deepspeed_stage_")


def micro_step(cfg: Any) -> tuple[int, int]:
    """(B, T) of one forward call of the model: MICRO_BSZ sequences of CTX_LEN tokens (infctx: of CHUNK_CTX)."""
    ctx = int(_get(cfg, "CTX_LEN", 512))
    infctx = _get(cfg, "TRAIN_TYPE", "normal") == "infctx"
    return int(_get(cfg, "MICRO_BSZ", 1)), min(int(_get(cfg, "CHUNK_CTX", 512)), ctx) if infctx else ctx


def offload_blocks(cfg: Any, sizes: Any, count: int | None = None) -> int:
    """How many blocks stream their frozen weights: ``count`` (default: OFFLOAD_BLOCKS; auto counts as 0
    here: preflight decides it), as many as offload.choose_blocks takes, and 0 where the settings cannot
    (offload.why_not)."""
    from .offload import choose_blocks, why_not
    if count is None:
        v = str(_get(cfg, "OFFLOAD_BLOCKS", "0"))
        count = int(v) if v.isdigit() else 0
    if count <= 0 or why_not(cfg):
        return 0
    return len(choose_blocks(sizes.n_layer, count))


def estimate(cfg: Any, sizes: Any, op: str | None = None, plain_top: int = 0, keep_products: int = 0,
             emb_on_cpu: bool | None = None, ffn_pieces: int | None = None, offload: int | None = None) -> Estimate:
    """The peak GPU memory of training ``cfg`` on a model of ``sizes`` (a ModelConfig), per GPU.

    ``op``: the WKV op that will run (default: cfg.OP; auto: what a GPU gets, see _resolve_op).
    ``plain_top``: with checkpointing, this many top blocks are not checkpointed (GRAD_CP=auto's plan);
    ``keep_products``: this many blocks below them keep their matrix products' outputs (where it applies:
    keeps_products). ``emb_on_cpu``: whether the embedding stays in CPU memory (default: embedding_on_cpu).
    ``ffn_pieces``: the pieces of the FFN's tokens in a checkpointed block (default: the trainer's,
    model.ffn_pieces with FFN_PIECE_TOKENS; bench/calibrate_memory.py passes what a measured row ran).
    ``offload``: blocks whose frozen weights stream from CPU memory (default: OFFLOAD_BLOCKS, see
    offload_blocks); every block is then checkpointed."""
    v = sizes.version
    op = _resolve_op(cfg, op, v)
    mode = _get(cfg, "FINETUNE_MODE", "lora")
    family = FAMILY[mode]
    quant = _get(cfg, "QUANT", "none") or "none"
    precision = precision_of(cfg)
    wbytes = 4 if precision == "fp32" else 2
    cp = _grad_cp(cfg) != "0"
    infctx = _get(cfg, "TRAIN_TYPE", "normal") == "infctx"
    ctx = int(_get(cfg, "CTX_LEN", 512))
    B, T = micro_step(cfg)
    BT = B * T
    L, C, V = sizes.n_layer, sizes.n_embd, sizes.vocab_size
    strategy = _get(cfg, "STRATEGY", "auto") or "auto"
    world = int(_get(cfg, "GPU_COUNT", 1)) * int(_get(cfg, "NODES", 1))
    t = param_table(cfg, sizes)
    P = t.trained
    notes: list[str] = []

    # --- what stays on the GPU: weights, optimizer states
    frozen_w = t.frozen * wbytes + t.quantised_bytes + t.buffers * wbytes
    emb_w = V * C * wbytes if (embedding_on_cpu(cfg) if emb_on_cpu is None else emb_on_cpu) else 0
    frozen_w -= emb_w                                # the frozen embedding stays in CPU memory
    n_off = offload_blocks(cfg, sizes, offload)
    off_w = (n_off - min(n_off, 2)) * t.block_streamed * wbytes    # streamed blocks take turns in two slots
    frozen_w -= off_w
    if n_off:
        plain_top = keep_products = 0
        notes.append(f"OFFLOAD_BLOCKS: {n_off} blocks' frozen weights "
                     f"({n_off * t.block_streamed * wbytes / GiB:.2f} GiB) in CPU memory, two of them on the GPU")
    trained_w = P * 4
    opt, grads, step = P * 8.0, P * 4.0, 0.0     # fused AdamW on the GPU: no buffer while it steps
    if _get(cfg, "OPTIMIZER", "adamw") == "adamw8bit":   # bitsandbytes' blockwise 8-bit states, in place
        opt = t.trained_small * 8.0 + (P - t.trained_small) * OPT8_BYTES
    stage = 0
    ds = strategy.startswith("deepspeed_stage_")
    if ds:
        # DeepSpeed (trainer/strategy.py): the model runs in the weight dtype, trained tensors included
        # (working copies), no autocast; its optimizer keeps fp32 masters and AdamW states partitioned
        # over the W GPUs; stage 2 also partitions the gradients, stage 3 the weights; offload keeps the
        # masters and the optimizer on the CPU (stage 3: the weights too)
        stage = int(strategy.split("_")[2])
        offload = strategy.endswith("_offload")
        W = max(world, 1)
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
    # --- activations
    scale = DS_ACT_SCALE if ds else 1.0
    compiled = will_compile(cfg)
    tok = COMPILED_ACT_SCALE if compiled else 1.0      # per-token activation bytes of compiled blocks
    layer = (ACT[v][family] * scale + WKV_SAVED[op][v]) * C
    if any(p in tuple(_get(cfg, "TRAIN_PARTS", ()) or ()) for p in ("time", "ln")):
        layer += PARTS_ACT[v] * scale * C
    if family == "lora":
        r = _get(cfg, "LORA_R", 64) if mode == "lora" else _get(cfg, "PISSA_R", 64)
        layer += 2.0 * (r - 64) * t.adapted_layers / L          # ACT["lora"] was measured with r = 64
    cast = 0.0 if ds else CAST_BYTES          # without autocast nothing is cast
    fixed = cast * t.block_trained_mm + (BAT_BYTES * t.block_targets if family == "bat" else 0.0)
    head_cast = 0.0              # the chunked head casts its weight only while it runs (in ``head``)

    def bwd_work(checkpointed: bool) -> float:      # one block's backward temporaries
        return (tok * (BWD_WORK[checkpointed] * scale + WKV_WORK[op][v]) * C * BT
                + (BAT_WORK * t.largest_target if family == "bat" else 0.0) + (COMPILED_FLOOR if compiled else 0.0))
    work = bwd_work(cp)
    L_plain = min(max(int(plain_top or 0), 0), L) if cp else 0
    L_kp = min(max(int(keep_products or 0), 0), L - L_plain) if cp and keeps_products(cfg, sizes, op) else 0
    plain_tok = COMPILED_PLAIN_SCALE.get(family, COMPILED_PLAIN_DEFAULT) if compiled else 1.0
    plain_saved = plain_tok * layer * BT + fixed            # what an un-checkpointed block keeps
    plain_work = bwd_work(False)
    if cp:
        cp_in = (CP_SAVED_DS if ds else CP_SAVED.get(precision, 4.0)) * C * BT
        cp_saved = (L - L_plain) * cp_in + head_cast
        kp_saved = L_kp * KP_SAVED.get(family, 0.0) * C * BT
        saved = cp_saved + L_plain * plain_saved + kp_saved
        one_layer = tok * layer * BT + fixed + work
        if ffn_pieces is None:
            from .model import FFN_PIECE_TOKENS, ffn_pieces as pieces_of
            ffn_pieces = pieces_of(BT, FFN_PIECE_TOKENS)
        one_layer -= FFN_HIDDEN * sizes.ffn_dim * BT * (1.0 - 1.0 / ffn_pieces)
        if L_plain or L_kp:
            # the un-checkpointed top blocks go back first, each freeing what it kept, then the blocks that
            # kept their products (recomputing only element-wise work: a plain block's backward work); the
            # first fully checkpointed block is recomputed after them
            rest = L - L_plain - L_kp
            one_layer = max(plain_work, (rest * cp_in + head_cast + one_layer - saved) if rest else 0.0)
    else:
        saved = L * plain_saved + head_cast
        one_layer = work
    from .head_loss import chunk_tokens
    chunk = min(BT, chunk_tokens(V, C if t.head_trained else 0))
    per_logit = HEAD_BYTES if op in CPU_OPS else float(wbytes)   # a GPU's Triton cross-entropy works in place
    head = per_logit * chunk * V + wbytes * BT * C + (6.0 * V * C if t.head_trained else 0.0)
    dequant = 0.0
    if quant != "none":
        dequant = t.largest_target * (INT8_DEQUANT_BYTES if quant == "int8" else 2.0)
    carried = 0.0
    if infctx:   # the states carried into every chunk, the gradients of one chunk's states (all layers, for
        chunks = -(-ctx // T)                       # each layer: L²), and what a chunk keeps besides
        state = B * (sizes.n_head * sizes.head_size ** 2 + 2 * C) * 4.0
        carried = chunks * L * state + L * L * state + tok * L * INFCTX_ACT * C * BT
    act_start = saved + head + carried + dequant
    act_layer = saved + one_layer + grads / L + carried + dequant   # the top block's grads; the head's are gone
    act_step = grads + step
    parts = {"backward pass": max(act_start, act_layer), "optimizer step": act_step}
    peak_at = max(parts, key=parts.get)
    train_peak = frozen_w + trained_w + opt + parts[peak_at]
    # --- loading: the whole model in the weight dtype on the GPU, then the method's tensors
    load_peak = (t.total + (P - t.trained_base) + t.buffers) * wbytes - emb_w - off_w
    if quant != "none" and mode == "pissa":
        load_peak += QUANTISE_WORK * t.largest_target
    elif quant != "none":        # quantised from the file into the GPU one weight at a time (loop.prepare)
        load_peak = frozen_w + P * wbytes + (QUANTISE_WORK + wbytes) * t.largest_target
    if mode == "full":
        load_peak = t.total * max(wbytes, 4)       # every tensor ends in fp32, one at a time from bf16
    if stage == 3 and world > 1:
        load_peak /= world
    extra = 0.0
    if world > 1 and not strategy.startswith("deepspeed"):
        extra = DDP_BUCKET_BYTES * P
    elif ds:
        extra = 2 * min(DEEPSPEED_BUCKET_ELEMS, P) * float(wbytes)
    peak_alloc = max(train_peak, load_peak) + extra
    if load_peak > train_peak:
        peak_at = "loading"
        notes.append(f"the peak is while loading: the trainer puts all {t.total / 1e9:.2f} B base weights on "
                     f"the GPU in {'fp32' if wbytes == 4 else 'bf16'} before "
                     + ("quantising them (PiSSA's SVD needs them there)" if quant != "none"
                        else "converting the trained ones to fp32"))
    terms = {"weights": frozen_w, "trained": trained_w, "optimizer": opt, "grads": grads, "step": step,
             "saved": saved, "layer": one_layer, "head": head, "infctx states": carried,
             "dequant": dequant, "buckets": extra}
    total = peak_alloc * (1 + allocator_slack()) + CUDA_CONTEXT
    if will_use_cudagraphs(cfg, sizes):
        total += CUDA_GRAPHS
    return Estimate(terms, train_peak, load_peak, peak_alloc, total, peak_at, notes, plain_top=L_plain,
                    keep_products=L_kp, offload=n_off)


def _grad_cp(cfg: Any) -> str:
    """cfg's GRAD_CP as "0", "1" or "auto" (a TrainConfig's already is; the calibration's namespaces hold bools)."""
    from .config import grad_cp_mode
    return grad_cp_mode(_get(cfg, "GRAD_CP", "1"))


def _checkpoints_every_block(cfg: Any) -> bool:
    """infctx and DeepSpeed keep their own memory plans: GRAD_CP=auto checkpoints every block there."""
    return (_get(cfg, "TRAIN_TYPE", "normal") == "infctx"
            or str(_get(cfg, "STRATEGY", "auto")).startswith("deepspeed"))


def keeps_products(cfg: Any, sizes: Any, op: str | None = None) -> bool:
    """Whether blocks can keep their matrix products (model.keep_products): compiled blocks with the op
    traced into their graph (our Triton op), in a method family whose cost was measured (KP_SAVED), and not
    replayed as CUDA graphs (that combination has not passed its GPU test yet: bench/RESULTS.md, session 9)."""
    return (will_compile(cfg) and _resolve_op(cfg, op, sizes.version) == "triton"
            and FAMILY[_get(cfg, "FINETUNE_MODE", "lora")] in KP_SAVED and not will_use_cudagraphs(cfg, sizes))


def plan_checkpointing(cfg: Any, sizes: Any, free_bytes: float, op: str | None = None) -> Estimate:
    """GRAD_CP=auto: among the plans that fit in FIT_FRACTION of ``free_bytes``, the fastest by a rough
    rule: p top blocks not checkpointed (no recompute) and m blocks below them that keep their matrix
    products (KP_SPEED of that saving each, for less memory), maximising p + KP_SPEED * m (ties: fewer m).
    Every block checkpointed when nothing more fits, and always with TRAIN_TYPE=infctx or DeepSpeed (their
    own memory plans), or GRAD_CP 0/1."""
    best = estimate(cfg, sizes, op)
    if (_grad_cp(cfg) != "auto" or _checkpoints_every_block(cfg) or best.total > FIT_FRACTION * free_bytes
            or best.offload):
        return best
    L = sizes.n_layer
    def fits(p: int, m: int) -> bool:
        return estimate(cfg, sizes, op, plain_top=p, keep_products=m).total <= FIT_FRACTION * free_bytes

    def most(ok, hi: int) -> int:                  # the largest n in 0..hi with ok(n) (ok shrinks with n)
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo
    p_max = most(lambda p: fits(p, 0), L)
    choice, score = (p_max, 0), float(p_max)
    if keeps_products(cfg, sizes, op):
        for p in range(p_max + 1):
            m = most(lambda m: fits(p, m), L - p)
            if p + KP_SPEED * m > score + 1e-9:
                choice, score = (p, m), p + KP_SPEED * m
    return estimate(cfg, sizes, op, plain_top=choice[0], keep_products=choice[1])


HOST_FRACTION = 0.8   # of the CPU memory available, what OFFLOAD_BLOCKS' page-locked copies may take (the rest:
                      # the data, Python, the loader's transient copies; WSL2 ends its whole VM when it runs out)


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The CPU memory available to new allocations without swapping, in bytes (Linux's MemAvailable; inside
    WSL2 that of its VM, whose size .wslconfig sets); None where it cannot be read."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def offload_host_bytes(cfg: Any, sizes: Any) -> float:
    """CPU memory one streamed block's frozen weights take (OFFLOAD_BLOCKS keeps them there)."""
    return param_table(cfg, sizes).block_streamed * (4 if precision_of(cfg) == "fp32" else 2)


def offload_host_limit(cfg: Any, sizes: Any, available: int | None = None) -> int | None:
    """The most blocks whose frozen weights fit in HOST_FRACTION of the CPU memory ``available`` (default:
    host_available()); None where that is unknown."""
    available = host_available() if available is None else available
    per_block = offload_host_bytes(cfg, sizes)
    if available is None or per_block <= 0:
        return None
    return int(HOST_FRACTION * available // per_block)


def plan_offload(cfg: Any, sizes: Any, free_bytes: float, est: Estimate, op: str | None = None,
                 host_limit: int | None = None) -> Estimate:
    """OFFLOAD_BLOCKS=auto: where ``est`` (the plan without streaming) does not fit in FIT_FRACTION of
    ``free_bytes``, the fewest streamed blocks (3 or more: two slots stay on the GPU) that fit, else the
    most there can be (every block but block 0, and no more than ``host_limit``: what fits in CPU memory).
    ``est`` itself otherwise, and where the settings cannot stream (offload.why_not)."""
    from .offload import why_not
    most = sizes.n_layer - 1 if host_limit is None else min(sizes.n_layer - 1, host_limit)
    if (str(_get(cfg, "OFFLOAD_BLOCKS", "0")) != "auto" or est.total <= FIT_FRACTION * free_bytes
            or why_not(cfg) or most < 3):
        return est
    for k in range(3, most + 1):
        planned = estimate(cfg, sizes, op, offload=k)
        if planned.total <= FIT_FRACTION * free_bytes:
            return planned
    return planned


def will_use_cudagraphs(cfg: Any, sizes: Any) -> bool:
    """Whether the compiled blocks will replay as CUDA graphs on a GPU (loop.use_cudagraphs)."""
    import torch

    from .loop import use_cudagraphs
    return will_compile(cfg) and use_cudagraphs(cfg, torch.device("cuda"), sizes.n_embd)


def will_compile(cfg: Any) -> bool:
    """Whether the trainer compiles the blocks for these settings on a GPU (loop.compile_wanted; DeepSpeed
    keeps its own engine: as set)."""
    from .loop import compile_wanted
    return compile_wanted(cfg)


# ------------------------------------------------------------------------------------------ suggestions
@dataclass
class Change:
    settings: dict                 # variable -> new value
    why: str                       # its cost, in words
    estimate: Estimate
    cost: float = 1.0              # rough slowdown (COST_*), what the suggestions are ranked by

    def line(self) -> str:
        sets = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{sets}   (~{self.estimate.total / GiB:.1f} GiB; {self.why})"


def _with(cfg: Any, **changes: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, **changes)
    from types import SimpleNamespace
    d = dict(vars(cfg))
    d.update(changes)
    return SimpleNamespace(**d)


# Rough slowdowns, only to rank the suggestions (cheapest first); a combination costs their product.
COST_COMPILE = 1.0            # COMPILE=0 -> auto: faster (a minute of compiling at the start)
COST_GRAD_CP = 1.3            # the blocks' forward runs twice
COST_GRAD_CP_AUTO = 1.15      # GRAD_CP=0 -> auto: only the blocks that do not fit run their forward twice
COST_HALVE_BATCH = 0.1        # per halving of MICRO_BSZ (smaller products, same samples per step)
COST_NF4 = 1.25               # dequantisation in every forward and backward; slightly less precise weights
COST_INFCTX = 1.35            # each chunk's forward runs once more; + COST_HALVE_CHUNK per halving of the chunk
COST_HALVE_CHUNK = 0.1
COST_OPT8 = 1.15              # OPTIMIZER=adamw8bit: a step per trained tensor (H100, bench/RESULTS.md session 14:
                              # 24 % slower at 1.5B LoRA ctx 1024 x 1, 3 % at 4096 x 8), rounded states
COST_METHOD = 2.0             # full fine-tuning -> LoRA: a different method, the last resort
COST_OFFLOAD = 1.1            # OFFLOAD_BLOCKS=N: + COST_OFFLOAD_ALL × N / layers (the copies that do not hide
COST_OFFLOAD_ALL = 0.4        # behind the compute; H100, ctx 1024 x 1, bench/RESULTS.md session 15: 3B 12 of 32
                              # x1.19, 31 of 32 x1.71; 7B 16 of 32 x1.17; 3B adamw8bit 8 of 32 x1.06)


def _candidates(cfg: Any, sizes: Any) -> list[tuple[dict, str, float]]:
    """Single changes of settings: (settings, what it costs in words, rough slowdown)."""
    out: list[tuple[dict, str, float]] = []
    mode = _get(cfg, "FINETUNE_MODE", "lora")
    if _grad_cp(cfg) == "0":
        if _checkpoints_every_block(cfg):        # GRAD_CP=auto would checkpoint every block there too
            out.append(({"GRAD_CP": 1}, "about 30% slower, same results", COST_GRAD_CP))
        else:                                    # the estimate shown is its least (every block checkpointed)
            out.append(({"GRAD_CP": "auto"}, "checkpoints only the blocks that do not fit, and uses the rest "
                         "of the memory for speed; up to 30% slower, same results", COST_GRAD_CP_AUTO))
    B, mini = int(_get(cfg, "MICRO_BSZ", 1)), int(_get(cfg, "MINI_BSZ", 1))
    for b in sorted((d for d in range(1, B) if B % d == 0), reverse=True):
        out.append(({"MICRO_BSZ": b, "MINI_BSZ": mini * B // b},
                    f"the same {B * mini} samples per optimizer step, slower",
                    1 + COST_HALVE_BATCH * math.log2(B / b)))
    quant = _get(cfg, "QUANT", "none") or "none"
    if str(_get(cfg, "COMPILE", "auto")) == "0" and quant == "none":
        out.append(({"COMPILE": "auto"}, "compiled blocks keep fewer activations, and run faster", COST_COMPILE))
    if (_get(cfg, "OPTIMIZER", "adamw") != "adamw8bit" and _get(cfg, "ACCELERATOR", "auto") != "cpu"
            and not str(_get(cfg, "STRATEGY", "auto")).startswith("deepspeed_stage_")):
        out.append(({"OPTIMIZER": "adamw8bit"}, "AdamW's states in 8 bits (bitsandbytes): slower where steps "
                     "are short, slightly rounded updates", COST_OPT8))
    if mode != "full" and quant != "nf4":
        out.append(({"QUANT": "nf4"}, "frozen weights in 4 bits: slower, a little less precise", COST_NF4))
    ctx = int(_get(cfg, "CTX_LEN", 512))
    infctx = _get(cfg, "TRAIN_TYPE", "normal") == "infctx"
    chunk = int(_get(cfg, "CHUNK_CTX", 512)) if infctx else ctx
    if not str(_get(cfg, "STRATEGY", "auto")).startswith("deepspeed_stage_3"):      # infctx is refused there
        c = 1 << (chunk - 1).bit_length() - 1 if chunk > 1 else 1          # the largest power of 2 below
        while c >= 128:
            out.append(({"TRAIN_TYPE": "infctx", "CHUNK_CTX": c},
                        f"the same CTX_LEN={ctx} in chunks of {c}, exact gradient, slower",
                        (1.0 if infctx else COST_INFCTX) + COST_HALVE_CHUNK * math.log2(chunk / c)))
            c //= 2
    from .offload import why_not
    L = sizes.n_layer
    if not why_not(cfg) and str(_get(cfg, "OFFLOAD_BLOCKS", "0")) != "auto":
        most = offload_host_limit(cfg, sizes)             # no more than the CPU memory holds
        for k in sorted({min(k, L - 1 if most is None else most) for k in (L // 4, L // 2, L - 1)} - {0, 1, 2}):
            out.append(({"OFFLOAD_BLOCKS": k}, f"{k} of {L} blocks' frozen weights in CPU memory, copied in as "
                         "they run: slower where the copies do not hide behind the compute",
                         COST_OFFLOAD + COST_OFFLOAD_ALL * k / L))
    if mode == "full":
        out.append(({"FINETUNE_MODE": "lora"}, "LoRA trains far fewer numbers than full fine-tuning", COST_METHOD))
    return out


def _kind(settings: dict) -> frozenset:
    return frozenset("MICRO_BSZ" if k == "MINI_BSZ" else "TRAIN_TYPE" if k == "CHUNK_CTX" else k for k in settings)


def suggestions(cfg: Any, sizes: Any, free_bytes: float, op: str | None = None, limit: int = 3) -> list[Change]:
    """Changes of settings (one to three single changes together) whose estimate fits in ``free_bytes``,
    cheapest first by the rough COST_* slowdowns; one per kind of change (its cheapest variant that fits),
    and none that adds changes to a cheaper one that already fits."""
    singles = _candidates(cfg, sizes)
    fitting: list[tuple[float, Change]] = []
    for n in (1, 2, 3):
        for combo in itertools.combinations(singles, n):
            kinds = [_kind(s) for s, _, _ in combo]
            if len(set().union(*kinds)) < sum(len(k) for k in kinds):
                continue                                   # two variants of the same change
            settings = {k: v for s, _, _ in combo for k, v in s.items()}
            est = estimate(_with(cfg, **settings), sizes, op)
            if est.total <= free_bytes:
                cost = math.prod(c for _, _, c in combo)
                fitting.append((cost, Change(settings, "; ".join(w for _, w, _ in combo), est, cost)))
    found: list[Change] = []
    for _, change in sorted(fitting, key=lambda x: (x[0], x[1].estimate.total)):
        k = _kind(change.settings)
        if any(_kind(f.settings) <= k for f in found):
            continue
        found.append(change)
        if len(found) >= limit:
            break
    return found


def suggest(cfg: Any, sizes: Any, free_bytes: float, op: str | None = None) -> list[str]:
    """The cheapest changes that would fit in ``free_bytes``, as training.sh settings with their estimate.

    Empty when the settings already fit; one line saying so when nothing we can suggest fits."""
    est = estimate(cfg, sizes, op)
    if est.total <= free_bytes:
        return []
    found = suggestions(cfg, sizes, free_bytes, op)
    if found:
        return [c.line() for c in found]
    why = (" (its peak comes while loading: the whole model in bf16 before quantising, for PiSSA's SVD)"
           if est.peak_at == "loading" and _get(cfg, "QUANT", "none") != "none" else "")
    return [f"none of GRAD_CP=1 (or auto), a smaller MICRO_BSZ, QUANT=nf4, OPTIMIZER=adamw8bit, OFFLOAD_BLOCKS or "
            f"TRAIN_TYPE=infctx fits in "
            f"{free_bytes / GiB:.1f} GiB{why}: use a smaller model, a GPU with more memory, or several GPUs"]


# ------------------------------------------------------------------------------------------ the trainer's call
def preflight(cfg: Any, model: Any, device: Any, log: Callable[[str], None] = print,
              op: str | None = None) -> Estimate | None:
    """Print the estimated peak GPU memory before the model is loaded; warn with fixes when it will not fit.

    ``model``: its ModelConfig, or the path of the checkpoint (its header is read). Never raises and never
    stops the run (the estimate can be wrong): a bad model file is left to the loader's own error, a bug
    here costs one line."""
    import torch
    sizes = model
    if not hasattr(model, "n_layer"):
        try:
            from .checkpoint import detect_config, load_checkpoint
            sizes = detect_config(load_checkpoint(model), model)
        except Exception:
            return None
    try:
        if torch.device(device).type != "cuda":       # what these settings would need on a GPU (its op)
            est = estimate(cfg, sizes)
            log(f"Estimated peak GPU memory for these settings: {est.total / GiB:.1f} GiB (not checked: this "
                f"run is on the {torch.device(device).type})")
            return est
        free_before = gpu_free_before(device)
        auto_off = str(_get(cfg, "OFFLOAD_BLOCKS", "0")) == "auto"
        host_limit = offload_host_limit(cfg, sizes) if auto_off else None
        est = plan_offload(cfg, sizes, free_before, plan_checkpointing(cfg, sizes, free_before, op), op,
                           host_limit)
        log(f"Estimated peak GPU memory: {est.total / GiB:.1f} GiB (GPU has {free_before / GiB:.1f} GiB free)")
        if est.offload and auto_off:
            log(f"OFFLOAD_BLOCKS=auto: {est.offload} of {sizes.n_layer} blocks keep their frozen weights in CPU "
                "memory and copy them in as they run (it would not fit otherwise; slower where the copies do "
                "not hide behind the compute)"
                + (f"; no more: {HOST_FRACTION:.0%} of the CPU memory available holds {host_limit}"
                   if est.offload == host_limit and est.total > FIT_FRACTION * free_before else ""))
        if _grad_cp(cfg) == "auto":
            L, p, m = sizes.n_layer, est.plain_top, est.keep_products
            said = f"GRAD_CP=auto: {L - p} of {L} blocks checkpointed"
            if p:
                said += (", the top block keeps its activations" if p == 1 else
                         f", the top {p} keep their activations") + " (no recompute: faster)"
            if m:
                said += (f"; {m} of those keep{'s' if m == 1 else ''} their matrix products (only the rest is "
                         "recomputed)")
            if not (p or m):
                said += (" (infctx and DeepSpeed checkpoint every block)" if _checkpoints_every_block(cfg)
                         else " (no room to leave any out)")
            log(said)
        est.free = free_before
        if est.total > free_before:
            log("WARNING: these settings will probably run out of GPU memory (the estimate can be off by "
                "15%; training starts anyway). Changes that would fit:")
            for line in suggest(cfg, sizes, free_before, op):
                log(f"  - {line}")
            for note in est.notes:
                log(f"  note: {note}")
        elif est.tight():
            log("  (close to the limit: the estimate can be off by 15%)")
        return est
    except Exception as err:                      # a bug of ours must not stop training
        log(f"(memory estimate unavailable: {type(err).__name__}: {err})")
        return None


def gpu_free_before(device: Any) -> float:
    """The GPU's free memory as nvidia-smi would show it before this process: what is free + what this
    process holds (the bare context mem_get_info makes; cuBLAS and the kernels that CUDA_CONTEXT counts are
    not loaded yet)."""
    import torch
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) + CONTEXT_AT_PREFLIGHT


def _may_grow_segments(wsl: bool | None = None) -> bool:
    """Whether the trainer turns expandable segments on here: not under WSL2 (it can fail at the first
    allocation there, pytorch#192330), and not when the user set the allocator's variables."""
    import os
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    if wsl is None:
        from .strategy import running_on_wsl
        wsl = running_on_wsl()
    return not wsl


def allocator_slack() -> float:
    """ALLOCATOR_SLACK where configure_allocator turns expandable segments on, else ALLOCATOR_SLACK_FIXED."""
    return ALLOCATOR_SLACK if _may_grow_segments() else ALLOCATOR_SLACK_FIXED


def configure_allocator(device, wsl: bool | None = None) -> str | None:
    """Let PyTorch's CUDA allocator grow its blocks in place (expandable segments): the memory the GPU shows
    in use then stays close to what tensors take, instead of keeping a reserve of partly used blocks
    (measured: bench/RESULTS.md). Only where _may_grow_segments. Returns what was set, or None."""
    import torch
    if getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return None
    if not _may_grow_segments(wsl):
        return None
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except Exception:            # an older or differently built torch: keep its default
        return None
    return "expandable_segments:True"


CU_LIMIT_STACK_SIZE = 0                  # cuCtxSetLimit's limit for each GPU thread's stack (cuda.h)
DEFAULT_THREAD_STACK = 1024              # bytes per thread the CUDA driver reserves by default


def thread_stack_bytes(device: Any, per_thread: int = DEFAULT_THREAD_STACK) -> int:
    """What a per-thread stack limit reserves on this GPU: one stack for every thread the GPU can hold at
    once (SMs × threads per SM). The default 1 KiB is 264 MiB on an H100 (132 × 2048 threads), 192 MiB on
    an RTX 4090 (128 × 1536), memory nvidia-smi shows in use and PyTorch's allocator never sees."""
    import torch
    p = torch.cuda.get_device_properties(torch.device(device))
    return p.multi_processor_count * p.max_threads_per_multi_processor * per_thread


@functools.lru_cache(maxsize=1)
def _libcuda():
    """The CUDA driver library already loaded by PyTorch (Linux, WSL2, Windows), or None. Looked up once: the
    trainer reads the stack limit after every optimizer step (trim_grown_stack)."""
    import ctypes
    import sys
    for name in (("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def thread_stack_limit(lib=None) -> int | None:
    """The current CUDA context's per-thread stack limit in bytes (cuCtxGetLimit), or None where the driver
    library is missing or the call fails (no current context)."""
    import ctypes
    lib = lib if lib is not None else _libcuda()
    if lib is None:
        return None
    value = ctypes.c_size_t(0)
    try:
        return value.value if lib.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE) == 0 else None
    except AttributeError:                        # not the CUDA driver after all
        return None


def trim_thread_stack(device: Any) -> int:
    """Give back the GPU threads' stack reserve this process's CUDA context holds (measured on an H100:
    264 MiB less in use, bench/RESULTS.md session 12). The driver reserves 1 KiB for every thread the GPU
    can run at once; PyTorch's, cuBLAS's and our Triton kernels need far less, and the driver grows the
    reserve again before any kernel that needs more (its documented behaviour for CU_LIMIT_STACK_SIZE), so
    setting it to 0 changes no result. Makes the device's context current first. Returns the bytes given
    back (0 where there is nothing to do: no CUDA, no driver library, or the call refused)."""
    import ctypes

    import torch
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    lib = _libcuda()
    if lib is None:
        return 0
    torch.cuda.set_device(dev)
    torch.cuda.synchronize(dev)                    # creates the device's primary context, current in this thread
    before = thread_stack_limit(lib)
    if not before or lib.cuCtxSetLimit(CU_LIMIT_STACK_SIZE, ctypes.c_size_t(0)) != 0:
        return 0
    return thread_stack_bytes(dev, before)


GROWN_STACK_TRIMS = 3                    # a run gives a grown stack reserve back at most this many times


def trim_grown_stack(device: Any, trims_left: int) -> int:
    """Called after each optimizer step: where the driver's per-thread stack limit has grown past its 1 KiB
    default since the last trim, give it back (trim_thread_stack) and return trims_left - 1; else return
    trims_left unchanged. The growth comes from kernels an autotune only tries: fla's first run on a machine
    (its results are cached on disk afterwards) ends step 1 with 10,640 bytes per thread, 2.68 GiB held on
    an H100 for the rest of the run (bench/RESULTS.md sessions 14 and 15); the kernels kept need 192 bytes
    at most. A kernel that does need more has the driver grow it again, so the trims are counted: a run
    whose kept kernels need more than the default stops trimming after GROWN_STACK_TRIMS, instead of
    paying a synchronisation and a re-reservation every step. Reading the limit is one driver call."""
    import torch
    if trims_left <= 0 or torch.device(device).type != "cuda":
        return trims_left
    limit = thread_stack_limit()
    if limit is None or limit <= DEFAULT_THREAD_STACK:
        return trims_left
    trim_thread_stack(device)
    return trims_left - 1

