"""How a run spreads over devices: one GPU, DDP, or DeepSpeed ZeRO stage 1/2/3 (with CPU offload).

Everything that differs between PyTorch DDP and DeepSpeed lives here, so the loop reads the same for all:

    spread = Spread(cfg)                     # checks what it can before any GPU work
    fabric = Fabric(..., strategy=spread.fabric_strategy())
    optimizer = spread.optimizer(params, lr, log)
    spread.backward(fabric, module, loss, accum, boundary)   # every micro step
    spread.step(fabric, module, optimizer)                   # at the accumulation boundary: clip, step
    with spread.master_weights(model): ...                   # every rank: trained tensors in full fp32
    spread.save_optimizer(...) / spread.load_optimizer(...)  # train_state.pth's optimizer part

DeepSpeed differs from DDP in four ways that matter here:
  - it owns gradient clipping (``gradient_clipping`` in its config; Fabric's clip_gradients refuses) and
    the accumulation boundary (``set_gradient_accumulation_boundary``; there is no no_backward_sync);
  - it runs the model in bf16/fp16 (RWKV-LM's way; it turns autocast off inside its engine) and keeps
    the fp32 master copy of the trained tensors inside its optimizer, partitioned over GPUs (stage 1 and
    up): an adapter is saved from those fp32 masters (``safe_get_full_fp32_param``, a collective call), not from the bf16 working copy;
  - the optimizer state is partitioned, so each GPU writes its own part: DeepSpeed's own checkpoint
    (trained tensors only) in ``OUTPUT/deepspeed/``, named in train_state.pth; resuming needs the same
    number of GPUs;
  - offload keeps the optimizer (and with stage 3 the parameters) in host memory: DeepSpeed's CPU Adam
    when it can be built, else torch's AdamW on the CPU (slower; said so).
The adapter files (``rwkv-N.pth``) are the same single files whatever the strategy.
"""
from __future__ import annotations

import contextlib
import importlib.util
import platform
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import DS_DIR  # noqa: F401  (OUTPUT/deepspeed/<tag>/)
from .errors import UserError

GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8
BNB_MIN_8BIT = 4096                  # OPTIMIZER=adamw8bit: smaller tensors keep fp32 states (bitsandbytes' default)
_DS_PIP = "pip install deepspeed   (on Linux or WSL2, with a CUDA GPU)"


def deepspeed_stage(strategy: str) -> int | None:
    """2 for 'deepspeed_stage_2_offload', None for 'auto'."""
    if not strategy.startswith("deepspeed_stage_"):
        return None
    return int(strategy[len("deepspeed_stage_")])


def is_offload(strategy: str) -> bool:
    return strategy.endswith("_offload")


def running_on_wsl() -> bool:
    return "microsoft" in platform.uname().release.lower()


def strategy_problems(cfg: Any, wsl: bool | None = None) -> list[tuple[str, str]]:
    """(message, fix) for each STRATEGY rule the settings break; the device-independent ones.
    (infctx's own rule on stage 3 lives in trainer/infctx.py beside its code.)"""
    out: list[tuple[str, str]] = []
    s = cfg.STRATEGY
    stage = deepspeed_stage(s)
    eight_bit = cfg.OPTIMIZER == "adamw8bit"
    if eight_bit and cfg.ACCELERATOR == "cpu":
        out.append(("OPTIMIZER=adamw8bit runs bitsandbytes' 8-bit AdamW, which needs an NVIDIA GPU, but "
                    "ACCELERATOR=cpu.", "set OPTIMIZER=adamw to train on the CPU"))
    if stage is None:
        return out
    if eight_bit:
        out.append((f"OPTIMIZER=adamw8bit with STRATEGY={s}: DeepSpeed runs its own optimizer over its "
                    "partitions of the fp32 master weights, not bitsandbytes' 8-bit AdamW.",
                    f"set OPTIMIZER=adamw with STRATEGY={s} (ZeRO already splits the optimizer state over the "
                    "GPUs; _offload keeps it in CPU memory), or STRATEGY=auto with OPTIMIZER=adamw8bit"))
    wsl = running_on_wsl() if wsl is None else wsl
    if cfg.ACCELERATOR == "cpu":
        out.append((f"STRATEGY={s} needs CUDA GPUs, but ACCELERATOR=cpu.",
                    "set STRATEGY=auto to train on the CPU"))
    if is_offload(s) and wsl:
        out.append((f"STRATEGY={s} cannot work under WSL2: DeepSpeed's offload needs large pinned host "
                    "memory, which WSL2 caps (the run is killed or hangs).",
                    f"use STRATEGY=deepspeed_stage_{stage} (no offload), or QUANT=nf4 / GRAD_CP=1 / a lower "
                    "MICRO_BSZ to fit the GPU"))
    if stage == 3 and cfg.QUANT != "none":
        out.append((f"STRATEGY={s} partitions every weight over the GPUs, which cannot hold QUANT={cfg.QUANT}'s "
                    "quantised base weights.", f"use STRATEGY=deepspeed_stage_2 with QUANT={cfg.QUANT}, "
                    "or QUANT=none"))
    return out


def check_strategy(cfg: Any) -> None:
    problems = strategy_problems(cfg)
    if problems:
        raise UserError(*problems[0])


def optimizer_unavailable_reason(device) -> str | None:
    """Why OPTIMIZER=adamw8bit cannot run on ``device``, or None when it can: bitsandbytes' 8-bit AdamW has
    CUDA kernels only (its CPU backend has none for the 8-bit update)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return f"bitsandbytes' 8-bit AdamW needs an NVIDIA GPU, and this run is on '{torch.device(device).type}'"
    from .quant import bitsandbytes_missing
    return bitsandbytes_missing("it")


def deepspeed_reason() -> str | None:
    """None when DeepSpeed can be imported, else what to install."""
    if importlib.util.find_spec("deepspeed") is None:
        return f"DeepSpeed is not installed: {_DS_PIP}"
    return None


def deepspeed_config(cfg: Any) -> dict:
    """The DeepSpeed config for STRATEGY (Fabric adds the bf16/fp16 block from PRECISION)."""
    stage = deepspeed_stage(cfg.STRATEGY)
    assert stage is not None
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": stage >= 2,
                  "allgather_bucket_size": 200_000_000, "reduce_bucket_size": 200_000_000}
    if is_offload(cfg.STRATEGY):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "gradient_clipping": GRAD_CLIP,
        "gradient_accumulation_steps": cfg.MINI_BSZ,
        "train_micro_batch_size_per_gpu": cfg.MICRO_BSZ,
        "zero_allow_untested_optimizer": True,      # torch's AdamW is fine; DeepSpeed only knows its own
        "zero_force_ds_cpu_optimizer": False,       # offload may fall back to torch's AdamW (said so)
        "steps_per_print": 10 ** 12,                # our progress bar and loss.csv report the run
        "wall_clock_breakdown": False,
    }


class Spread:
    """One GPU, DDP, or DeepSpeed: the few places where the training loop differs between them."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.stage = deepspeed_stage(cfg.STRATEGY)
        self.deepspeed = self.stage is not None
        self.engine = None                  # DeepSpeed's engine, once Fabric has set it up
        self.fabric = None

    def attach(self, fabric) -> None:
        """After ``fabric.setup``: keep DeepSpeed's engine (it owns the boundary and the checkpoints)."""
        self.fabric = fabric
        if self.deepspeed:
            self.engine = fabric.strategy.model

    def agree(self, value: str) -> str:
        """The first process's ``value`` on every process (one GPU: ``value``)."""
        if self.fabric is None or self.fabric.world_size == 1:
            return value
        return self.fabric.broadcast(value, src=0)

    # ------------------------------------------------------------------ setup
    def check_device(self, device: torch.device) -> None:
        """Before Fabric starts: the rules that need to know the machine (the others ran when the config
        was validated)."""
        if self.cfg.OPTIMIZER == "adamw8bit":
            why = optimizer_unavailable_reason(device)
            if why:
                said, _, fix = why.partition("; ")
                raise UserError(f"OPTIMIZER=adamw8bit: {said}.",
                                fix or "train on a machine with an NVIDIA GPU, or set OPTIMIZER=adamw")
        if not self.deepspeed:
            return
        if device.type != "cuda":
            raise UserError(f"STRATEGY={self.cfg.STRATEGY} needs CUDA GPUs, and this run is on '{device.type}'.",
                            "set STRATEGY=auto (one GPU, or DDP on several)")
        reason = deepspeed_reason()
        if reason:
            raise UserError(f"STRATEGY={self.cfg.STRATEGY}: {reason}.",
                            "install it, or set STRATEGY=auto (PyTorch DDP needs nothing more)")

    def fabric_strategy(self):
        if self.deepspeed:
            from lightning_fabric.strategies import DeepSpeedStrategy
            return DeepSpeedStrategy(config=deepspeed_config(self.cfg))
        if self.cfg.world_size == 1:
            return "auto"
        from lightning_fabric.strategies import DDPStrategy
        return DDPStrategy()

    def optimizer(self, params: list, lr: float, log: Callable[[str], None]) -> torch.optim.Optimizer:
        if self.deepspeed and is_offload(self.cfg.STRATEGY):
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                return DeepSpeedCPUAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                                        adamw_mode=True)
            except Exception as exc:       # its C++ op is built on first use; no compiler, no op
                log(f"note: DeepSpeed's CPU Adam could not be built here ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); the offloaded optimizer runs "
                    "torch's AdamW on the CPU instead, which is slower.")
        if self.cfg.OPTIMIZER == "adamw8bit":
            # bitsandbytes' blockwise 8-bit AdamW: exp_avg and exp_avg_sq as 1-byte codes with an fp32 scale
            # per 256 (2.03 bytes per trained number against 8); tensors under 4096 numbers keep fp32 states.
            # The trained tensors themselves and their gradients stay fp32: only the states are rounded.
            return adamw8bit(params, lr)
        # On a GPU (DeepSpeed aside: its engine wraps the optimizer) the fused AdamW: one kernel for all the
        # trained tensors instead of foreach's dozen per group, and no sqrt(exp_avg_sq) buffer the size of
        # the trained tensors at the step (memory.py's ``step`` term is 0 for it). A state saved by the
        # foreach one (RESUME=1 from an older run) loads and keeps stepping as it was saved.
        fused = not self.deepspeed and bool(params) and all(p.is_cuda for p in _tensors(params))
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                                 **({"fused": True} if fused else {}))

    # ------------------------------------------------------------------ steps
    def backward(self, fabric, module, loss: torch.Tensor, accum: int, boundary: bool) -> None:
        """One micro step's backward; gradients are synchronised only at the boundary."""
        if self.deepspeed:
            self.engine.set_gradient_accumulation_boundary(boundary)
            fabric.backward(loss / accum, scale_wrt_gas=False)
            return
        with fabric.no_backward_sync(module, enabled=not boundary):
            fabric.backward(loss / accum)

    def step(self, fabric, module, optimizer) -> None:
        if not self.deepspeed:              # DeepSpeed clips inside its step (gradient_clipping)
            fabric.clip_gradients(module, optimizer, max_norm=GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ saving
    @contextlib.contextmanager
    def master_weights(self, model: torch.nn.Module):
        """Inside: every trained parameter holds its full fp32 value (DeepSpeed's master copy, gathered
        from its partitions). Call it on every rank: gathering is collective."""
        if not self.deepspeed:
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param
        swapped = []
        try:
            for p in model.parameters():
                if p.requires_grad:
                    full = safe_get_full_fp32_param(p)
                    if full is not None:
                        swapped.append((p, p.data))
                        p.data = full.detach().view(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            yield
        finally:
            for p, data in swapped:
                p.data = data

    def save_optimizer(self, optimizer, out: Path, tag: str, write: bool) -> dict:
        """What train_state.pth holds of the optimizer. DeepSpeed: every rank writes its partition under
        OUTPUT/deepspeed/<tag>/ first (collective), and train_state.pth names the tag."""
        if not self.deepspeed:
            return {"optimizer": optimizer.state_dict() if write else None}
        ds_dir = out / DS_DIR
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)
        folder = ds_dir / tag     # what this rank sees of it, so that a resume can tell it is all there
        seen = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()} \
            if write and folder.is_dir() else {}
        return {"optimizer": None, "deepspeed_tag": tag, "world_size": self.cfg.world_size, "deepspeed_files": seen}

    def forget_old(self, out: Path, keep: str) -> None:
        """After train_state.pth names ``keep``: remove older DeepSpeed tags (rank 0)."""
        ds_dir = out / DS_DIR
        if not self.deepspeed or not ds_dir.is_dir():
            return
        for d in ds_dir.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)

    def load_optimizer(self, optimizer, state: dict, out: Path) -> None:
        tag = state.get("deepspeed_tag")
        if not self.deepspeed:
            if state.get("optimizer") is None:
                raise UserError(f"RESUME=1: the saved run in {out}/ used DeepSpeed, this one STRATEGY="
                                f"{self.cfg.STRATEGY}.", "resume with the STRATEGY and GPU_COUNT of that run")
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError):
                raise UserError(f"RESUME=1: the optimizer state in {out}/train_state.pth does not fit this run's "
                                "trained tensors (damaged, or saved by another set-up).",
                                "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)") from None
            return
        if tag is None:
            raise UserError(f"RESUME=1: the saved run in {out}/ did not use DeepSpeed, this one STRATEGY="
                            f"{self.cfg.STRATEGY}.", "resume with the STRATEGY of that run")
        if state.get("world_size") != self.cfg.world_size:
            raise UserError(f"RESUME=1: the saved DeepSpeed run was spread over {state.get('world_size')} GPUs, "
                            f"this one over {self.cfg.world_size}; its optimizer state is split per GPU.",
                            f"resume with GPU_COUNT × NODES = {state.get('world_size')}")
        if not (out / DS_DIR / tag).is_dir():
            raise UserError(f"RESUME=1: {out / DS_DIR / tag}/ (the optimizer state train_state.pth names) is "
                            "missing.", "set RESUME=0 to start a new run")
        load_path, _ = self.engine.load_checkpoint(str(out / DS_DIR), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"RESUME=1: DeepSpeed could not read {out / DS_DIR / tag}/.",
                            "set RESUME=0 to start a new run")


def adamw8bit(params: list, lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit with the trainer's betas and eps, stepping without a synchronisation per tensor.

    Its ``step`` waits for the GPU after every tensor's update (``sync_gpu``), which its paged optimizers need
    and this one (not paged: every kernel is ordered on the stream, nothing is read back) does not: with
    LoRA's ~440 tensors at 1.5B that wait cost 28 ms a step (7,094 against 8,826 tok/s at ctx 1024 × 1 on an
    H100, bench/RESULTS.md session 14). The step below calls bitsandbytes' own per-tensor update, the same
    kernels, without it."""
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged or not all(hasattr(self, n) for n in ("initialized", "check_overrides", "to_gpu",
                                                                    "init_state", "update_step")):
                return super().step(closure)           # paged, or a bitsandbytes that changed: its own step
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, min_8bit_size=BNB_MIN_8BIT)


def _tensors(params: list):
    """The tensors of an optimizer's ``params`` argument: tensors, or parameter groups (dicts)."""
    for p in params:
        if isinstance(p, dict):
            yield from p["params"]
        else:
            yield p
