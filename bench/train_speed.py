"""Training speed and memory of OUR trainer on random weights in the official shapes (no download).

    python bench/train_speed.py --version 7 --size 1.5B --method lora --ctx 1024 --bsz 1 --grad-cp 1
    python bench/train_speed.py --version 7 6 --size 0.4B --method lora state full --ctx 512 4096 --bsz 1 8
    python bench/train_speed.py --grid peft-table --json bench/memory_measured.jsonl
    python bench/train_speed.py --size tiny --method lora --ctx 64 --steps 2 --warmup 1    # a CPU check
    python bench/train_speed.py --version 7 --size 1.5B --deep-embed 32 --method lora     # an RWKV-7a model

Every list option takes several values; the rows are their product (or a named --grid). Each row runs
in a fresh subprocess (so memory peaks do not leak between rows and one out-of-memory row does not end
the grid) which trains through the trainer's own path: ``trainer.loop.train`` with a TrainConfig built
from the row (``loop.prepare``: checkpoint.load_model, the PEFT method, quant, fp32 trained tensors;
then Fabric, AdamW, masked_loss / infctx, gradient clipping), with ``max_steps = warmup + steps``. The only
change made to the loop: ``RunFiles`` (what writes OUTPUT) is replaced by a recorder that keeps the loss
rows in memory and writes no checkpoint at the final Ctrl+C-style stop, and marks the moment set-up ends.

Model: random weights from ``checkpoint.config_from_sizes`` + ``init_model`` (RWKV-LM's initialisation),
saved once per shape in bf16 under --model-dir (the first 7B takes minutes on the CPU), then loaded by
the trainer like any base model. Data: random token ids, DATALOAD=get (every position trains),
LOSS_MASK=none. Sizes (layers x width, vocabulary 65536): tiny 2x128, 0.1B 12x768, 0.4B 24x1024,
1.5B/1.6B 24x2048, 3B/2.9B 32x2560, 7B/7.2B 32x4096, 13.3B 61x4096; or write LxC (e.g. 4x256). --deep-embed R
(RWKV-7 only) makes every row's model an RWKV-7a one with DeepEmbed rank R (32: the released models'), made by
tools.make_model's code.

Methods: lora and dora (r 64, alpha 128 unless --lora-r/--lora-alpha), pissa, bone, bat, state, full, and any of
them with +int8 / +nf4 / +fp8 (QUANT); qlora = lora+nf4. --infctx N trains TRAIN_TYPE=infctx with CHUNK_CTX=N
(0 = normal). --op picks the WKV kernel (auto | fla | rwkvfla | chunk | torch).

Printed per row:
  tokens/s       steady state: B·T tokens per step over the steps after the warm-up, from the loop's own
                 per-step timing (harmonic mean of its tokens/s column, i.e. total tokens / total time)
  alloc GiB      torch.cuda.max_memory_allocated during training (after set-up); "load" = during set-up
  used GiB       the GPU's used memory as nvidia-smi shows it (pynvml if installed, else
                 torch.cuda.mem_get_info total - free), sampled every 5 ms, its maximum; base = before the
                 row's process touched the GPU
  est GiB        the estimate of the plan the trainer ran (trainer/plan.py, memory.estimate) (total = nvidia-smi-like, alloc)
  MFU / HFU      tokens/s × FLOPs per token / peak; peak = a measured 8192³ bf16 matmul (once per
                 run, printed; --peak-tflops overrides)

FLOPs per token (N_mm: base weights used in matrix products per token = every att/ffn linear, the small
time-mix matrices (v7 w1 w2 a1 a2 v1 v2 g1 g2, v6 time_maa_w1/w2 time_decay_w1/w2) and the head; the
embedding is a lookup and is not counted; N_adp: the adapter's per-token products (LoRA/PiSSA r·(in+out),
Bone r·out, Bat in·out per adapted layer, Bat's weight-space product amortised over the batch);
N_tr: trained weights that are matrix operands (adapter + trained head / time-mix matrices; full: N_mm);
W: the forward WKV recurrence, W = L·k·C·N per token (k FLOPs per state element per token: RWKV-7 k = 9 =
1 for S·diag(w) + 2 each for S·a, the rank-one (S·a)·bᵀ, v·kᵀ and S·r; RWKV-5/6 k = 5 = 1 + 2 for v·kᵀ + 2
for S·r)):
  forward            2·(N_mm + N_adp) + W
  backward           activation grads 2·(N_mm + N_adp) + 2W, weight grads 2·N_tr
  recompute          GRAD_CP=1: the blocks' forward again, 2·(N_mm − N_head + N_adp) + W
  model FLOPs (MFU): forward + backward, no recompute. Full fine-tuning: 6·N_mm + 3W (the standard 6N)
  hardware (HFU):    model FLOPs + recompute (what the GPU actually executed; the lead's PEFT formula)
Approximations: layer 0's input gradient (not needed) is counted; elementwise work is not.

--json OUT appends one JSON line per row with everything needed to reproduce it (the command, the
commit, GPU, torch, package versions) and to calibrate trainer/memory.py (bench/calibrate_memory.py).
On a CPU it runs too (use --size tiny); GPU columns are then empty. TRAIN_SPEED_PROFILE=N (GPU) prints the
torch profiler's tables (N rows: by GPU time, CPU time, own CPU time) over the measured steps only;
with TRAIN_SPEED_TRACE=FILE.json.gz also its chrome trace. TRAIN_SPEED_CUDAGRAPHS=0 or 1 forces the
plan's choice of CUDA graphs (plan.use_cudagraphs) for A/B runs; TRAIN_SPEED_CUDA_STACK=keep leaves the
CUDA driver's default thread-stack reserve in place (device.trim_thread_stack) and TRAIN_SPEED_EMB=gpu keeps
the frozen embedding on the GPU (plan.embedding_on_cpu), TRAIN_SPEED_DEEP_EMBED=gpu a 7a model's frozen DeepEmbed
tables (plan.deep_embed_on_cpu), TRAIN_SPEED_FFN_PIECE=N sets the FFN's pieces
(RWKV.ffn_piece_tokens: at least N tokens each, 0 = whole), for A/B runs. TRAIN_SPEED_MEMORY_SNAPSHOT=FILE
pickles the CUDA allocator's history (torch.cuda.memory._snapshot; bench/peak_blocks.py reads it).
TRAIN_SPEED_STACK_LOG=1 records which Triton kernels grew the CUDA driver's thread-stack limit, and when
(cuda_stack_growth in --json). steady_used_bytes / steady_alloc_bytes are the peaks from the first optimizer
step after the warm-up on (peak_* cover all training steps).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2 ** 30
SIZES = {"tiny": (2, 128), "0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "1.6B": (24, 2048),
         "3B": (32, 2560), "2.9B": (32, 2560), "7B": (32, 4096), "7.2B": (32, 4096),
         "13.3B": (61, 4096)}    # RWKV-7 G1 13.3B: bench/fits_table.py says where the shape comes from
from trainer.choices import METHODS as BASE_METHODS  # noqa: E402
from trainer.choices import OPTIMIZERS, QUANT_TYPES  # noqa: E402
from trainer.errors import UserError  # noqa: E402
ROW_KEYS = ("version", "size", "method", "ctx", "bsz", "grad_cp", "op", "infctx", "compile", "train_parts", "stream")


# ------------------------------------------------------------------------------------------ rows
def parse_size(size: str) -> tuple[int, int]:
    if size in SIZES:
        return SIZES[size]
    try:
        layers, width = size.lower().split("x")
        return int(layers), int(width)
    except ValueError:
        raise SystemExit(f"--size {size!r}: use one of {', '.join(SIZES)} or LAYERSxWIDTH (e.g. 4x256)") from None


def parse_method(method: str) -> tuple[str, str]:
    """'lora+nf4' -> ('lora', 'nf4'); 'qlora' -> ('lora', 'nf4'); 'state' -> ('state', 'none')."""
    if method == "qlora":
        return "lora", "nf4"
    base, _, quant = method.partition("+")
    if base not in BASE_METHODS or (quant and quant not in QUANT_TYPES):
        raise SystemExit(f"--method {method!r}: use one of {', '.join(BASE_METHODS)}, optionally +int8, +nf4 or +fp8")
    return base, quant or "none"


def _cp_value(grad_cp):
    """A row's grad_cp: 0, 1, "auto", or a forced plan of GRAD_CP=auto, to measure what each tier costs and
    saves: "top:N" (N un-checkpointed top blocks), "kp:M" (M blocks keeping their matrix products) or
    "top:N,kp:M"."""
    from trainer.config import grad_cp_mode
    s = grad_cp_mode(grad_cp)                    # 0 / 1 in the spellings training.sh takes
    if s in ("0", "1"):
        return int(s)
    if s == "auto" or _parse_forced(s) is not None:
        return s
    raise ValueError(f"grad_cp {grad_cp!r}: 0, 1, auto, top:N, kp:M or top:N,kp:M")


def _parse_forced(s: str) -> tuple[int, int] | None:
    got = {"top": 0, "kp": 0}
    for part in s.split(","):
        name, _, n = part.partition(":")
        if name not in got or not n.isdigit():
            return None
        got[name] = int(n)
    return got["top"], got["kp"]


def _forced_plan(row: dict) -> tuple[int, int] | None:
    """A row's forced plan (plain top blocks, blocks keeping their products), or None."""
    s = str(row.get("grad_cp", 1))
    return _parse_forced(s) if s not in ("0", "1", "auto") else None


def _row(version, size, method, ctx, bsz, grad_cp, op="auto", infctx=0, compile="auto", train_parts="",
         stream="auto", deep_embed=0):
    row = dict(version=version, size=size, method=method, ctx=ctx, bsz=bsz, grad_cp=_cp_value(grad_cp), op=op,
               infctx=infctx, compile=str(compile), train_parts=train_parts, stream=stream)
    if deep_embed:                       # RWKV-7a (a plain row, and an older record, has no such key)
        row["deep_embed"] = int(deep_embed)
    return row


def named_grid(name: str) -> tuple[list[dict], dict]:
    """(rows, option defaults) of a named grid."""
    if name == "peft-table":
        # RWKV-PEFT's published settings (its tables: ctx 1024, micro batch 1, LoRA r 64, grad_cp 1, bf16;
        # its LoRA trains train_parts "time ln", state tuning only the state). Its "time" matches names with
        # "time" in them: RWKV-6's time_maa_* / time_decay* / time_faaaa, but none of RWKV-7's (x_r, w1, ...),
        # so on RWKV-7 it trains the LoRA and the norms only (56.9 M at 1.5B, docs/anchors.md): our "ln"
        rows = [_row(7, s, m, 1024, 1, 1, train_parts="" if m == "state" else "ln")
                for s in ("1.5B", "3B") for m in ("state", "lora", "lora+nf4")]
        rows += [_row(6, "7B", m, 1024, 1, 1, train_parts="time ln") for m in ("lora", "lora+nf4")]
        return rows, {}
    if name == "anchors":
        # the RWKV-PEFT configurations measured on an H100 (docs/anchors.md), with our default op
        rows = [_row(7, "1.5B", "lora", 1024, 1, 1, train_parts="ln"),
                _row(7, "1.5B", "state", 1024, 1, 1),
                _row(7, "1.5B", "lora", 4096, 8, 1, train_parts="ln")]
        return rows, {}
    if name == "mfu":
        return [_row(7, "1.5B", "full", 4096, 8, cp) for cp in (1, "auto")], {}
    if name == "memfit":
        # broad enough to calibrate trainer/memory.py: methods x (ctx, bsz) x grad_cp on a small model, the
        # adapter variants and quantisation on 1.5B, RWKV-6, infctx; few steps (memory, not speed)
        rows = [_row(7, "0.4B", m, ctx, bsz, cp) for m in ("lora", "state", "full")
                for ctx, bsz in ((512, 1), (2048, 1), (1024, 4)) for cp in (0, 1)]
        rows += [_row(7, "1.5B", m, 1024, 1, 1) for m in ("lora", "lora+nf4", "lora+int8", "pissa", "bone")]
        rows += [_row(6, "1.6B", "lora", 1024, 2, cp) for cp in (0, 1)]
        rows += [_row(7, "0.4B", "lora", 4096, 1, 1, infctx=512)]
        return rows, {"steps": 3, "warmup": 2}
    raise SystemExit(f"--grid {name!r}: use one of peft-table, anchors, mfu, memfit")


def row_env(row: dict, model_path: str, data_prefix: str, output: str, steps: int, warmup: int,
            precision: str = "bf16", lora_r: int = 64, lora_alpha: float = 128.0) -> dict:
    """The training.sh variables of a row (what TrainConfig.from_env reads)."""
    method, quant = parse_method(row["method"])
    infctx = int(row.get("infctx") or 0)
    lr = ("1", "0.01") if method == "state" else ("1e-5", "1e-6") if method == "full" else ("1e-4", "1e-5")
    return {
        "MODEL": model_path, "DATA": data_prefix, "OUTPUT": output,
        "FINETUNE_MODE": method, "QUANT": quant, "TRAIN_PARTS": row.get("train_parts") or "",
        "LORA_R": str(lora_r), "LORA_ALPHA": str(lora_alpha), "PISSA_R": str(lora_r), "DISHA_R": "64",
        "CTX_LEN": str(row["ctx"]), "MICRO_BSZ": str(row["bsz"]), "MINI_BSZ": "1",
        "DATALOAD": "get", "LOSS_MASK": "none",
        "EPOCH_COUNT": "1", "EPOCH_STEPS": str(warmup + steps + 1), "EPOCH_SAVE": "1",
        "LR_INIT": lr[0], "LR_FINAL": lr[1], "WARMUP_STEPS": "0", "LR_SCHEDULE": "const",
        "TRAIN_TYPE": "infctx" if infctx else "normal", "CHUNK_CTX": str(infctx or 512),
        "OP": row.get("op") or "auto", "COMPILE": str(row.get("compile") or "auto"), "PRECISION": precision,
        "GRAD_CP": str(row["grad_cp"]) if str(row["grad_cp"]) in ("0", "1") else "auto",     # a forced plan: auto
        "OPTIMIZER": row.get("optimizer") or "adamw", "OFFLOAD_BLOCKS": str(row.get("offload") or 0),
        "STRATEGY": "auto", "GPU_COUNT": "1", "NODES": "1", "ACCELERATOR": "auto", "SEED": "0", "WANDB": "",
        "RESUME": "0",
    }


def row_config(row: dict):
    """A TrainConfig for a row (model and data paths are placeholders): what calibrate_memory estimates."""
    from trainer.config import TrainConfig
    env = row_env(row, "model.pth", "data", "output", int(row.get("steps", 1)), int(row.get("warmup", 0)),
                  row.get("precision", "bf16"), int(row.get("lora_r", 64)), float(row.get("lora_alpha", 128)))
    return TrainConfig.from_env(env)


def row_sizes(row: dict):
    """The model's ModelConfig of a row (RWKV-7a where it has deep_embed); UserError for a 7a row not of RWKV-7."""
    from tools.make_model import deep_embed_config
    from trainer.checkpoint import config_from_sizes
    layers, width = parse_size(row["size"])
    plain = config_from_sizes(int(row["version"]), layers, width, vocab_size=int(row.get("vocab", 65536)))
    return deep_embed_config(plain, int(row.get("deep_embed") or 0))


# ------------------------------------------------------------------------------------------ FLOPs
def flops_per_token(cfg, sizes, plain_top: int = 0, keep_products: int = 0) -> dict:
    """Model and hardware FLOPs per token (see the module docstring) from trainer.memory's parameter table;
    ``plain_top`` blocks of a checkpointed run are not recomputed, ``keep_products`` recompute their WKV but
    no product (GRAD_CP=auto)."""
    from trainer.counts import param_table
    t = param_table(cfg, sizes)
    k = 9 if sizes.version == 7 else 5
    W = sizes.n_layer * k * sizes.n_embd * sizes.head_size
    adp = t.adapter_matmul + t.adapter_step_flops / (2 * max(1, cfg.MICRO_BSZ * cfg.CTX_LEN))
    fwd = 2 * (t.matmul + adp) + W
    bwd = 2 * (t.matmul + adp) + 2 * W + 2 * t.trained_matmul
    L = sizes.n_layer
    recompute = (2 * (t.matmul - t.head_matmul + adp) * (1 - min(plain_top + keep_products, L) / L)
                 + W * (1 - min(plain_top, L) / L)) if cfg.checkpointing else 0
    if cfg.TRAIN_TYPE == "infctx":    # each chunk's forward runs twice (forward, then inside the backward)
        recompute += fwd
    return {"model": fwd + bwd, "hardware": fwd + bwd + recompute, "n_mm": t.matmul, "n_adapter": adp,
            "n_trained_mm": t.trained_matmul, "wkv": W}


# ------------------------------------------------------------------------------------------ helpers
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "lightning", "fla-core", "flash-linear-attention", "rwkv-fla", "triton", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class _UsedMemory:
    """The GPU's used memory as nvidia-smi shows it: pynvml when installed, else cudaMemGetInfo."""

    def __init__(self, index: int = 0):
        self.nvml = None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self.smi_index = int(visible) if visible.isdigit() else index     # NVML counts every GPU of the host
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.smi_index))
            self.source = "pynvml"
        except Exception:
            self.source = "torch.cuda.mem_get_info"
        self.index = index

    def baseline(self) -> int | None:
        """Used memory before this process touches the GPU (pynvml, else nvidia-smi; None if neither)."""
        try:
            if self.nvml is not None:
                return self.read()
            q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                f"--id={self.smi_index}"], capture_output=True, text=True, timeout=30)
            return int(float(q.stdout.strip().splitlines()[0]) * 2 ** 20)
        except Exception:
            return None

    def read(self) -> int:
        if self.nvml is not None:
            pynvml, h = self.nvml
            return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        import torch
        free, total = torch.cuda.mem_get_info(self.index)
        return int(total - free)


class _Sampler(threading.Thread):
    """Polls the used memory every 5 ms; keeps the maximum of the set-up phase, of the training phase and of
    its steady part (from the optimizer step after the warm-up steps: no compiling, autotuning or first-step
    allocation in it; "train" includes it)."""

    def __init__(self, used: _UsedMemory):
        super().__init__(daemon=True)
        self.used = used
        self.phase = "load"
        self.peak = {"load": 0, "train": 0, "steady": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                v = self.used.read()
            except Exception:
                v = 0
            self.peak[self.phase] = max(self.peak[self.phase], v)
            if self.phase == "steady":
                self.peak["train"] = max(self.peak["train"], v)
            time.sleep(0.005)


def _log_stack_growth(gpu, steps: dict) -> list[dict]:
    """TRAIN_SPEED_STACK_LOG=1: which Triton kernel launch grows the CUDA driver's per-thread stack limit.
    Reads the limit (one driver call) before and after every Triton launch; a growth seen after a launch is
    that kernel's (with its local memory per thread, cuFuncGetAttribute), one seen before it happened since
    the last Triton launch (a kernel that is not Triton's, or a trim). At most 40 entries."""
    import ctypes

    from triton import knobs
    lib = gpu._libcuda()
    seen: list[dict] = []
    last = [gpu.thread_stack_limit(lib)]

    def local_bytes(function) -> int | None:
        value = ctypes.c_int(0)
        try:
            ok = lib.cuFuncGetAttribute(ctypes.byref(value), 3, ctypes.c_void_p(function)) == 0  # LOCAL_SIZE
        except Exception:
            return None
        return value.value if ok else None

    def check(meta, where: str) -> None:
        now = gpu.thread_stack_limit(lib)
        if now == last[0]:
            return
        if now is not None and last[0] is not None and now > last[0] and len(seen) < 40:
            data = getattr(meta, "data", None) or {}
            seen.append({"kernel": data.get("name"), "where": where, "from": last[0], "to": now,
                         "opt_step": steps.get("n", 0),
                         "local_bytes": local_bytes(data.get("function")) if where == "launch" else None})
        last[0] = now

    knobs.runtime.launch_enter_hook.add(lambda meta: check(meta, "before"))
    knobs.runtime.launch_exit_hook.add(lambda meta: check(meta, "launch"))
    return seen


# ------------------------------------------------------------------------------------------ one row (child)
def run_row(spec: dict) -> dict:
    """Train one row in this process and return its result (the child's job)."""
    import torch

    out: dict = {"status": "ok"}
    cuda = torch.cuda.is_available()
    used = _UsedMemory() if cuda else None
    if used is not None:
        out["used_baseline_bytes"] = used.baseline()
    from trainer import loop
    from trainer.config import TrainConfig

    env = row_env(spec, spec["model_path"], spec["data_prefix"], spec["output"], spec["steps"], spec["warmup"],
                  spec["precision"], spec["lora_r"], spec["lora_alpha"])
    cfg = TrainConfig.from_env(env)
    sizes = row_sizes(spec)
    from trainer import device as gpu
    from trainer import plan as planning
    from trainer.model import ffn_pieces
    planned: dict = {}
    resolve, forced = planning.resolve, _forced_plan(spec)
    graphs_env = os.environ.get("TRAIN_SPEED_CUDAGRAPHS")       # 0 / 1: force the plan's choice (A/B)

    def resolving(cfg_, sizes_, machine, **kw):       # the trainer's plan, with this row's A/B changes
        if forced is not None:
            kw["tiers"] = forced
        p = resolve(cfg_, sizes_, machine, **kw)
        changes: dict = {}
        if (spec.get("stream") or "auto") == "fp32":      # A/B: the fp32 residual stream the trainer had before
            changes["act_dtype"] = None if p.fabric_precision == "32-true" else torch.float32
        if graphs_env in ("0", "1"):
            changes["cudagraphs"] = p.compiled and graphs_env == "1"
        if os.environ.get("TRAIN_SPEED_EMB") == "gpu":    # A/B: the embedding on the GPU, as before session 12
            changes["emb_on_cpu"] = False
        if os.environ.get("TRAIN_SPEED_DEEP_EMBED") == "gpu":     # A/B: a 7a model's tables on the GPU
            changes["deep_embed_on_cpu"] = False
        if os.environ.get("TRAIN_SPEED_FFN_PIECE"):       # A/B: the FFN's pieces of at least N tokens (0: whole)
            n = int(os.environ["TRAIN_SPEED_FFN_PIECE"])
            changes.update(ffn_piece_tokens=n, ffn_pieces=ffn_pieces(math.prod(p.batch), n))
        p = p.but(**changes) if changes else p
        planned["plan"] = p
        return p
    planning.resolve = resolving
    trim = gpu.trim_thread_stack
    phase_steps: dict = {"n": 0}      # optimizer steps begun (counting_lr below)

    def trimming(device):           # TRAIN_SPEED_CUDA_STACK=keep: the driver's default stack reserve (A/B)
        freed = 0 if os.environ.get("TRAIN_SPEED_CUDA_STACK") == "keep" else trim(device)
        if "cuda_stack_freed_bytes" in out:          # after an optimizer step (device.trim_grown_stack)
            out.setdefault("cuda_stack_regrown_freed", []).append([phase_steps["n"], freed])
            return freed
        out["cuda_stack_freed_bytes"] = freed
        out["cuda_stack_kept_bytes"] = 0 if freed or used is None else gpu.thread_stack_bytes(device)
        if used is not None:        # the bare context, as the plan's probe finds it
            torch.cuda.synchronize()
            out["context_used_bytes"] = used.read() - out["used_baseline_bytes"]
        return freed
    gpu.trim_thread_stack = trimming
    rows: list[tuple] = []
    phase: dict = {}
    sampler = _Sampler(used) if used is not None else None

    class BenchFiles(loop.RunFiles):
        """Records the loss rows; writes nothing; marks the end of set-up (it is made just before the loop)."""

        def __init__(self, out_dir, prep, *args, **kwargs):     # whatever else the loop passes: unused
            self.out, self.prep, self.write, self.csv_path = Path(out_dir), prep, False, Path(out_dir) / "loss.csv"
            self.lock = None
            phase["op"] = prep.op
            out["emb_on_cpu"] = prep.model.emb.weight.device.type == "cpu" and cuda
            if prep.model.cfg.deep_embed:
                out["deep_embed_on_cpu"] = prep.model.blocks[0].ffn.s_emb.weight.device.type == "cpu" and cuda
            out["ffn_pieces"] = ffn_pieces(math.prod(prep.plan.batch), prep.model.ffn_piece_tokens)
            if cuda:
                torch.cuda.synchronize()
                phase["load_alloc"] = torch.cuda.max_memory_allocated()
                phase["load_reserved"] = torch.cuda.max_memory_reserved()
                torch.cuda.reset_peak_memory_stats()
            if sampler is not None:
                sampler.phase = "train"

        def save(self, **kw):
            return self.adapter_path(None)

        def append_losses(self, new_rows):
            rows.extend(new_rows)

        def plot(self):
            return None

        def sample(self, epoch, log):
            return ""

    logs: list[str] = []
    loop.RunFiles = BenchFiles
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    profile = os.environ.get("TRAIN_SPEED_PROFILE") if cuda else None   # =N: the N costliest GPU kernels
    prof = None
    if profile:   # the measured steps only: the warm-up steps (compiling, autotuning) are skipped
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA],
                                      schedule=torch.profiler.schedule(wait=spec["warmup"], warmup=0,
                                                                       active=spec["steps"], repeat=1),
                                      acc_events=True)
        lr_of_step = loop.learning_rate

        def stepping_lr(*args, **kwargs):          # called once per optimizer step
            prof.step()
            return lr_of_step(*args, **kwargs)
        loop.learning_rate = stepping_lr
    lr_before = loop.learning_rate

    def counting_lr(*args, **kwargs):              # called once per optimizer step, before it
        phase_steps["n"] += 1
        if phase_steps["n"] == spec["warmup"] + 1 and cuda:     # the steady part starts (see _Sampler)
            phase["pre_steady_alloc"] = torch.cuda.max_memory_allocated()
            phase["pre_steady_reserved"] = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
            if sampler is not None:
                sampler.phase = "steady"
        return lr_before(*args, **kwargs)
    loop.learning_rate = counting_lr
    stack_log = (_log_stack_growth(gpu, phase_steps) if cuda and os.environ.get("TRAIN_SPEED_STACK_LOG")
                 else None)
    snapshot = os.environ.get("TRAIN_SPEED_MEMORY_SNAPSHOT") if cuda else None   # =FILE: the allocator's history
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=400_000)
    try:
        with prof or contextlib.nullcontext():
            loop.train(cfg, log=logs.append, max_steps=spec["warmup"] + spec["steps"], progress=False)
        if snapshot:
            import pickle
            with open(snapshot, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
        if prof is not None:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(profile)), file=sys.stderr)
            if os.environ.get("TRAIN_SPEED_TRACE"):           # a chrome trace (.json.gz) of the measured steps
                prof.export_chrome_trace(os.environ["TRAIN_SPEED_TRACE"])
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(profile)), file=sys.stderr)
    except torch.cuda.OutOfMemoryError as err:
        out["status"] = "OOM"
        out["error"] = str(err).splitlines()[0][:300]
    except RuntimeError as err:                       # kernels that report it as a plain RuntimeError
        if "out of memory" not in str(err).lower():
            raise
        out["status"] = "OOM"
        out["error"] = str(err).splitlines()[0][:300]
    except UserError as err:
        out["status"] = "error"
        out["error"] = str(err)[:300]
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["op_resolved"] = phase.get("op")
    out["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    if cuda:
        try:
            torch.cuda.synchronize()
        except Exception as err:                      # a failed kernel can leave the GPU unusable: say so
            out.setdefault("error", f"{type(err).__name__}: {err}"[:300])
        out["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        out["peak_alloc_bytes"] = max(torch.cuda.max_memory_allocated(), phase.get("pre_steady_alloc", 0))
        out["peak_reserved_bytes"] = max(torch.cuda.max_memory_reserved(), phase.get("pre_steady_reserved", 0))
        if "pre_steady_alloc" in phase:
            out["steady_alloc_bytes"] = torch.cuda.max_memory_allocated()
        out["load_alloc_bytes"] = phase.get("load_alloc")
        out["load_reserved_bytes"] = phase.get("load_reserved")
        if "load_alloc" not in phase:                 # failed during set-up: all of it was the load phase
            out["load_alloc_bytes"], out["peak_alloc_bytes"] = out["peak_alloc_bytes"], None
        out["peak_used_bytes"] = sampler.peak["train"] or None
        out["load_used_bytes"] = sampler.peak["load"] or None
        out["steady_used_bytes"] = sampler.peak["steady"] or None
        out["used_source"] = used.source
        out["cuda_stack_limit_end"] = gpu.thread_stack_limit()   # what the driver grew it back to
        if stack_log is not None:
            out["cuda_stack_growth"] = stack_log
    out["trainer_said"] = [ln for ln in logs if ln.startswith(("Estimated peak", "WARNING", "  - ", "QUANT=",
                                                               "OFFLOAD_BLOCKS"))]
    steady = rows[spec["warmup"]:]
    tokens = spec["bsz"] * spec["ctx"]
    if out["status"] == "ok" and steady:
        seconds = sum(tokens / float(r[4]) for r in steady)
        out["tokens_per_s"] = round(len(steady) * tokens / seconds, 1)
        out["step_s"] = round(seconds / len(steady), 4)
        out["loss_last"] = float(steady[-1][2])
        out["step_tokens_per_s"] = [round(float(r[4])) for r in rows]      # every step's, warm-up included
        # the median measured step: a one-time slow step inside the window (CUDA graphs recording once more,
        # seen with un-checkpointed blocks) moves the mean, not this
        out["tokens_per_s_median"] = round(statistics.median(float(r[4]) for r in steady), 1)
        out["measured_steps"] = len(steady)
    elif out["status"] == "ok":
        out["status"] = "error"
        out["error"] = f"only {len(rows)} steps recorded (warm-up {spec['warmup']})"
    plan = planned.get("plan")
    if plan is not None and plan.estimate is not None:     # the plan the trainer ran, and its estimate
        est = plan.estimate
        out["plain_top"] = plan.plain_top
        out["keep_products"] = plan.keep_products
        out["est_total_bytes"] = int(est.total)
        out["est_alloc_bytes"] = int(est.peak_allocated)
        out["est_peak_at"] = est.peak_at
        out["est_terms"] = {k: int(v) for k, v in est.terms.items()}
    elif plan is not None:
        out["est_error"] = plan.estimate_error
    fl = flops_per_token(cfg, sizes, out.get("plain_top", 0), out.get("keep_products", 0))
    out["flops_per_token_model"] = fl["model"]
    out["flops_per_token_hw"] = fl["hardware"]
    from trainer.counts import param_table
    table = param_table(cfg, sizes)
    out["params_total"], out["params_trained"] = table.total, table.trained
    peak = spec.get("peak_tflops")
    if peak and out.get("tokens_per_s"):
        out["mfu"] = round(out["tokens_per_s"] * fl["model"] / (peak * 1e12), 4)
        out["hfu"] = round(out["tokens_per_s"] * fl["hardware"] / (peak * 1e12), 4)
    return out


# ------------------------------------------------------------------------------------------ the parent
def measure_peak_tflops() -> dict:
    """In this process: the GPU's bf16 matmul peak, 8192³, median of 3 timings of 20 products."""
    import torch
    if not torch.cuda.is_available():
        return {"device": "cpu", "peak_tflops": None}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / 20)
    t = sorted(times)[1]
    return {"device": torch.cuda.get_device_name(0), "peak_tflops": round(2 * n ** 3 / t / 1e12, 1),
            "cuda": torch.version.cuda}


def _child(args: list[str], timeout: float) -> tuple[int, str, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as err:
        def text(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        return -9, text(err.stdout), text(err.stderr) + f"\ntimed out after {timeout:.0f} s"


def _tagged(stdout: str, tag: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    return None


def ensure_model(version: int, layers: int, width: int, vocab: int, model_dir: Path, timeout: float,
                 deep_embed: int = 0) -> Path:
    kind = f"{version}a{deep_embed}" if deep_embed else f"{version}"       # RWKV-7a: rwkv7a32-...
    path = model_dir / f"rwkv{kind}-{layers}x{width}-v{vocab}.pth"
    if path.is_file():
        return path
    model_dir.mkdir(parents=True, exist_ok=True)
    print(f"making random RWKV-{kind} {layers}x{width} weights once (cached as {path}) ...", flush=True)
    t = time.perf_counter()
    rc, so, se = _child(["--_make-model", json.dumps([version, layers, width, vocab, str(path), deep_embed])],
                        timeout)
    if rc != 0 or not path.is_file():
        raise SystemExit(f"could not make {path}:\n{se[-2000:]}")
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def make_model_file(version: int, layers: int, width: int, vocab: int, path: str, deep_embed: int = 0) -> None:
    """The random model of a row in bf16 at ``path``: tools.make_model's (RWKV-LM's initialisation, output
    projections at zero as RWKV-LM's; RWKV-7a's DeepEmbed of rank ``deep_embed`` drawn where not 0)."""
    import torch
    from tools.make_model import deep_embed_config, new_model
    from trainer.checkpoint import config_from_sizes, save_atomic
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = deep_embed_config(config_from_sizes(version, layers, width, vocab_size=vocab), deep_embed)
    # the GPU's generator and QR where there is one: seconds instead of minutes for 7B
    model = new_model(cfg, output_gain=0.0, device="cuda" if torch.cuda.is_available() else "cpu")
    sd = {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    del model
    save_atomic(sd, path)


def make_data(prefix: Path, vocab: int, tokens: int) -> None:
    import numpy as np
    from trainer.data.binidx import write_binidx
    rng = np.random.default_rng(0)
    write_binidx(prefix, [rng.integers(1, min(vocab, 65535), size=tokens, dtype=np.int64)])


def _gib(x) -> str:
    return f"{x / GiB:.2f}" if isinstance(x, (int, float)) and x else "-"


HEADER = (f"{'v':>1} {'size':>5} {'method':<10} {'ctx':>5} {'bsz':>3} {'cp':>2} {'op':<7} {'infctx':>6} {'cmp':>4} {'strm':>4} | "
          f"{'tokens/s':>9} {'step s':>7} | {'alloc':>6} {'load':>6} {'used':>6} {'base':>5} | "
          f"{'est':>6} {'e.alloc':>7} | {'MFU':>5} {'HFU':>5} | status")


def format_row(row: dict, res: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%" if x else "-"
    tps = f"{res['tokens_per_s']:,.0f}" if res.get("tokens_per_s") else "-"
    step = f"{res['step_s']:.3f}" if res.get("step_s") else "-"
    op = res.get("op_resolved") or row["op"]
    status = res["status"] + (f": {res['error']}" if res.get("error") and res["status"] != "OOM" else "")
    med = res.get("tokens_per_s_median")
    steps = res.get("measured_steps") or 0
    if med and res.get("tokens_per_s") and steps >= 5 and abs(med / res["tokens_per_s"] - 1) > 0.2:
        status += f" (median step {med:,.0f} tok/s: a slow step in the window)"
    version = f"{row['version']}a" if row.get("deep_embed") else row["version"]       # RWKV-7a
    return (f"{version:>1} {row['size']:>5} {row['method']:<10} {row['ctx']:>5} {row['bsz']:>3} "
            f"{row['grad_cp']:>2} {op:<7} {row['infctx'] or '-':>6} {row.get('compile') or 'auto':>4} "
            f"{row.get('stream') or 'auto':>4} | "
            f"{tps:>9} {step:>7} | "
            f"{_gib(res.get('peak_alloc_bytes')):>6} {_gib(res.get('load_alloc_bytes')):>6} "
            f"{_gib(res.get('peak_used_bytes')):>6} {_gib(res.get('used_baseline_bytes')):>5} | "
            f"{_gib(res.get('est_total_bytes')):>6} {_gib(res.get('est_alloc_bytes')):>7} | "
            f"{pct(res.get('mfu')):>5} {pct(res.get('hfu')):>5} | {status}")


def row_command(row: dict, opts: argparse.Namespace) -> str:
    parts = ["python", "bench/train_speed.py", "--version", str(row["version"]), "--size", row["size"],
             "--method", row["method"], "--ctx", str(row["ctx"]), "--bsz", str(row["bsz"]),
             "--grad-cp", str(row["grad_cp"]), "--op", row["op"], "--infctx", str(row["infctx"] or 0),
             "--compile", str(row.get("compile") or "auto"), "--stream", row.get("stream") or "auto",
             "--train-parts", row["train_parts"] or "", "--steps", str(opts.steps), "--warmup", str(opts.warmup),
             "--precision", opts.precision, "--lora-r", str(opts.lora_r), "--lora-alpha", str(opts.lora_alpha),
             "--vocab", str(opts.vocab), "--optimizer", opts.optimizer]
    if opts.offload:
        parts += ["--offload", str(opts.offload)]
    if row.get("deep_embed"):
        parts += ["--deep-embed", str(row["deep_embed"])]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/train_speed.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", type=int, nargs="+", default=[7], choices=(5, 6, 7))
    ap.add_argument("--size", nargs="+", default=["0.1B"])
    ap.add_argument("--method", nargs="+", default=["lora"])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024])
    ap.add_argument("--bsz", type=int, nargs="+", default=[1], help="MICRO_BSZ")
    ap.add_argument("--grad-cp", type=_cp_value, nargs="+", default=[1],
                    help="GRAD_CP 0 | 1 | auto, or a forced plan of auto: top:N (N top blocks un-checkpointed), "
                         "kp:M (M blocks keep their matrix products), top:N,kp:M")
    ap.add_argument("--op", nargs="+", default=["auto"])
    ap.add_argument("--infctx", type=int, nargs="+", default=[0], help="CHUNK_CTX for TRAIN_TYPE=infctx; 0 = normal")
    ap.add_argument("--compile", nargs="+", default=["auto"], choices=("auto", "1", "0"), help="COMPILE")
    ap.add_argument("--stream", nargs="+", default=["auto"], choices=("auto", "fp32"),
                    help="residual stream: auto = the trainer's (bf16 under bf16); fp32 = as before, for A/B")
    ap.add_argument("--train-parts", default="", help='TRAIN_PARTS, e.g. "time ln"')
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 10; memfit 3)")
    ap.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; memfit 2)")
    ap.add_argument("--precision", default="bf16", choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=float, default=128.0)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="OPTIMIZER")
    ap.add_argument("--offload", type=int, default=0, help="OFFLOAD_BLOCKS (default 0: none)")
    ap.add_argument("--deep-embed", type=int, default=0, help="RWKV-7a: DeepEmbed rank of every row's model (32: "
                    "the released models'; default 0: plain RWKV-7)")
    ap.add_argument("--grid", default=None, help="peft-table | anchors | mfu | memfit (replaces the list options)")
    ap.add_argument("--json", default=None, help="append one JSON line per row to this file")
    ap.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: measured)")
    ap.add_argument("--model-dir", default=os.environ.get("RWKV_BENCH_MODELS", str(Path(tempfile.gettempdir())
                                                                                   / "rwkv-bench-models")))
    ap.add_argument("--row-timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument("--list", action="store_true", help="print the rows and stop")
    ap.add_argument("--_row", help=argparse.SUPPRESS)
    ap.add_argument("--_peak", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_make-model", dest="make_model", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)

    if opts._row:                                    # a child: one row
        res = run_row(json.loads(opts._row))
        print("ROW:" + json.dumps(res), flush=True)
        return 0
    if opts._peak:
        print("PEAK:" + json.dumps(measure_peak_tflops()), flush=True)
        return 0
    if opts.make_model:
        make_model_file(*json.loads(opts.make_model))
        return 0

    if opts.grid:
        rows, defaults = named_grid(opts.grid)
    else:
        rows = [_row(*combo[:-1], train_parts=opts.train_parts, stream=combo[-1]) for combo in itertools.product(
            opts.version, opts.size, opts.method, opts.ctx, opts.bsz, opts.grad_cp, opts.op, opts.infctx,
            opts.compile, opts.stream)]
        defaults = {}
    if opts.deep_embed:
        rows = [dict(r, deep_embed=opts.deep_embed) for r in rows]
    opts.steps = opts.steps if opts.steps is not None else defaults.get("steps", 10)
    opts.warmup = opts.warmup if opts.warmup is not None else defaults.get("warmup", 3)
    for r in rows:
        parse_method(r["method"])
        try:
            row_sizes(r)                      # the size's name, and --deep-embed on RWKV-7 only
        except UserError as err:
            raise SystemExit(f"RWKV-{r['version']} {r['size']}: {err}") from None
    skipped = [r for r in rows if r["infctx"] and r["infctx"] > r["ctx"]]
    rows = [r for r in rows if r not in skipped]
    if skipped:
        print(f"skipped {len(skipped)} rows whose CHUNK_CTX is larger than CTX_LEN")
    if not rows:
        print("no rows to run")
        return 1
    if opts.list:
        for r in rows:
            print(row_command(r, opts))
        return 0

    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if opts.peak_tflops is None:
        rc, so, se = _child(["--_peak"], 600)
        peak_info = _tagged(so, "PEAK:") or {"device": "unknown", "peak_tflops": None, "error": se[-500:]}
    else:
        peak_info = {"device": None, "peak_tflops": opts.peak_tflops, "given": True}
    peak = peak_info.get("peak_tflops")
    versions = _versions()
    print(f"commit {commit[:10]}{' (uncommitted changes)' if dirty else ''}; {peak_info.get('device') or ''}; "
          f"torch {versions.get('torch')}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "torch"))
    print(f"MFU peak: {peak} TFLOP/s bf16 ({'given' if peak_info.get('given') else 'measured: 8192³ matmul'})"
          if peak else "MFU peak: none (no GPU; give --peak-tflops to compute MFU)")
    print(f"{opts.steps} steps after {opts.warmup} warm-up steps per row, precision {opts.precision}, "
          f"OPTIMIZER={opts.optimizer}\n")

    work = Path(tempfile.mkdtemp(prefix="rwkv-train-speed-"))
    data_prefix = work / "data" / "random"
    (work / "data").mkdir()
    need = max(r["ctx"] for r in rows) * max(r["bsz"] for r in rows) * 4 + 1
    make_data(data_prefix, opts.vocab, max(need, 1 << 20))
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        layers, width = parse_size(row["size"])
        model = ensure_model(row["version"], layers, width, opts.vocab, Path(opts.model_dir), opts.row_timeout,
                             int(row.get("deep_embed") or 0))
        spec = dict(row, model_path=str(model), data_prefix=str(data_prefix), output=str(work / "out"),
                    steps=opts.steps, warmup=opts.warmup, precision=opts.precision, lora_r=opts.lora_r,
                    lora_alpha=opts.lora_alpha, vocab=opts.vocab, peak_tflops=peak, optimizer=opts.optimizer,
                    offload=opts.offload)
        rc, so, se = _child(["--_row", json.dumps(spec)], opts.row_timeout)
        if os.environ.get("TRAIN_SPEED_PROFILE"):
            print(se[se.find("-----"):], flush=True)       # the profiler's tables
        res = _tagged(so, "ROW:")
        if res is None:
            tail = [ln for ln in se.strip().splitlines() if ln.strip()]
            oom = "OutOfMemoryError" in se or "CUDA out of memory" in se
            res = {"status": "OOM" if oom else "crashed", "error": f"rc {rc}: {tail[-1][:300] if tail else ''}"}
        print(format_row(row, res), flush=True)
        if opts.json:
            rec = dict(row, n_layer=layers, n_embd=width, vocab=opts.vocab, steps=opts.steps, warmup=opts.warmup,
                       precision=opts.precision, lora_r=opts.lora_r, lora_alpha=opts.lora_alpha,
                       optimizer=opts.optimizer, offload=opts.offload, **res,
                       peak_tflops=peak, command=row_command(row, opts), commit=commit, dirty=dirty,
                       gpu=res.get("device") or peak_info.get("device"), versions=versions,
                       date=time.strftime("%Y-%m-%d %H:%M:%S"), host=os.uname().nodename)
            with open(opts.json, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
