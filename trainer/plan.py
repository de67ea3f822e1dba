"""How a run executes, decided in one place: the machine is probed once, the settings are resolved against it
once, and every part of the trainer (and the web page's memory panel, --dry-run and bench/) reads the result.

    machine = Machine.probe(device)           # what this machine has (the GPU's free memory after the stack trim)
    plan = resolve(cfg, sizes, machine)       # a frozen RunPlan: every decision, and the memory it will take
    plan.estimate.total, plan.op, plan.compiled, plan.plain_top, plan.offload_blocks, ...
    model.set_execution(plan.execution)       # the model's options, in one call

Where each thing is decided (all in this file): the device (device_for), precision and the residual stream's
dtype (precision_name, precision_of, activation_dtype), the WKV op (_op), compiling (compile_choice), CUDA graphs
(use_cudagraphs and the "memory is tight" veto in resolve), gradient checkpointing's tiers (GRAD_CP=auto:
_search_tiers), which blocks stream their weights from CPU memory (OFFLOAD_BLOCKS: _offload_number,
_search_offload), the embedding and DeepEmbed tables kept in CPU memory (embedding_on_cpu, deep_embed_on_cpu),
QLoRA's loading from the file (stream_quant), the FFN's pieces, the allocator's expandable segments
(Machine.grow_segments). The ``auto`` searches call the memory estimate (trainer/memory.py) on candidate plans.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import memory
from .errors import UserError
from .memory import FIT_FRACTION, GiB

HOST_FRACTION = 0.8   # of the CPU memory available, what OFFLOAD_BLOCKS' page-locked copies may take (the rest:
                      # the data, Python, the loader's transient copies; WSL2 ends its whole VM when it runs out)
CUDAGRAPH_MAX_WORK = 2048 * 2048   # tokens per micro step × C up to which a step is bound by the CPU
FFN_PIECE_TOKENS = 4096            # the FFN's pieces under gradient checkpointing (model.ffn_pieces)


# ------------------------------------------------------------------------------------------ the machine
@dataclass(frozen=True)
class Machine:
    """What the machine offers a run. ``probe`` looks at the one at hand; ``nominal`` is a current GPU with
    every op installed and its free memory unknown (what these settings would need on a GPU: no searches)."""
    device: str = "cuda"
    name: str = "a GPU"
    capability: tuple[int, int] = (9, 0)
    bf16: bool = True                    # torch.cuda.is_bf16_supported() (emulated bf16 included)
    native_bf16: bool = True             # bf16 in hardware (Triton's bf16 kernels build)
    triton: bool = True
    cxx: bool = True                     # a C++ compiler on PATH (torch.compile on the CPU)
    free: float | None = None            # GPU memory free as nvidia-smi would show it before this process
    host: int | None = None              # CPU memory available without swapping
    wsl: bool = False
    grow_segments: bool = True           # the allocator may grow segments in place (device.may_grow_segments)
    probed: bool = False                 # the machine at hand (ops checked as installed; settings refused here)

    @property
    def type(self) -> str:
        return torch.device(self.device).type

    @classmethod
    def nominal(cls) -> "Machine":
        return cls()

    @classmethod
    def probe(cls, device: Any, memory_too: bool = True) -> "Machine":
        """The machine at hand for ``device``; ``memory_too``: give the CUDA driver's idle thread-stack reserve
        back and read the free GPU memory and CPU memory (False: before any process of the run holds the GPU)."""
        import importlib.util
        import shutil

        from . import device as gpu
        from .strategy import running_on_wsl
        dev = torch.device(device)
        wsl = running_on_wsl()
        common = dict(device=str(dev), triton=importlib.util.find_spec("triton") is not None, wsl=wsl,
                      grow_segments=gpu.may_grow_segments(wsl), probed=True,
                      cxx=any(shutil.which(c) for c in ("g++", "c++", "clang++")))
        if dev.type != "cuda":
            return cls(name=dev.type, capability=(0, 0), bf16=False, native_bf16=False,
                       host=gpu.host_available() if memory_too else None, **common)
        free = None
        if memory_too:
            gpu.trim_thread_stack(dev)       # the CUDA driver's idle thread-stack reserve (264 MiB on an H100)
            free = gpu.gpu_free_before(dev)
        return cls(name=torch.cuda.get_device_name(dev), capability=tuple(torch.cuda.get_device_capability(dev)),
                   bf16=torch.cuda.is_bf16_supported(), native_bf16=_native_bf16(), free=free,
                   host=gpu.host_available() if memory_too else None, **common)


def _native_bf16() -> bool:
    """Whether the current CUDA GPU has bf16 in hardware. torch.cuda.is_bf16_supported() also says yes where
    bf16 is only emulated (a T4, compute capability 7.5), where Triton's bf16 kernels do not build."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                       # a torch without the argument: its answer is the native one
        return torch.cuda.is_bf16_supported()


def device_for(cfg: Any) -> torch.device:
    """ACCELERATOR resolved: the CUDA GPU where there is one (auto), refused with the fix where it cannot be."""
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


DEFAULT_PORT = "29500"   # the rendezvous port when several machines train and MASTER_PORT is not set (torchrun's)


def rendezvous(cfg: Any, environ: Mapping[str, str]) -> dict[str, str]:
    """NODES > 1: where the machines meet, checked before any process starts (without NODE_RANK every machine would
    take itself for the first, and all would wait forever). The variables to add to the environment (MASTER_PORT's
    default); {} on one machine."""
    if cfg.NODES == 1 or "LOCAL_RANK" in environ:      # one machine, or a process Lightning started (already set)
        return {}
    others = ", ".join(map(str, range(1, cfg.NODES))) if cfg.NODES <= 5 else f"1 to {cfg.NODES - 1}"
    example = (f"on the first machine `NODE_RANK=0 MASTER_ADDR=<its address> ./training.sh`, on the others the same "
               f"with NODE_RANK={others} (README, Several machines)")
    missing = [name for name in ("NODE_RANK", "MASTER_ADDR") if not environ.get(name, "").strip()]
    if missing:
        raise UserError(f"NODES={cfg.NODES} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                        "each machine needs its number and the first machine's address.", f"start {example}")
    rank = environ["NODE_RANK"].strip()
    if not rank.isdigit() or int(rank) >= cfg.NODES:
        raise UserError(f"NODE_RANK={rank} but NODES={cfg.NODES}: the machines are numbered 0 to {cfg.NODES - 1}.",
                        f"start {example}")
    port = environ.get("MASTER_PORT", "").strip()
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"MASTER_PORT={port} is not a port number.", "set MASTER_PORT to a free port from 1024 to "
                        f"65535, the same on every machine, or leave it unset ({DEFAULT_PORT})")
    return {} if port else {"MASTER_PORT": DEFAULT_PORT}


# ------------------------------------------------------------------------------------------ precision
def precision_name(cfg: Any, machine: Machine) -> str:
    """PRECISION with auto resolved: bf16 on a CUDA GPU that has it in hardware (RTX 30xx, A100 and newer),
    fp16 on an older CUDA GPU (fp16 autocast, fp32 residual stream), fp32 on the CPU (bf16 is fast there only
    with AMX or AVX-512 BF16; without them a training step ran 20 to 25 times slower: README, PRECISION)."""
    if cfg.PRECISION != "auto":
        return cfg.PRECISION
    if machine.type == "cuda":
        return "bf16" if machine.native_bf16 else "fp16"
    return "fp32"


def precision_of(cfg: Any, machine: Machine) -> tuple[str, torch.dtype]:
    """Fabric's precision string and the dtype the frozen weights are stored in; refused where the machine
    cannot run it."""
    chosen = precision_name(cfg, machine)
    if chosen == "bf16":
        if cfg.PRECISION == "bf16" and machine.type == "cuda" and not machine.bf16:
            raise UserError(f"PRECISION=bf16 but this GPU ({machine.name}) has no bf16 support.",
                            "set PRECISION=fp16 (or fp32) in training.sh")
        return "bf16-mixed", torch.bfloat16
    if chosen == "fp16":
        if machine.type != "cuda":
            raise UserError("PRECISION=fp16 needs a CUDA GPU.", "on the CPU use PRECISION=fp32 or bf16")
        return "16-mixed", torch.float16
    return "32-true", torch.float32


def precision_note(cfg: Any, machine: Machine) -> str | None:
    """The log line that says what PRECISION=auto chose and why (None when PRECISION was set)."""
    if cfg.PRECISION != "auto":
        return None
    name = precision_name(cfg, machine)
    return f"PRECISION=auto: {name} " + (
        "(a CPU without bf16 instructions ran bf16 20 times slower: README)" if machine.type != "cuda" else
        "(this GPU has bf16)" if name == "bf16" else f"({machine.name} has no bf16 in hardware)")


def activation_dtype(fabric_precision: str) -> torch.dtype | None:
    """The residual stream's dtype (RWKV.act_dtype). bf16 autocast: bf16, as RWKV-LM trains (half the bytes per
    block input kept for the backward pass); fp16: fp32, since an fp16 stream overflows in deep RWKV models;
    fp32: unchanged."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float32}.get(fabric_precision)


# ------------------------------------------------------------------------------------------ op, compile, graphs
def _op(cfg: Any, machine: Machine, version: int) -> str:
    """The WKV op: on the machine at hand ops.resolve (installed, fastest first); on the nominal GPU what such
    a GPU gets with every op installed (ops.AUTO_ORDER_CUDA)."""
    from . import ops
    if machine.probed:
        return ops.resolve(cfg.OP, machine.device, version)
    return ops.AUTO_ORDER_CUDA[version][0] if cfg.OP == "auto" else cfg.OP


def compile_choice(cfg: Any, machine: Machine) -> tuple[bool, str | None]:
    """(compile the blocks?, a note for the log). COMPILE=auto compiles on a CUDA GPU where torch.compile's GPU
    backend (Triton, compute capability 7.0+) works, and stays eager on the CPU (compiling there costs more than
    it gains on small runs); COMPILE=1 compiles or stops with the reason; COMPILE=0 never. With QUANT too: the
    quantised product is one custom op in the graph (trainer/quant.py)."""
    if cfg.COMPILE == "0":
        return False, None
    reason = None
    if machine.type == "cuda":
        if not machine.triton:
            reason = "torch.compile on a GPU needs Triton, which is not installed (pip install triton)"
        elif machine.capability[0] < 7:
            reason = (f"torch.compile's GPU code needs compute capability 7.0 or newer; this GPU has "
                      f"{machine.capability[0]}.{machine.capability[1]}")
    elif machine.type == "cpu":
        if cfg.COMPILE == "auto":
            return False, None
        if not machine.cxx:
            reason = "torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    else:
        reason = f"torch.compile is not supported here for device {machine.type}"
    if reason is None:
        return True, ("COMPILE: the blocks are compiled with torch.compile; the first step takes longer "
                      "(about a minute) while it builds the fused kernels")
    if cfg.COMPILE == "1":
        raise UserError(f"COMPILE=1: {reason}.", "set COMPILE=auto or COMPILE=0 (slower, otherwise the same)")
    return False, f"COMPILE=auto: not compiling ({reason}); training runs uncompiled, a little slower"


def use_cudagraphs(cfg: Any, machine: Machine, n_embd: int, method: Any) -> bool:
    """Whether compiled blocks' training calls replay as CUDA graphs (model.compile_blocks): where the CPU
    issuing kernels bounds the step, i.e. small micro steps (MICRO_BSZ × CTX_LEN × C up to CUDAGRAPH_MAX_WORK;
    larger ones gained nothing and the graphs' pool held more memory); on one CUDA GPU (DDP's and DeepSpeed's
    hooks run between the blocks); with fixed shapes (not DATALOAD=only nor the CTX_LEN warm-up, whose lengths
    change and would record a graph each); not infctx (whose chunks recompute the blocks inside a checkpoint of
    their own); not with MINI_BSZ > 1 (the gradients a micro step leaves for the next live in the graphs'
    memory, which the next replay overwrites); not where the method draws random numbers in its forward pass
    (LoRA's dropout: not tried on a GPU)."""
    return (machine.type == "cuda" and cfg.GPU_COUNT * cfg.NODES == 1 and not cfg.STRATEGY.startswith("deepspeed")
            and cfg.TRAIN_TYPE == "normal" and cfg.DATALOAD != "only" and cfg.MINI_BSZ == 1
            and not method.random_in_forward()
            and not (cfg.INITIAL_CTX_LEN > 0 and cfg.CTX_WARMUP_STEPS > 0)
            and cfg.MICRO_BSZ * cfg.CTX_LEN * n_embd <= CUDAGRAPH_MAX_WORK)


def embedding_on_cpu(cfg: Any, method: Any) -> bool:
    """Whether a GPU run keeps the embedding in CPU memory (trainer/tables.py): where it is frozen (a method that
    does not train the base, emb not in TRAIN_PARTS) and _tables_may_stay."""
    from .peft.base import part_names
    if method.TRAINS_BASE or part_names(["emb.weight"], tuple(cfg.TRAIN_PARTS)):
        return False
    return _tables_may_stay(cfg)


def deep_embed_on_cpu(cfg: Any, sizes: Any) -> bool:
    """Whether a GPU run keeps an RWKV-7a model's DeepEmbed tables (ffn.s_emb, V x r² a layer: 3 GiB at 1.5B) in
    CPU memory (trainer/tables.py): where they are frozen (TRAIN_PARTS without deepembed: every method, full
    fine-tuning too, leaves them so otherwise) and _tables_may_stay."""
    from .peft.base import part_names
    if not getattr(sizes, "deep_embed", 0) or part_names(["blocks.0.ffn.s_emb.weight"], tuple(cfg.TRAIN_PARTS)):
        return False
    return _tables_may_stay(cfg)


def _tables_may_stay(cfg: Any) -> bool:
    """Frozen tables may stay in CPU memory: one process, no DeepSpeed (DDP wants every parameter on the GPU;
    DeepSpeed moves the whole model there)."""
    return cfg.GPU_COUNT * cfg.NODES == 1 and not cfg.STRATEGY.startswith("deepspeed_stage_")


# ------------------------------------------------------------------------------------------ offload
def offload_host_bytes(cfg: Any, sizes: Any, precision: str) -> float:
    """CPU memory one streamed block's frozen weights take (OFFLOAD_BLOCKS keeps them there)."""
    from .counts import param_table
    return param_table(cfg, sizes).block_streamed * (4 if precision == "fp32" else 2)


def offload_host_limit(cfg: Any, sizes: Any, precision: str, available: int | None) -> int | None:
    """The most blocks whose frozen weights fit in HOST_FRACTION of the CPU memory ``available``; None where
    that is unknown."""
    per_block = offload_host_bytes(cfg, sizes, precision)
    if available is None or per_block <= 0:
        return None
    return int(HOST_FRACTION * available // per_block)


def _offload_number(cfg: Any, sizes: Any, machine: Machine, precision: str) -> int:
    """OFFLOAD_BLOCKS set to a number: the blocks streamed (0 where the settings cannot stream: offload.why_not).
    On the machine at hand refused with the fix: a number on a run that is not on a GPU, one the model has no room
    for (block 0 always stays), or one whose weights would not fit in HOST_FRACTION of the CPU memory available."""
    from .offload import why_not
    n = int(cfg.OFFLOAD_BLOCKS) if cfg.OFFLOAD_BLOCKS != "auto" else 0
    if machine.probed and n:
        if machine.type != "cuda":
            raise UserError(f"OFFLOAD_BLOCKS={n}: this run is on the {machine.type}, where the weights are in its "
                            "memory already.", "set OFFLOAD_BLOCKS=0 (or auto), or train on an NVIDIA GPU")
        if n > sizes.n_layer - 1:
            raise UserError(f"OFFLOAD_BLOCKS={n}, but {cfg.model_path.name} has {sizes.n_layer} blocks; block 0 "
                            f"always stays on the GPU.", f"set OFFLOAD_BLOCKS to at most {sizes.n_layer - 1} (or auto)")
        most = offload_host_limit(cfg, sizes, precision, machine.host)
        if most is not None and n > most:
            raise UserError(
                f"OFFLOAD_BLOCKS={n} keeps {n * offload_host_bytes(cfg, sizes, precision) / GiB:.1f} GiB of frozen "
                f"weights in CPU memory, but only {machine.host / GiB:.1f} GiB is available ("
                + (f"OFFLOAD_BLOCKS={most} fits there" if most else "not one block fits there")
                + f", keeping {100 - HOST_FRACTION * 100:.0f}% for the rest).",
                (f"set OFFLOAD_BLOCKS to at most {most}" if most else "set OFFLOAD_BLOCKS=0")
                + ", close other programs, or (WSL2) give it more memory: memory=... in "
                "%UserProfile%\\.wslconfig, then wsl --shutdown")
    if n <= 0 or why_not(cfg):
        return 0
    return min(n, sizes.n_layer - 1)


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class RunPlan:
    """Every decision about how a run executes, and the memory it will take (resolve makes it)."""
    cfg: Any                             # the TrainConfig it was resolved from
    sizes: Any                           # the model's ModelConfig
    machine: Machine
    method: Any                          # the fine-tuning method (trainer/peft), built from cfg's settings
    precision: str                       # bf16 | fp16 | fp32
    fabric_precision: str                # Lightning's: bf16-mixed | 16-mixed | 32-true
    weight_dtype: torch.dtype            # the frozen weights' dtype
    act_dtype: torch.dtype | None        # the residual stream's under autocast (activation_dtype)
    op: str                              # the WKV op
    compiled: bool                       # the blocks are compiled (compile_choice)
    compile_note: str | None
    cudagraphs: bool                     # compiled blocks replay as CUDA graphs
    graphs_note: str | None
    grad_cp: str                         # GRAD_CP: 0 | 1 | auto
    plain_top: int                       # checkpointed runs: top blocks not checkpointed (GRAD_CP=auto)
    keep_products: int                   # ... blocks below those that keep their matrix products
    ffn_piece_tokens: int                # the FFN over pieces of at least this many tokens (0: whole)
    ffn_pieces: int                      # ... into this many pieces of a micro step
    offload: int                         # blocks whose frozen weights stream from CPU memory
    host_limit: int | None               # OFFLOAD_BLOCKS=auto: the most the CPU memory holds (None: unknown)
    emb_on_cpu: bool                     # the frozen embedding stays in CPU memory
    deep_embed_on_cpu: bool              # ... and so do an RWKV-7a model's frozen DeepEmbed tables (ffn.s_emb)
    stream_quant: bool                   # QUANT: weights go from the file into the GPU one at a time, quantised
    batch: tuple[int, int]               # (B, T) of one forward call: MICRO_BSZ × CTX_LEN (infctx: CHUNK_CTX)
    world: int                           # processes (GPU_COUNT × NODES)
    ds_stage: int                        # DeepSpeed's ZeRO stage (0: no DeepSpeed)
    ds_offload: bool                     # its _offload variant
    grow_segments: bool                  # the allocator grows segments in place (the estimate's slack)
    free: float | None                   # the GPU's free memory the plan was made for (None: not looked)
    estimate: Any = None                 # memory.Estimate of this plan (a CPU run: of the nominal GPU's plan)
    estimate_error: str | None = None    # why there is none (a bug of ours must not stop training)

    @property
    def device(self) -> torch.device:
        return torch.device(self.machine.device)

    @property
    def checkpointing(self) -> bool:
        return self.grad_cp != "0"

    @property
    def offload_blocks(self) -> list[int]:
        from .offload import choose_blocks
        return choose_blocks(self.sizes.n_layer, self.offload)

    @property
    def execution(self):
        """The model's execution options (model.Execution) for this plan."""
        from .model import Execution
        return Execution(op=self.op, grad_cp=self.checkpointing, plain_top=self.plain_top,
                         keep_products=self.keep_products, ffn_piece_tokens=self.ffn_piece_tokens,
                         act_dtype=self.act_dtype, l2wrap=bool(self.cfg.L2WRAP))

    def autocast(self):
        """The autocast context of the run's precision (mixed: frozen bf16/fp16 weights, fp32 trained ones)."""
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.fabric_precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def keeps_products(self) -> bool:
        """Whether blocks can keep their matrix products (model.keep_products): compiled blocks with the op
        traced into their graph (our Triton op), in a method family whose cost was measured (memory.KP_SAVED),
        and not replayed as CUDA graphs (that combination has not passed its GPU test yet)."""
        return (self.compiled and self.op == "triton" and self.method.ACT_FAMILY in memory.KP_SAVED
                and not self.cudagraphs)

    def but(self, **changes: Any) -> "RunPlan":
        """This plan with ``changes`` (checkpoint tiers clamped to what can be), estimated again."""
        from .offload import why_not
        p = dataclasses.replace(self, **changes)
        L = p.sizes.n_layer
        p = dataclasses.replace(p, offload=0 if why_not(p.cfg) else min(max(int(p.offload), 0), L - 1))
        on = p.checkpointing and not p.offload
        plain = min(max(int(p.plain_top), 0), L) if on else 0
        kp = min(max(int(p.keep_products), 0), L - plain) if on and p.keeps_products() else 0
        p = dataclasses.replace(p, plain_top=plain, keep_products=kp)
        if p.machine.type != "cuda":         # a CPU run's estimate is the nominal GPU's (resolve): unchanged
            return p
        return dataclasses.replace(p, estimate=memory.estimate(p, p.sizes), estimate_error=None)

    def tiers(self) -> str:
        """GRAD_CP's plan in words."""
        L, p, m = self.sizes.n_layer, self.plain_top, self.keep_products
        if not self.checkpointing:
            return "no block checkpointed (GRAD_CP=0)"
        said = f"{L - p} of {L} blocks checkpointed"
        if p:
            said += (", the top block keeps its activations" if p == 1 else
                     f", the top {p} keep their activations") + " (no recompute: faster)"
        if m:
            said += f"; {m} of those keep{'s' if m == 1 else ''} their matrix products (only the rest is recomputed)"
        return said

    def describe(self) -> list[str]:
        """Every decision, one line each (the dry run and the web page show these)."""
        off = ", ".join(map(str, self.offload_blocks)) or "none"
        return [f"device {self.device} ({self.machine.name}), precision {self.precision} (Lightning "
                f"{self.fabric_precision}), WKV op '{self.op}'",
                f"compiled: {'yes' if self.compiled else 'no'}"
                + (", replayed as CUDA graphs" if self.cudagraphs else "")
                + (f" ({self.compile_note})" if self.compile_note and not self.compiled else ""),
                f"gradient checkpointing: {self.tiers()}; FFN in {self.ffn_pieces} piece(s)",
                f"blocks streaming their frozen weights from CPU memory: {off}; embedding in "
                f"{'CPU' if self.emb_on_cpu else 'GPU'} memory"
                + (f"; DeepEmbed tables (ffn.s_emb) in {'CPU' if self.deep_embed_on_cpu else 'GPU'} memory"
                   if getattr(self.sizes, "deep_embed", 0) else "")
                + ("; quantised weights loaded from the file one at a time" if self.stream_quant else ""),
                f"{self.world} process(es)" + (f", DeepSpeed ZeRO stage {self.ds_stage}"
                                              + (" with CPU offload" if self.ds_offload else "") if self.ds_stage else "")]


def _search_tiers(plan: RunPlan) -> RunPlan:
    """GRAD_CP=auto: among the plans that fit in FIT_FRACTION of the free memory, the fastest by a rough rule:
    p top blocks not checkpointed (no recompute) and m blocks below them that keep their matrix products
    (KP_SPEED of that saving each, for less memory), maximising p + KP_SPEED·m (ties: fewer m). Every block
    checkpointed when nothing more fits, and always with TRAIN_TYPE=infctx or DeepSpeed (their own memory
    plans), with blocks streamed, or GRAD_CP 0/1."""
    budget = FIT_FRACTION * plan.free
    if (plan.grad_cp != "auto" or checkpoints_every_block(plan.cfg) or plan.estimate.total > budget
            or plan.offload):
        return plan
    L = plan.sizes.n_layer

    def fits(p: int, m: int) -> bool:
        return plan.but(plain_top=p, keep_products=m).estimate.total <= budget

    def most(ok, hi: int) -> int:                  # the largest n in 0..hi with ok(n) (ok shrinks with n)
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo
    p_max = most(lambda p: fits(p, 0), L)
    choice, score = (p_max, 0), float(p_max)
    if plan.keeps_products():
        for p in range(p_max + 1):
            m = most(lambda m: fits(p, m), L - p)
            if p + memory.KP_SPEED * m > score + 1e-9:
                choice, score = (p, m), p + memory.KP_SPEED * m
    return plan.but(plain_top=choice[0], keep_products=choice[1])


def checkpoints_every_block(cfg: Any) -> bool:
    """infctx and DeepSpeed keep their own memory plans: GRAD_CP=auto checkpoints every block there."""
    return cfg.TRAIN_TYPE == "infctx" or cfg.STRATEGY.startswith("deepspeed")


def _search_offload(plan: RunPlan) -> RunPlan:
    """OFFLOAD_BLOCKS=auto: where the plan does not fit in FIT_FRACTION of the free memory, the fewest streamed
    blocks (3 or more: two slots stay on the GPU) that fit, else the most there can be (every block but block 0,
    and no more than the CPU memory holds). The plan itself otherwise, and where the settings cannot stream."""
    from .offload import why_not
    L = plan.sizes.n_layer
    most = L - 1 if plan.host_limit is None else min(L - 1, plan.host_limit)
    budget = FIT_FRACTION * plan.free
    if plan.cfg.OFFLOAD_BLOCKS != "auto" or plan.estimate.total <= budget or why_not(plan.cfg) or most < 3:
        return plan
    for k in range(3, most + 1):
        planned = plan.but(offload=k, plain_top=0, keep_products=0)
        if planned.estimate.total <= budget:
            return planned
    return planned


def resolve(cfg: Any, sizes: Any, machine: Machine, *, op: str | None = None,
            tiers: tuple[int, int] | None = None) -> RunPlan:
    """Every decision of the run ``cfg`` on a model of ``sizes`` on ``machine``: refused here (UserError, with
    the fix) where the machine cannot run the settings. ``op``: the WKV op to plan with instead of OP's choice,
    ``tiers``: GRAD_CP's (plain_top, keep_products) instead of its search (a measured row, the benchmark's forced
    plans). On a GPU whose free memory is known the auto searches run (GRAD_CP=auto, then OFFLOAD_BLOCKS=auto),
    and CUDA graphs are left out where the plan is close to the limit."""
    from .model import ffn_pieces
    from .peft import get_method
    from .strategy import deepspeed_stage, is_offload
    cls = get_method(cfg.FINETUNE_MODE)
    method = cls(cls.settings_from(cfg))
    fabric_precision, weight_dtype = precision_of(cfg, machine)
    cuda = machine.type == "cuda"
    op = op or _op(cfg, machine, sizes.version)
    compiled, compile_note = compile_choice(cfg, machine)
    precision = precision_name(cfg, machine)
    B = cfg.MICRO_BSZ
    T = min(cfg.CHUNK_CTX, cfg.CTX_LEN) if cfg.TRAIN_TYPE == "infctx" else cfg.CTX_LEN
    checkpointing = cfg.GRAD_CP != "0"
    offload = _offload_number(cfg, sizes, machine, precision) if cuda or machine.probed else 0
    plan = RunPlan(
        cfg=cfg, sizes=sizes, machine=machine, method=method, precision=precision,
        fabric_precision=fabric_precision, weight_dtype=weight_dtype, act_dtype=activation_dtype(fabric_precision),
        op=op, compiled=compiled, compile_note=compile_note,
        cudagraphs=compiled and use_cudagraphs(cfg, machine, sizes.n_embd, method), graphs_note=None,
        grad_cp=cfg.GRAD_CP, plain_top=0, keep_products=0,
        ffn_piece_tokens=FFN_PIECE_TOKENS if checkpointing else 0,
        ffn_pieces=ffn_pieces(B * T, FFN_PIECE_TOKENS if checkpointing else 0),
        offload=offload, host_limit=None, emb_on_cpu=cuda and embedding_on_cpu(cfg, method),
        deep_embed_on_cpu=cuda and deep_embed_on_cpu(cfg, sizes),
        stream_quant=cfg.QUANT != "none" and cuda and not method.NEEDS_BASE_ON_GPU, batch=(B, T),
        world=cfg.GPU_COUNT * cfg.NODES, ds_stage=deepspeed_stage(cfg.STRATEGY) or 0,
        ds_offload=is_offload(cfg.STRATEGY), grow_segments=machine.grow_segments, free=machine.free)
    if not cuda:      # a CPU run: its estimate says what these settings would need on a GPU
        gpu = resolve(cfg, sizes, dataclasses.replace(Machine.nominal(), grow_segments=machine.grow_segments),
                      op=None if machine.probed else op, tiers=tiers)
        return dataclasses.replace(plan, estimate=gpu.estimate, estimate_error=gpu.estimate_error)
    try:
        plan = plan.but(plain_top=tiers[0], keep_products=tiers[1]) if tiers else plan.but()
        if plan.free is not None:
            if not tiers:
                plan = _search_tiers(plan)
            if cfg.OFFLOAD_BLOCKS == "auto":
                plan = _search_offload(dataclasses.replace(plan, host_limit=offload_host_limit(
                    cfg, sizes, precision, machine.host)))
    except UserError:
        raise
    except Exception as err:                      # a bug of ours must not stop training: the plan without it
        return dataclasses.replace(plan, estimate=None, estimate_error=f"{type(err).__name__}: {err}")
    if plan.cudagraphs and plan.estimate.tight():
        plan = plan.but(cudagraphs=False, graphs_note=(
            "note: not replaying the blocks as CUDA graphs (faster small steps, about 0.2 GiB more): memory is "
            "close to the limit"))
    elif plan.cudagraphs:
        plan = dataclasses.replace(plan, graphs_note="COMPILE: the blocks' training steps replay as CUDA graphs "
                                   "(small steps: the CPU no longer bounds them)")
    return plan


def nominal(cfg: Any, sizes: Any, *, op: str | None = None, tiers: tuple[int, int] | None = None,
            **fixed: Any) -> RunPlan:
    """The plan on the nominal GPU (Machine.nominal: what these settings would need on a GPU), with ``fixed``
    plan fields as a measured row ran them (emb_on_cpu, ffn_pieces, offload, ...): calibration, tests."""
    plan = resolve(cfg, sizes, Machine.nominal(), op=op, tiers=tiers)
    return plan.but(**fixed) if fixed else plan
