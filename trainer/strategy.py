"""How a run spreads over devices: one GPU, DDP, or DeepSpeed ZeRO stage 1/2/3 (with CPU offload).

Everything that differs between PyTorch DDP and DeepSpeed lives here, so the loop reads the same for all:

    spread = Spread(cfg)                     # checks what it can before any GPU work
    fabric = Fabric(..., strategy=spread.fabric_strategy())
    optimizer = spread.optimizer(spread.groups(named_trained), lr, log)   # WEIGHT_DECAY on the matrices only
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

AdamW's settings (BETA1, BETA2, ADAM_EPS, WEIGHT_DECAY) reach every optimizer the same way: as the arguments and
parameter groups of the optimizer object built here (torch's AdamW, bitsandbytes' AdamW8bit, DeepSpeed's CPU
Adam), which Fabric hands to DeepSpeed as its client optimizer. DeepSpeed's config therefore has no
``optimizer`` block (DeepSpeed would build a second optimizer from it). Weight decay applies to the matrices
only (``decays``): WEIGHT_DECAY=0 gives one group of all the trained tensors, as before the setting existed;
above 0, two (decayed, not decayed). A resume lays the saved state out in this run's groups (``relaid``) and
puts this run's settings on them: a loaded state brings the saved run's.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .checkpoint import DS_DIR  # noqa: F401  (OUTPUT/deepspeed/<tag>/)
from .errors import UserError

GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.99)             # the defaults of BETA1, BETA2 and ADAM_EPS (TrainConfig; bench/ uses them)
ADAM_EPS = 1e-8
ADAPTER_MATRICES = ("lora_A", "lora_B", "disha")     # LoRA's and PiSSA's A and B, DiSHA's (Bone, Bat) blocks
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


def optimizer_problems(cfg: Any) -> list[tuple[str, str]]:
    """(message, fix) for each of AdamW's settings out of its range: WEIGHT_DECAY >= 0, 0 <= BETA1, BETA2 < 1,
    ADAM_EPS > 0, all finite."""
    out: list[tuple[str, str]] = []
    wd, eps = cfg.WEIGHT_DECAY, cfg.ADAM_EPS
    if not (math.isfinite(wd) and wd >= 0):
        out.append((f"WEIGHT_DECAY={wd} must be a number, 0 or more.", "use 0 (off) or a small value such as 0.01"))
    for name in ("BETA1", "BETA2"):
        b = getattr(cfg, name)
        if not (math.isfinite(b) and 0 <= b < 1):
            out.append((f"{name}={b} must be at least 0 and below 1.", "the usual values are BETA1=0.9 BETA2=0.99"))
    if not (math.isfinite(eps) and eps > 0):
        out.append((f"ADAM_EPS={eps} must be a number more than 0.", "the usual value is ADAM_EPS=1e-8"))
    return out


def check_optimizer(cfg: Any) -> None:
    problems = optimizer_problems(cfg)
    if problems:
        raise UserError(*problems[0])


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether WEIGHT_DECAY applies to the trained tensor ``name`` (as ``model.named_parameters`` names it), ``p``.

    Decayed: matrices, i.e. a tensor with at least two dimensions longer than 1 that is a layer's ``.weight``
    (the embedding, the head, the linear layers full fine-tuning trains) or an adapter's matrix (ADAPTER_MATRICES:
    LoRA's and PiSSA's lora_A and lora_B, DiSHA's ``disha``, Bone's [r, out] and Bat's [in/r, r, r] blocks).
    Never decayed: norms and biases (1-D); the time-mix parameters (x_*, w0, time_maa_*, ...: [C] or [1, 1, C]),
    with RWKV-7's low-rank w1/w2/a1/... and r_k and RWKV-5/6's time_decay/time_faaaa, which are not named
    ``.weight`` (RWKV-LM's rule too: it decays 2-D ``.weight`` tensors only); state tuning's time_state [H, N, N],
    by name (pulling the learnt state towards zero is not what decay is for)."""
    if "time_state" in name or sum(1 for n in p.shape if n > 1) < 2:
        return False
    last = name.rsplit(".", 1)[-1]
    return last == "weight" or last in ADAPTER_MATRICES


def relaid(saved: dict, old: list[list[int]], new: list[list[int]]) -> dict:
    """The optimizer state ``saved`` (a state_dict) of tensors grouped as ``old``, laid out in the groups ``new``
    instead (each group: the tensors' places in the model's order of the trained tensors). Each tensor keeps its
    state; every new group starts from the first saved group's settings (the caller sets this run's after
    loading). Unchanged where the groups are the same or the counts do not match (loading then refuses it)."""
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    in_order = [m for g in old for m in g]
    if old == new or len(saved_ids) != len(in_order) or sorted(in_order) != sorted(m for g in new for m in g):
        return saved
    saved_id = dict(zip(in_order, saved_ids))
    state, groups, k = {}, [], 0
    for g in new:
        ids = list(range(k, k + len(g)))
        state.update({i: saved["state"][saved_id[m]] for i, m in zip(ids, g) if saved_id[m] in saved["state"]})
        groups.append({**saved["param_groups"][0], "params": ids})
        k += len(g)
    return {"state": state, "param_groups": groups}


def deepspeed_regroup_refusal(saved: Mapping[str, str], cfg: Any) -> str | None:
    """RESUME=1 under DeepSpeed with WEIGHT_DECAY moved between 0 and above 0: the trained tensors would go from
    one optimizer group to two (or back), which DeepSpeed's split optimizer state cannot follow. The line
    resume refuses with, or None."""
    if deepspeed_stage(cfg.STRATEGY) is None:
        return None
    try:
        old = float(saved["WEIGHT_DECAY"])
    except (KeyError, ValueError):
        return None
    if (old > 0) == (cfg.WEIGHT_DECAY > 0):
        return None
    return (f"WEIGHT_DECAY {saved['WEIGHT_DECAY']} → {cfg.WEIGHT_DECAY} (with DeepSpeed only between two values "
            "above 0: its split optimizer state keeps the saved run's grouping of the tensors)")


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


def leave_group() -> None:
    """Leave torch.distributed's process group where there is one (several processes), as the run ends: else its
    threads may die with the interpreter ("terminate called without an active exception" after the run's last
    line, an abort instead of the exit code)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def together(fabric, work: Callable[[], Any], machines: int = 1) -> Any:
    """``work()`` on every process, and a UserError in any of them stops all of them with one line: no process goes
    on into a collective that another has left (where it would wait forever, or fail with a traceback). The first
    process shows its own error, or else the first failing process's; on several machines, a machine's first
    failing process shows its own too (the terminal there). Call it where every process has made the same
    collective calls so far (its all-gather must meet the others': not inside work that only some processes do)."""
    try:
        result, failure = work(), None
    except UserError as err:
        result, failure = None, err
    if fabric.world_size == 1:
        if failure is not None:
            raise failure
        return result
    import torch.distributed as dist
    told: list = [None] * fabric.world_size
    dist.all_gather_object(told, None if failure is None else (failure.message, failure.fix))
    failed = [r for r, t in enumerate(told) if t is not None]
    if not failed:
        return result
    leave_group()                # every process stops here
    rank, per_machine = fabric.global_rank, fabric.world_size // machines
    first_here = next((r for r in failed if r // per_machine == rank // per_machine), None)
    if failure is not None and (rank == 0 or (machines > 1 and rank == first_here)):
        raise failure
    if rank == 0:
        where = f"process {failed[0]}" + (f" (on the machine with NODE_RANK={failed[0] // per_machine})"
                                          if machines > 1 else "")
        raise UserError(f"{where}: {told[failed[0]][0]}", told[failed[0]][1])
    raise SystemExit(2)          # its line is shown by the first process


class Spread:
    """One GPU, DDP, or DeepSpeed: the few places where the training loop differs between them."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.stage = deepspeed_stage(cfg.STRATEGY)
        self.deepspeed = self.stage is not None
        self.engine = None                  # DeepSpeed's engine, once Fabric has set it up
        self.fabric = None
        self.split: list[list[int]] = []    # groups(): the decayed and the other trained tensors (model order)
        self.layout: list[tuple[list[int], float]] | None = None   # groups(): each group's tensors, its decay

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

    def groups(self, named: list[tuple[str, torch.Tensor]]) -> list[dict]:
        """The optimizer's parameter groups of the trained tensors ``named`` (name, tensor; in the model's order):
        WEIGHT_DECAY=0, one group, as before the setting existed; above 0, the tensors that ``decays`` names with
        WEIGHT_DECAY, then the others with 0 (an empty group left out). Kept for ``load_optimizer``."""
        wd = float(self.cfg.WEIGHT_DECAY)
        self.split = [[i for i, (n, p) in enumerate(named) if decays(n, p) == d] for d in (True, False)]
        self.layout = ([(ids, w) for ids, w in zip(self.split, (wd, 0.0)) if ids] if wd > 0
                       else [(list(range(len(named))), 0.0)])
        return [{"params": [named[i][1] for i in ids], "weight_decay": w} for ids, w in self.layout]

    def settings(self) -> dict:
        """AdamW's settings of this run (each group's weight decay: ``groups``)."""
        return {"betas": (float(self.cfg.BETA1), float(self.cfg.BETA2)), "eps": float(self.cfg.ADAM_EPS)}

    def optimizer(self, params: list, lr: float, log: Callable[[str], None]) -> torch.optim.Optimizer:
        """AdamW over ``params`` (tensors, or ``groups``' groups, which carry their weight decay), with BETA1,
        BETA2 and ADAM_EPS: DeepSpeed's CPU Adam when offloading, bitsandbytes' 8-bit one, or torch's."""
        kw = self.settings()
        if self.deepspeed and is_offload(self.cfg.STRATEGY):
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                return DeepSpeedCPUAdam(params, lr=lr, weight_decay=0.0, adamw_mode=True, **kw)
            except Exception as exc:       # its C++ op is built on first use; no compiler, no op
                log(f"note: DeepSpeed's CPU Adam could not be built here ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); the offloaded optimizer runs "
                    "torch's AdamW on the CPU instead, which is slower.")
        if self.cfg.OPTIMIZER == "adamw8bit":
            # bitsandbytes' blockwise 8-bit AdamW: exp_avg and exp_avg_sq as 1-byte codes with an fp32 scale
            # per 256 (2.03 bytes per trained number against 8); tensors under 4096 numbers keep fp32 states.
            # The trained tensors themselves and their gradients stay fp32: only the states are rounded.
            return adamw8bit(params, lr, **kw)
        # On a GPU (DeepSpeed aside: its engine wraps the optimizer) the fused AdamW: one kernel for all the
        # trained tensors instead of foreach's dozen per group, and no sqrt(exp_avg_sq) buffer the size of
        # the trained tensors at the step (memory.py's ``step`` term is 0 for it). A state saved by the
        # foreach one (RESUME=1 from an older run) loads and keeps stepping as it was saved.
        fused = not self.deepspeed and bool(params) and all(p.is_cuda for p in _tensors(params))
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kw, **({"fused": True} if fused else {}))

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
                saved = state["optimizer"]
                if self.layout is not None:      # WEIGHT_DECAY 0 <-> above 0 since then: one group <-> two
                    one = len(saved["param_groups"]) == 1
                    old = [sorted(sum(self.split, []))] if one else [ids for ids in self.split if ids]
                    saved = relaid(saved, old, [ids for ids, _ in self.layout])
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError):
                raise UserError(f"RESUME=1: the optimizer state in {out}/train_state.pth does not fit this run's "
                                "trained tensors (damaged, or saved by another set-up).",
                                "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)") from None
            self.put_settings(optimizer)
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
        self.put_settings(optimizer)

    def put_settings(self, optimizer) -> None:
        """This run's BETA1, BETA2, ADAM_EPS and each group's weight decay on the optimizer's groups: a loaded
        state brings the saved run's, and RESUME=1 may change them (config.RESUME_MAY_CHANGE)."""
        decay = [w for _, w in self.layout] if self.layout is not None else None
        for i, g in enumerate(optimizer.param_groups):
            g.update(self.settings())
            if decay is not None and len(decay) == len(optimizer.param_groups):
                g["weight_decay"] = decay[i]


def adamw8bit(params: list, lr: float, betas: tuple[float, float] = ADAM_BETAS,
              eps: float = ADAM_EPS) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit with the run's betas and eps (``params``' groups carry their weight decay),
    stepping without a synchronisation per tensor.

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

    return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, min_8bit_size=BNB_MIN_8BIT)


def _tensors(params: list):
    """The tensors of an optimizer's ``params`` argument: tensors, or parameter groups (dicts)."""
    for p in params:
        if isinstance(p, dict):
            yield from p["params"]
        else:
            yield p
