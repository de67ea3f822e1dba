"""The training loop: one validated TrainConfig in, checkpoints in OUTPUT out.

Built on Lightning Fabric (Lightning 2.x), which gives devices, precision and several GPUs (DDP; DeepSpeed
strategies are not built yet and are refused by the config), while the loop itself stays here, short and
explicit, so that resume is exact and Ctrl+C always saves first.

Files written to OUTPUT:
  rwkv-E.pth           the trained tensors after epoch E, with metadata (checkpoint.save_adapter)
  rwkv-interrupted.pth the same, written when Ctrl+C stops a run mid-epoch
  train_state.pth      optimizer, position and RNG of the newest save: what RESUME=1 continues from
  loss.csv, loss.png   the loss of every optimizer step, and its plot (redrawn at each save)
  samples.txt          the text generated from SAMPLE_PROMPT at each save
"""
from __future__ import annotations

import csv
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import checkpoint
from .config import TrainConfig
from .errors import UserError, interrupt_deferred
from .model import FFN_PIECE_TOKENS
from .schedule import learning_rate

from .strategy import ADAM_BETAS, ADAM_EPS, GRAD_CLIP, Spread  # noqa: F401  (re-exported)
SAMPLE_TOKENS = 64


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)     # one per optimizer step, this run only
    saved: list[Path] = field(default_factory=list)
    interrupted: bool = False
    global_step: int = 0


# --------------------------------------------------------------------------- set-up
def resolve_device(cfg: TrainConfig) -> torch.device:
    want = cfg.ACCELERATOR
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("ACCELERATOR=cuda but PyTorch sees no CUDA GPU.",
                        "check `nvidia-smi` and that torch was installed with CUDA, or set ACCELERATOR=cpu")
    if want == "cuda" and torch.cuda.device_count() < cfg.GPU_COUNT:
        raise UserError(f"GPU_COUNT={cfg.GPU_COUNT} but PyTorch sees {torch.cuda.device_count()} GPU(s) here.",
                        f"set GPU_COUNT={torch.cuda.device_count()} (per machine)")
    if want == "cpu" and cfg.world_size > 1 and cfg.ACCELERATOR != "cpu":
        raise UserError(f"GPU_COUNT={cfg.GPU_COUNT} NODES={cfg.NODES} but there is no CUDA GPU here.",
                        "set GPU_COUNT=1 NODES=1 to train on the CPU")
    return torch.device(want)


def precision_name(cfg: TrainConfig, device: torch.device) -> str:
    """PRECISION with auto resolved for ``device``: bf16 on a CUDA GPU that has it in hardware (RTX 30xx,
    A100 and newer), fp16 on an older CUDA GPU (as PRECISION=fp16: fp16 autocast, fp32 residual stream),
    fp32 on the CPU (bf16 is fast there only with AMX or AVX-512 BF16; without them a training step ran 20
    to 25 times slower: README, PRECISION)."""
    if cfg.PRECISION != "auto":
        return cfg.PRECISION
    if device.type == "cuda":
        return "bf16" if _native_bf16() else "fp16"
    return "fp32"


def _native_bf16() -> bool:
    """Whether the current CUDA GPU has bf16 in hardware. torch.cuda.is_bf16_supported() also says yes where
    bf16 is only emulated (a T4, compute capability 7.5), where Triton's bf16 kernels do not build
    ("'.bf16' requires .target sm_80")."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                       # a torch without the argument: its answer is the native one
        return torch.cuda.is_bf16_supported()


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """Fabric's precision string and the dtype the frozen weights are stored in (PRECISION=auto: the
    precision_name for ``device``)."""
    chosen = precision_name(cfg, device)
    if chosen == "bf16":
        if cfg.PRECISION == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise UserError(f"PRECISION=bf16 but this GPU ({name}) has no bf16 support.",
                            "set PRECISION=fp16 (or fp32) in training.sh")
        return "bf16-mixed", torch.bfloat16
    if chosen == "fp16":
        if device.type != "cuda":
            raise UserError("PRECISION=fp16 needs a CUDA GPU.", "on the CPU use PRECISION=fp32 or bf16")
        return "16-mixed", torch.float16
    return "32-true", torch.float32


def activation_dtype(precision: str) -> torch.dtype | None:
    """The residual stream's dtype for a precision (RWKV.act_dtype). bf16 autocast: bf16, as RWKV-LM trains
    (half the bytes per block input kept for the backward pass and moved by every element-wise kernel; the
    products and norms still accumulate in fp32). fp16: fp32, since an fp16 stream overflows in deep RWKV
    models (the rwkv package rescales its fp16 layers for that reason). fp32: unchanged."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float32}.get(precision)


CUDAGRAPH_MAX_WORK = 2048 * 2048   # tokens per micro step × C up to which a step is bound by the CPU


def use_cudagraphs(cfg: TrainConfig, device: torch.device, n_embd: int) -> bool:
    """Whether the compiled blocks' training calls replay as CUDA graphs (model.compile_blocks): where the CPU
    issuing kernels bounds the step, i.e. small micro steps (MICRO_BSZ × CTX_LEN × C up to
    CUDAGRAPH_MAX_WORK: 1.5B at ctx 1024 × 1 ran 1.7x faster on an H100; at 4096 × 8 no faster and the
    graphs' memory pool held 1-1.5 GiB more); on one CUDA GPU (DDP's and DeepSpeed's hooks run between the
    blocks); with fixed shapes (not DATALOAD=only nor the CTX_LEN warm-up, whose lengths change and would
    record a graph each); not infctx (whose chunks recompute the blocks inside a checkpoint of their own);
    not with MINI_BSZ > 1 (the gradients that a micro step leaves for the next to add to live in the graphs'
    memory, which the next replay overwrites: torch stops with "accessing tensor output of CUDAGraphs that
    has been overwritten"); not with LORA_DROPOUT (random numbers inside replayed graphs: not tried on a GPU)."""
    return (device.type == "cuda" and cfg.GPU_COUNT * cfg.NODES == 1 and not cfg.STRATEGY.startswith("deepspeed")
            and cfg.TRAIN_TYPE == "normal" and cfg.DATALOAD != "only" and cfg.MINI_BSZ == 1
            and not (cfg.FINETUNE_MODE == "lora" and cfg.LORA_DROPOUT > 0)
            and not (cfg.INITIAL_CTX_LEN > 0 and cfg.CTX_WARMUP_STEPS > 0)
            and cfg.MICRO_BSZ * cfg.CTX_LEN * n_embd <= CUDAGRAPH_MAX_WORK)


def compile_wanted(cfg: TrainConfig) -> bool:
    """COMPILE's rule before the device is looked at: not COMPILE=0 (memory.py's estimate uses it too). With
    QUANT too since session 8: the quantised product is one custom op in the graph (trainer/quant.py), and
    QLoRA compiled ran 4.9x (nf4) and 5.1x (int8) faster on an H100 (bench/RESULTS.md)."""
    return cfg.COMPILE != "0"


def resolve_compile(cfg: TrainConfig, device: torch.device) -> tuple[bool, str | None]:
    """(compile the blocks?, a note for the log). COMPILE=auto compiles on a CUDA GPU where torch.compile's
    GPU backend (Triton, compute capability 7.0+) works, and stays eager on the CPU
    (compiling there costs more than it gains on small runs); COMPILE=1 compiles or stops with the reason;
    COMPILE=0 never."""
    if cfg.COMPILE == "0":
        return False, None
    reason = None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            reason = "torch.compile on a GPU needs Triton, which is not installed (pip install triton)"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 7:
                reason = (f"torch.compile's GPU code needs compute capability 7.0 or newer; this GPU has "
                          f"{major}.{minor}")
    elif device.type == "cpu":
        if cfg.COMPILE == "auto":
            return False, None
        import shutil
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            reason = "torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    else:
        reason = f"torch.compile is not supported here for device {device.type}"
    if reason is None:
        return True, ("COMPILE: the blocks are compiled with torch.compile; the first step takes longer "
                      "(about a minute) while it builds the fused kernels")
    if cfg.COMPILE == "1":
        raise UserError(f"COMPILE=1: {reason}.", "set COMPILE=auto or COMPILE=0 (slower, otherwise the same)")
    return False, f"COMPILE=auto: not compiling ({reason}); training runs uncompiled, a little slower"


def method_settings(cfg: TrainConfig) -> dict:
    mode = cfg.FINETUNE_MODE
    if mode == "lora":
        return {"r": cfg.LORA_R, "alpha": cfg.LORA_ALPHA, "dropout": cfg.LORA_DROPOUT}
    if mode == "pissa":
        return {"r": cfg.PISSA_R, "svd_niter": cfg.SVD_NITER}
    if mode in ("bone", "bat"):
        return {"r": cfg.DISHA_R}
    return {}


@dataclass
class Prepared:
    cfg: TrainConfig
    device: torch.device
    precision: str
    model: torch.nn.Module
    method: object
    dataset: object
    op: str
    base_meta: dict
    estimate: object = None           # memory.Estimate from preflight (None: unavailable)
    resume: dict | None = None        # RESUME=1: the saved unit it continues (resume.load), checked
    data_identity: dict | None = None  # what a resume checks the data against (resume.data_identity)


def prepare(cfg: TrainConfig, log: Callable[[str], None] = print, device: torch.device | None = None,
            rank: int = 0) -> Prepared:
    """Everything before the first step: checks, model, method, data (rank's share). Used by the dry run."""
    from . import memory, offload, ops, resume
    from .memory import preflight
    from .peft import get_method
    from .quant import check_quant, is_quantised_key, quantize_model

    cfg.check_files()
    torch.manual_seed(cfg.SEED)          # adapter init (LoRA A, PiSSA's random SVD) follows SEED
    device = resolve_device(cfg) if device is None else device
    precision, weight_dtype = resolve_precision(cfg, device)
    if cfg.PRECISION == "auto":
        log(f"PRECISION=auto: {precision_name(cfg, device)} " + (
            "(a CPU without bf16 instructions ran bf16 20 times slower: README)" if device.type != "cuda" else
            "(this GPU has bf16)" if precision == "bf16-mixed" else
            f"({torch.cuda.get_device_name(device)} has no bf16 in hardware)"))
    check_quant(cfg.QUANT, cfg.FINETUNE_MODE, device)
    sizes, zero, base_meta = _read_base(cfg)
    data_id = resume.data_identity(cfg.data_prefix)
    state = resume.load(cfg, base_meta, data_id, log)     # RESUME=1: the saved unit, checked (else None)
    op = ops.resolve(cfg.OP, device, sizes.version)
    memory.trim_thread_stack(device)     # the CUDA driver's idle thread-stack reserve (264 MiB on an H100)
    est = preflight(cfg, sizes, device, log, op)   # estimated peak GPU memory; warns with fixes, never stops

    # QLoRA on a GPU: the weights to be quantised stay in the file (mmap) until quantize_model puts each,
    # quantised, on the GPU; so the whole model is never there in bf16 (PiSSA: its SVD wants them there)
    stream = cfg.QUANT != "none" and device.type == "cuda" and cfg.FINETUNE_MODE != "pissa"
    # the frozen embedding stays in CPU memory on one GPU (memory.embedding_on_cpu): never put on the GPU
    emb_cpu = device.type == "cuda" and memory.embedding_on_cpu(cfg)
    # OFFLOAD_BLOCKS: those blocks stay in CPU memory from the file on; offload.setup puts the rest of them
    # on the GPU and their frozen matrices in pinned memory
    streamed = offload.choose_blocks(sizes.n_layer, _offload_count(cfg, sizes, device, est))
    off_prefixes = tuple(f"blocks.{b}." for b in streamed)
    keep = None
    if stream or emb_cpu or streamed:
        keep = lambda k: ((stream and is_quantised_key(k)) or (emb_cpu and k == "emb.weight")  # noqa: E731
                          or k.startswith(off_prefixes))      # () when nothing is streamed: False
    model = checkpoint.load_model(cfg.model_path, dtype=weight_dtype, device=device, keep_on_cpu=keep)
    method = get_method(cfg.FINETUNE_MODE)(method_settings(cfg))
    method.apply(model, train_parts=cfg.TRAIN_PARTS)
    off = offload.setup(model, streamed, device, dtype=weight_dtype)
    if off is not None:
        log(f"OFFLOAD_BLOCKS: blocks {', '.join(map(str, off.order))} ({len(off.order)} of {sizes.n_layer}) stream "
            f"their frozen weights ({len(off.order) * off.bytes_per_block / 2**30:.2f} GiB) from CPU memory"
            + ("" if off.pinned else " (not page-locked: the copies are slower and do not overlap the compute)"))
    report = quantize_model(model, cfg.QUANT, device=device if stream else None)  # int8 / nf4 base linears
    if report is not None:
        log(report.line())
    if stream:                               # the adapters were made beside the weights, on the CPU
        for part in model.children():
            if not (emb_cpu and part is model.emb):
                part.to(device)
    for p in model.parameters():             # trained tensors in fp32 (exact optimizer), frozen ones lean
        if p.requires_grad:
            p.data = p.data.float()
    if emb_cpu:
        model.emb.to(dtype=weight_dtype)     # as stored in the file until now
        model.keep_embedding_on_cpu()
    if model.cfg.version == 7:               # stored in layer 0 but unused there: nothing to train (and DDP
        for name in ("v0", "v1", "v2"):      # refuses parameters that get no gradient)
            getattr(model.blocks[0].att, name).requires_grad_(False)
    for line in method.check_base(model, zero, cfg.model_path.name):   # refuses a base it cannot learn on
        log(line)
    model.op = op
    model.grad_cp = cfg.checkpointing
    # the FFN over pieces of the tokens where a checkpointed block's backward would otherwise hold its
    # [B·T, 4C] hidden tensors whole (memory.estimate counts the same). GRAD_CP=auto's un-checkpointed top
    # blocks run in pieces too: the same memory there, one compiled graph for all blocks (what that costs
    # them is not measured; on checkpointed blocks 4 pieces cost 1 % at 4096 x 8)
    model.ffn_piece_tokens = FFN_PIECE_TOKENS if cfg.checkpointing else 0
    model.plain_top = est.plain_top if est is not None else 0      # GRAD_CP=auto's plan (else 0)
    model.keep_products = est.keep_products if est is not None else 0
    model.act_dtype = activation_dtype(precision)
    _compile(cfg, device, model, est, log)
    dataset = _dataset(cfg, model, rank)
    return Prepared(cfg, device, precision, model, method, dataset, op, base_meta, est, state, data_id)


def _read_base(cfg: TrainConfig) -> tuple:
    """From the base model's file (memory-mapped, before the model is built): its sizes, the zero output
    projections this method could never move (the method's check_base refuses or warns, in prepare), and what an
    adapter records of it."""
    from .peft import get_method
    from .peft.base import zero_weights
    base_sd = checkpoint.load_checkpoint(cfg.model_path)
    sizes = checkpoint.detect_config(base_sd, cfg.model_path)
    zero = zero_weights(base_sd) if get_method(cfg.FINETUNE_MODE).ZERO_STAYS_ZERO else set()
    return sizes, zero, checkpoint.base_metadata(cfg.model_path, base_sd)


def _compile(cfg: TrainConfig, device: torch.device, model, est, log: Callable[[str], None]) -> None:
    """COMPILE: the blocks compiled, replayed as CUDA graphs where the steps are small and memory allows."""
    compile_on, note = resolve_compile(cfg, device)
    if note:
        log(note)
    if not compile_on:
        return
    import torch._dynamo as dynamo
    dynamo.config.suppress_errors = True   # a block that fails to compile runs uncompiled, with a warning
    graphs = use_cudagraphs(cfg, device, model.cfg.n_embd)
    if graphs and est is not None and est.tight():
        graphs = False
        log("note: not replaying the blocks as CUDA graphs (faster small steps, about 0.2 GiB more): "
            "memory is close to the limit")
    elif graphs:
        log("COMPILE: the blocks' training steps replay as CUDA graphs (small steps: the CPU no longer "
            "bounds them)")
    model.compile_blocks(cudagraphs=graphs)


def _dataset(cfg: TrainConfig, model, rank: int):
    """This process's share of the data, checked against the model's vocabulary."""
    from .data.binidx import BinIdx
    from .data.dataset import make_dataset
    data = BinIdx(cfg.data_prefix)
    top = int(data.tokens.max()) if data.total_tokens else 0
    if top >= model.cfg.vocab_size:
        raise UserError(f"{cfg.data_prefix}.bin holds token id {top}, but {cfg.model_path.name} has a vocabulary "
                        f"of {model.cfg.vocab_size}.", "tokenize the data for this model's vocabulary "
                        "(make_tokenize.sh uses the RWKV World tokenizer of 65536 ids)")
    return make_dataset(cfg.DATALOAD, data, ctx_len=cfg.CTX_LEN,
                        micro_bsz=cfg.MICRO_BSZ, epoch_steps=cfg.EPOCH_STEPS, seed=cfg.SEED,
                        loss_mask=cfg.LOSS_MASK, world_size=cfg.world_size, rank=rank)


def _offload_count(cfg: TrainConfig, sizes, device: torch.device, est) -> int:
    """The blocks OFFLOAD_BLOCKS streams: the number set, or auto's choice (preflight's plan, which keeps to
    the CPU memory available; 0 where there was none). Refused with the fix: a number on a run that is not
    on a GPU, one the model has no room for (block 0 always stays), or one whose weights would not fit in
    HOST_FRACTION of the CPU memory available."""
    from . import memory
    value = cfg.OFFLOAD_BLOCKS
    if value == "auto":
        return est.offload if est is not None and device.type == "cuda" else 0
    n = int(value)
    if n and device.type != "cuda":
        raise UserError(f"OFFLOAD_BLOCKS={n}: this run is on the {device.type}, where the weights are in its "
                        "memory already.", "set OFFLOAD_BLOCKS=0 (or auto), or train on an NVIDIA GPU")
    if n > sizes.n_layer - 1:
        raise UserError(f"OFFLOAD_BLOCKS={n}, but {cfg.model_path.name} has {sizes.n_layer} blocks; block 0 always "
                        f"stays on the GPU.", f"set OFFLOAD_BLOCKS to at most {sizes.n_layer - 1} (or auto)")
    available = memory.host_available() if n else None
    most = memory.offload_host_limit(cfg, sizes, available) if available is not None else None
    if most is None or n <= most:
        return n
    raise UserError(f"OFFLOAD_BLOCKS={n} keeps {n * memory.offload_host_bytes(cfg, sizes) / 2**30:.1f} GiB of frozen "
                    f"weights in CPU memory, but only {available / 2**30:.1f} GiB is available ("
                    + (f"OFFLOAD_BLOCKS={most} fits there" if most else "not one block fits there")
                    + f", keeping {100 - memory.HOST_FRACTION * 100:.0f}% for the rest).",
                    (f"set OFFLOAD_BLOCKS to at most {most}" if most else "set OFFLOAD_BLOCKS=0")
                    + ", close other programs, or (WSL2) give it more memory: memory=... in "
                    "%UserProfile%\\.wslconfig, then wsl --shutdown")


def autocast_for(prep: "Prepared"):
    """The autocast context of the run's precision (mixed: frozen bf16/fp16 weights, fp32 trained ones)."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(prep.precision)
    return torch.autocast(prep.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def dry_run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Prepared:
    """Print the resolved config, the trainable parameter count and two decoded samples, then stop."""
    from .data.dataset import preview
    from .data.tokenizer import get_tokenizer

    prep = prepare(cfg, log)
    train, total = count_trainable(prep.model)
    mc = prep.model.cfg
    log("Resolved configuration:")
    log(cfg.summary())
    log(f"Model: RWKV-{mc.version}, {mc.n_layer} layers × {mc.n_embd} wide, head size {mc.head_size}, "
        f"vocabulary {mc.vocab_size} ({total / 1e6:.2f} M parameters)")
    log(f"Device: {prep.device}, precision {prep.precision}, WKV op '{prep.op}'")
    log(f"Trainable: {train:,} parameters ({100 * train / total:.3f}% of {total:,})")
    prep.dataset.set_epoch(0)
    tok = get_tokenizer()
    for j in range(min(2, len(prep.dataset))):
        log(f"--- sample {j} (text the loss ignores is marked) ---")
        log(preview(prep.dataset[j], tok))
    log("Dry run only: nothing was trained.")
    return prep


# --------------------------------------------------------------------------- loss
def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is 1."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- saving
class RunFiles:
    """Everything written to OUTPUT, each write atomic; the folder held by this run alone (files.hold_folder)."""

    def __init__(self, out: Path, prep: Prepared, write: bool = True, spread: Spread | None = None,
                 log: Callable[[str], None] = print):
        from .files import hold_folder, sweep_temps
        self.out = out
        self.prep = prep
        self.spread = spread or Spread(prep.cfg)
        self.write = write                  # False on every GPU process but the first
        self.lock = None
        self.csv_path = out / "loss.csv"
        if not write:
            return
        self.lock = hold_folder(out, "OUTPUT")     # a second run into this folder is refused
        for p in sweep_temps(out):
            log(f"removed {p.name}, a temporary file left by a run that was killed while writing")
        cfg = prep.cfg
        if cfg.OVERWRITE and not cfg.RESUME:
            gone = checkpoint.clear_run(out)
            if gone:
                log(f"OVERWRITE=1: removed the earlier run's {', '.join(p.name for p in gone)} from {out}/")
        if prep.resume is not None:
            self._drop_rows_after(prep.resume["opt_step"])

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def adapter_path(self, epoch: int | None) -> Path:
        return self.out / ("rwkv-interrupted.pth" if epoch is None else f"rwkv-{epoch}.pth")

    def save(self, *, epoch: int, step_in_epoch: int, opt_step: int, micro_step: int,
             optimizer: torch.optim.Optimizer, complete: bool, rng: torch.Tensor | None = None) -> Path:
        """Write the adapter, then train_state.pth: the unit a resume continues (resume.py says what it holds and
        why this order). The callers hold Ctrl+C back meanwhile (interrupt_deferred)."""
        import uuid

        from . import resume
        prep = self.prep
        path = self.adapter_path(epoch if complete else None)
        # every rank takes part: DeepSpeed gathers the fp32 master weights and writes its optimizer
        # partitions collectively; only the first rank writes our files
        tensors = {}
        with self.spread.master_weights(prep.model):
            if self.write:
                tensors = {k: v.detach().float().cpu() for k, v in prep.method.adapter_state_dict(prep.model).items()}
        save_id = uuid.uuid4().hex if self.write else ""
        if self.spread.deepspeed:             # its tag names one folder that every rank writes into
            save_id = self.spread.agree(save_id)
        tag = f"step-{opt_step}{'' if complete else '-interrupted'}-{save_id[:8]}"
        opt_part = self.spread.save_optimizer(optimizer, self.out, tag, self.write)
        if not self.write:
            return path
        config = prep.cfg.to_env()
        meta = {
            "method": prep.cfg.FINETUNE_MODE,
            "settings": prep.method.metadata(),
            "train_parts": list(prep.cfg.TRAIN_PARTS),
            "quant": prep.cfg.QUANT,
            "base": prep.base_meta,
            "epoch": epoch,
            "complete": complete,
            "optimizer_steps": opt_step,
            "save_id": save_id,
            "config": config,
        }
        checkpoint.save_adapter(path, tensors, meta)
        checkpoint.save_train_state(self.out / checkpoint.TRAIN_STATE, resume.unit(
            save_id=save_id, adapter=path.name, tensors=tensors, meta=meta,
            epoch=epoch if not complete else epoch + 1, step_in_epoch=step_in_epoch if not complete else 0,
            opt_step=opt_step, micro_step=micro_step, optimizer_part=opt_part,
            rng=torch.get_rng_state() if rng is None else rng, config=config, data=prep.data_identity))
        self.spread.forget_old(self.out, keep=tag)
        return path

    def append_losses(self, rows: list[tuple]) -> None:
        """Append ``rows`` to loss.csv and empty the list, both or neither: a Ctrl+C meanwhile waits, so
        no half row is written and no row twice (a full disk leaves the file as it was)."""
        import io

        from .files import append_text
        with interrupt_deferred():
            if self.write and rows:
                buf = io.StringIO()
                w = csv.writer(buf)
                if not self.csv_path.exists():
                    w.writerow(["optimizer_step", "epoch", "loss", "lr", "tokens_per_s"])
                w.writerows(rows)
                append_text(self.csv_path, buf.getvalue())
            rows.clear()

    def _drop_rows_after(self, opt_step: int) -> None:
        """Resume: rows of loss.csv after the saved step (a run killed after writing them) go, so that the steps
        redone are not there twice."""
        from .files import write_bytes
        try:
            text = self.csv_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return
        lines = text.splitlines(keepends=True)
        keep = [ln for i, ln in enumerate(lines) if i == 0 or not ln.split(",", 1)[0].isdigit()
                or int(ln.split(",", 1)[0]) <= opt_step]
        keep = [ln for ln in keep if ln.endswith("\n")]           # a half row of an old version
        if keep != lines:
            write_bytes(self.csv_path, "".join(keep))

    def plot(self) -> Path | None:
        if not self.write or not self.csv_path.exists():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps, losses = [], []
        with open(self.csv_path) as fh:
            for row in csv.DictReader(fh):
                steps.append(int(row["optimizer_step"]))
                losses.append(float(row["loss"]))
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
        if len(losses) >= 10:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.prep.cfg.FINETUNE_MODE} on {self.prep.cfg.DATA}")
        ax.grid(alpha=0.3)
        ax.legend()
        from .files import atomic_write
        try:
            with atomic_write(self.out / "loss.png") as fh:
                fig.savefig(fh, format="png")
        finally:
            plt.close(fig)
        return self.out / "loss.png"

    def sample(self, epoch: int, log: Callable[[str], None]) -> str:
        from .data.tokenizer import get_tokenizer
        from .files import append_text
        from .inference import generate
        model = self.prep.model
        tok = get_tokenizer()
        prompt = tok.encode(self.prep.cfg.SAMPLE_PROMPT)
        if max(prompt, default=0) >= model.cfg.vocab_size:   # a model with a custom small vocabulary
            append_text(self.out / "samples.txt", f"=== epoch {epoch}\n(no sample: the prompt's World-tokenizer ids "
                        f"do not fit this model's vocabulary of {model.cfg.vocab_size})\n\n")
            return ""
        was_training = model.training
        model.eval()
        rng = torch.get_rng_state()        # sampling must not change the training run's random stream
        try:
            with autocast_for(self.prep):
                ids = generate(model, prompt, max_tokens=SAMPLE_TOKENS,
                               temperature=1.0, top_p=0.5, seed=self.prep.cfg.SEED)
            text = tok.decode([i for i in ids if i != 0])
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
        append_text(self.out / "samples.txt", f"=== epoch {epoch}\n{self.prep.cfg.SAMPLE_PROMPT}{text}\n\n")
        log(f"sample after epoch {epoch}: {self.prep.cfg.SAMPLE_PROMPT!r} → {text.strip()[:200]!r}")
        return text


# --------------------------------------------------------------------------- the loop
def _wandb_run(cfg: TrainConfig):
    if not cfg.WANDB:
        return None
    import wandb            # installed: TrainConfig.validate checked it, for the dry run too
    return wandb.init(project=cfg.WANDB, config=cfg.to_env())


def _release_gpu_memory(optimizer) -> None:
    """Drop the gradients and give the freed blocks back to the GPU (after an out-of-memory error, or
    before saving an interrupted run)."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _out_of_memory(cfg: TrainConfig, prep: Prepared, epoch: int, step: int, saved: Path, c_epoch: int,
                   c_step: int) -> UserError:
    """The error for a run that ran out of GPU memory: where, what was saved, and the cheapest changes of
    settings that the memory estimate fits in FIT_FRACTION of what it had estimated (it was too low) or of the
    GPU's free memory, whichever is less."""
    from .memory import FIT_FRACTION, GiB, suggestions
    est = prep.estimate
    where = ""
    if prep.device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(prep.device)
        where = f" ({torch.cuda.get_device_name(prep.device)}, {total / GiB:.0f} GiB)"
    msg = (f"out of GPU memory{where} at epoch {epoch}, step {step + 1}. Saved {saved} (epoch {c_epoch}, "
           f"step {c_step}): change the settings and continue with RESUME=1.")
    found = []
    if est is not None:
        budget = FIT_FRACTION * min(est.total, est.free or est.total)
        try:
            found = suggestions(cfg, prep.model.cfg, budget, prep.op if prep.device.type == "cuda" else None)
        except Exception:                   # advice must not hide the error
            found = []
    if found:
        fix = "one of: " + "; or ".join(c.line() for c in found)
    else:
        fix = ("lower MICRO_BSZ (raise MINI_BSZ to keep the batch), set GRAD_CP=1, QUANT=nf4, OPTIMIZER=adamw8bit "
               "or TRAIN_TYPE=infctx")
    return UserError(msg, fix)


def train(cfg: TrainConfig, log: Callable[[str], None] = print, max_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train as configured. ``max_steps`` (micro steps, for tests) stops early as if interrupted."""
    from lightning_fabric import Fabric
    from tqdm import tqdm

    from . import memory
    from .infctx import InfctxLoss, ctx_len_at, cut_batch
    from .memory import configure_allocator

    device = resolve_device(cfg)
    precision, _ = resolve_precision(cfg, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")      # TF32 for the few fp32 matmuls (Hopper/Ampere)
        configure_allocator(device)                     # less memory held in reserve (not on WSL2)
    spread = Spread(cfg)                  # one GPU, DDP or DeepSpeed: where the steps differ
    spread.check_device(device)
    fabric = Fabric(accelerator=device.type, devices=cfg.GPU_COUNT, num_nodes=cfg.NODES,
                    strategy=spread.fabric_strategy(), precision=precision)
    fabric.launch()                       # several GPUs: one process per GPU from here on
    main = fabric.global_rank == 0        # only rank 0 logs and writes files
    if not main:
        log, progress = (lambda *_: None), False
    prep = prepare(cfg, log, device=fabric.device, rank=fabric.global_rank)
    torch.manual_seed(cfg.SEED + 1 + fabric.global_rank)   # the training stream (dropout), apart from init
    model = prep.model
    state = prep.resume
    if state is not None:
        from .resume import restore
        restore(prep, state)                 # the saved tensors, before the optimizer takes the parameters
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = spread.optimizer(params, cfg.LR_INIT, log)
    infctx = cfg.TRAIN_TYPE == "infctx"
    # what runs forward under Fabric's wrapper (autocast, DDP gradient sync): the model, or for infctx
    # the chunked loss around it (one forward per backward, as DDP needs)
    module = InfctxLoss(model, cfg.CHUNK_CTX) if infctx else model
    module, optimizer = fabric.setup(module, optimizer, move_to_device=False)
    spread.attach(fabric)
    if state is not None:
        spread.load_optimizer(optimizer, state, cfg.output_dir)
        torch.set_rng_state(state["rng"])
    start_epoch = state["epoch"] if state else 0
    start_step = state["step_in_epoch"] if state else 0
    opt_step = state["opt_step"] if state else 0
    micro_step = state["micro_step"] if state else 0
    if state:
        log(f"resuming from {state['adapter']}: epoch {start_epoch}, step {start_step}, "
            f"optimizer step {opt_step}")

    accum = cfg.MINI_BSZ
    warmup_ctx = cfg.INITIAL_CTX_LEN > 0 and cfg.CTX_WARMUP_STEPS > 0
    chunk_multiple = cfg.CHUNK_CTX if infctx else 16
    total_opt_steps = math.ceil(cfg.EPOCH_STEPS / accum) * cfg.EPOCH_COUNT
    result = TrainResult(global_step=opt_step)
    pending_rows: list[tuple] = []
    n_train, n_total = count_trainable(model)
    gpus = f" × {fabric.world_size} processes" if fabric.world_size > 1 else ""
    log(f"training {n_train:,} of {n_total:,} parameters on {prep.device}{gpus} ({prep.precision}, op "
        f"'{prep.op}'), {cfg.EPOCH_COUNT} epochs × {cfg.EPOCH_STEPS} steps → {cfg.output_dir}/")

    if prep.op in ("fla", "rwkvfla"):
        log("note: the first steps compile the GPU kernels (Triton, from flash-linear-attention): this takes a "
            "few minutes once, and later runs reuse the compiled kernels.")
    run = _wandb_run(cfg) if main else None
    # OUTPUT from here on: held by this run, a killed run's temporaries swept, OVERWRITE's clearing, loss.csv
    # cut back to the resumed step; released in the finally below
    files = RunFiles(cfg.output_dir, prep, write=main, spread=spread, log=log)
    log_every = max(1, total_opt_steps // 20)     # plain log lines when there is no progress bar
    last_log = time.perf_counter()
    stack_trims = memory.GROWN_STACK_TRIMS     # an autotune's grown thread-stack reserve, given back after a step
    bar = tqdm(total=cfg.EPOCH_COUNT * cfg.EPOCH_STEPS, initial=start_epoch * cfg.EPOCH_STEPS + start_step,
               disable=not progress, unit="step", dynamic_ncols=True)
    epoch, loss_acc = start_epoch, 0.0
    # position (and random stream) after the last optimizer step: what an interrupted run saves
    committed = (start_epoch, start_step, micro_step, torch.get_rng_state())
    t_last, tok_since = time.perf_counter(), 0
    group: list[tuple] = []               # this optimizer step's micro-batches so far (GRAD_CP=auto may redo them)

    def forward_backward(x, y, m, boundary):
        if model.cudagraphs:                   # CUDA graphs: this step's replays may reuse the last's memory
            torch.compiler.cudagraph_mark_step_begin()
        loss = module(x, targets=y, mask=m)    # the masked mean cross-entropy (head + loss chunked)
        spread.backward(fabric, module, loss, accum, boundary)
        return loss

    module.train()
    try:
        for epoch in range(start_epoch, cfg.EPOCH_COUNT):
            prep.dataset.set_epoch(epoch)
            first = start_step if epoch == start_epoch else 0
            for step in range(first, cfg.EPOCH_STEPS):
                if max_steps is not None and micro_step >= max_steps:
                    raise KeyboardInterrupt
                batch = prep.dataset.collate([prep.dataset[j] for j in
                                              range(step * cfg.MICRO_BSZ, (step + 1) * cfg.MICRO_BSZ)])
                if warmup_ctx:
                    batch = cut_batch(batch, ctx_len_at(opt_step, cfg.INITIAL_CTX_LEN, cfg.CTX_LEN,
                                                        cfg.CTX_WARMUP_STEPS, chunk_multiple))
                x = batch["input_ids"].to(prep.device)
                y = batch["targets"].to(prep.device)
                m = batch["mask"].to(prep.device)
                boundary = (step + 1) % accum == 0 or step + 1 == cfg.EPOCH_STEPS
                group.append((x, y, m))
                try:
                    loss = forward_backward(x, y, m, boundary)
                except torch.cuda.OutOfMemoryError:
                    if not (model.plain_top or model.keep_products) or fabric.world_size > 1:
                        raise
                    loss = None       # redone below, after the error (whose frames hold the activations) is gone
                if loss is None:
                    # GRAD_CP=auto planned too many blocks without checkpointing (the estimate is off): all
                    # blocks checkpointed from now on, this optimizer step's micro-batches done again
                    log(f"GRAD_CP=auto: out of GPU memory with the top {model.plain_top} blocks not "
                        f"checkpointed and {model.keep_products} keeping their products; checkpointing every "
                        "block from now on (slower), and redoing this step")
                    model.plain_top = model.keep_products = 0
                    _release_gpu_memory(optimizer)
                    loss_acc = sum(forward_backward(*b, False).item() for b in group[:-1]) / accum
                    loss = forward_backward(x, y, m, boundary)
                if fabric.world_size > 1:      # report the loss of the whole batch, over every GPU
                    loss = fabric.all_reduce(loss.detach(), reduce_op="mean")
                lv = loss.item()
                if not math.isfinite(lv):
                    raise UserError(f"the loss became {lv} at epoch {epoch}, step {step}; nothing was saved "
                                    "for this step.", "lower LR_INIT, use PRECISION=bf16 instead of fp16, "
                                    "or check the data")
                loss_acc += lv / accum
                micro_step += 1
                tok_since += x.numel() * fabric.world_size
                if boundary:
                    # the step, its counters and the position an interrupted run saves change together:
                    # a Ctrl+C meanwhile waits, so the saved weights always match the saved position
                    with interrupt_deferred(what="the optimizer step"):
                        lr = learning_rate(opt_step, total_opt_steps, cfg.LR_INIT, cfg.LR_FINAL,
                                           cfg.WARMUP_STEPS, cfg.LR_SCHEDULE)
                        for g in optimizer.param_groups:
                            g["lr"] = lr
                        spread.step(fabric, module, optimizer)
                        stack_trims = memory.trim_grown_stack(prep.device, stack_trims)
                        opt_step += 1
                        now = time.perf_counter()
                        tps = tok_since / max(now - t_last, 1e-9)
                        t_last, tok_since = now, 0
                        result.losses.append(loss_acc)
                        pending_rows.append((opt_step, epoch, f"{loss_acc:.6f}", f"{lr:.3e}", f"{tps:.1f}"))
                        bar.set_postfix(loss=f"{loss_acc:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                        if run is not None:
                            run.log({"loss": loss_acc, "lr": lr, "tokens_per_s": tps, "epoch": epoch}, step=opt_step)
                        if not progress and (opt_step % log_every == 0 or opt_step in (1, total_opt_steps)
                                             or now - last_log > 15):
                            last_log = now
                            log(f"epoch {epoch} step {step + 1}/{cfg.EPOCH_STEPS}  optimizer step {opt_step}/"
                                f"{total_opt_steps}  loss {loss_acc:.4f}  lr {lr:.2e}  {tps:,.0f} tokens/s")
                        loss_acc = 0.0
                        group = []
                        committed = (epoch, step + 1, micro_step, torch.get_rng_state())
                        if len(pending_rows) >= 10:
                            files.append_losses(pending_rows)
                bar.update(1)
            # epoch done
            files.append_losses(pending_rows)
            if (epoch + 1) % cfg.EPOCH_SAVE == 0 or epoch + 1 == cfg.EPOCH_COUNT:
                with interrupt_deferred(what="the checkpoint being written"):   # then it stops and saves
                    path = files.save(epoch=epoch, step_in_epoch=cfg.EPOCH_STEPS, opt_step=opt_step,
                                      micro_step=micro_step, optimizer=optimizer, complete=True)
                    result.saved.append(path)
                    if main:
                        bar.write(f"saved {path}")
                if main:
                    files.plot()
                    files.sample(epoch, bar.write)
                fabric.barrier()
    except (KeyboardInterrupt, torch.cuda.OutOfMemoryError) as stop:
        # out of GPU memory on one GPU: the settings' fault, not a bug; saved like Ctrl+C, then told with the
        # changes that would fit (several GPUs: the others would wait for this one, so it stays an error)
        oom = isinstance(stop, torch.cuda.OutOfMemoryError)
        if oom and fabric.world_size > 1:
            raise
        loss = None
        bar.close()
        files.append_losses(pending_rows)
        # A partial gradient accumulation is dropped: resume restarts at the last optimizer step.
        c_epoch, c_step, c_micro, c_rng = committed
        if oom:
            stop.__traceback__ = None       # its frames hold the step's activations
        _release_gpu_memory(optimizer)
        with interrupt_deferred(reraise=False):   # another Ctrl+C: this is already the save it asks for
            path = files.save(epoch=c_epoch, step_in_epoch=c_step, opt_step=opt_step, micro_step=c_micro,
                              optimizer=optimizer, complete=False, rng=c_rng)
        files.plot()
        result.saved.append(path)
        result.interrupted = True
        if oom:
            raise _out_of_memory(cfg, prep, epoch, step, path, c_epoch, c_step) from None
        log(f"\nstopped: saved {path} (epoch {c_epoch}, step {c_step}). Continue with RESUME=1.")
    finally:
        bar.close()
        files.close()
        if run is not None:
            run.finish()
    result.global_step = opt_step
    return result
