"""The training loop: one validated TrainConfig in, checkpoints in OUTPUT out.

    prep = prepare(cfg)     # checks, the run's plan (trainer/plan.py), the model as the plan places it, the data
    train(cfg)              # _setup, then _micro_step for each micro-batch (_commit_step at an optimizer step,
                            # _redo_checkpointing_every_block after an out-of-memory error GRAD_CP=auto caused),
                            # _end_of_epoch, and _save_interrupted on Ctrl+C or out of GPU memory

Built on Lightning Fabric (Lightning 2.x), which gives devices, precision and several GPUs (DDP and DeepSpeed:
strategy.Spread), while the loop itself stays here, short and explicit, so that resume is exact and Ctrl+C always
saves first. Every decision of how the run executes is the plan's; what it writes to OUTPUT is runfiles.py's.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import checkpoint
from . import plan as planning
from .config import TrainConfig
from .errors import UserError, interrupt_deferred
from .plan import RunPlan
from .runfiles import RunFiles
from .schedule import learning_rate

from . import validate
from .validate import EarlyStop, Record, Validation, split_data

from .strategy import ADAM_BETAS, ADAM_EPS, GRAD_CLIP, Spread, leave_group, together  # noqa: F401  (re-exported)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)     # one per optimizer step, this run only
    saved: list[Path] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False       # EARLY_STOP ended the run (saved as on Ctrl+C)
    valid_losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, loss), this run only
    global_step: int = 0


# --------------------------------------------------------------------------- set-up
@dataclass
class Prepared:
    cfg: TrainConfig
    plan: RunPlan                     # how this run executes (trainer/plan.py): every decision, and its estimate
    model: torch.nn.Module
    method: object
    dataset: object
    base_meta: dict
    valid: object = None              # the validation items (validate.split_data), or None
    resume: dict | None = None        # RESUME=1: the saved unit it continues (resume.load), checked
    data_identity: dict | None = None  # what a resume checks the data against (resume.data_identity)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def precision(self) -> str:       # Lightning's precision string
        return self.plan.fabric_precision

    @property
    def op(self) -> str:
        return self.plan.op

    @property
    def estimate(self):               # memory.Estimate of the plan (None: unavailable)
        return self.plan.estimate


def prepare(cfg: TrainConfig, log: Callable[[str], None] = print, device: torch.device | None = None,
            rank: int = 0) -> Prepared:
    """Everything before the first step: checks, the plan, model, method, data (rank's share). Used by the dry run."""
    from . import init_adapter, resume
    from .advice import report
    from .deepembed import rank_note
    from .quant import check_quant

    cfg.check_files()
    torch.manual_seed(cfg.SEED)          # adapter init (LoRA A, PiSSA's random SVD) follows SEED
    machine = planning.Machine.probe(planning.device_for(cfg) if device is None else device)
    planning.precision_of(cfg, machine)  # refused here, before anything is read, where the machine cannot
    note = planning.precision_note(cfg, machine)
    if note:
        log(note)
    check_quant(cfg.QUANT, cfg.FINETUNE_MODE, machine.device)
    sizes, zero, base_meta = _read_base(cfg)
    for line in filter(None, [rank_note(sizes.deep_embed, cfg.model_path)]):   # a 7a rank the rwkv package lacks
        log(f"note: {line}")
    data_id = resume.data_identity(cfg.data_prefix)
    state = resume.load(cfg, base_meta, data_id, log)     # RESUME=1: the saved unit, checked (else None)
    init = init_adapter.load(cfg, base_meta, log)        # INIT_ADAPTER: its tensors, checked (else None)
    plan = planning.resolve(cfg, sizes, machine)         # every decision; refused with the fix where it cannot run
    for line in report(plan):           # the estimate and the auto searches' choices; warns with fixes, never stops
        log(line)
    model, method = _build(cfg, plan, zero, log, init)
    _compile(plan, model, log)
    train_data, valid = split_data(cfg)     # VALID_FRACTION: the held-out items leave the training data
    dataset = _dataset(cfg, model, rank, train_data)
    return Prepared(cfg, plan, model, method, dataset, base_meta, valid, state, data_id)


def _build(cfg: TrainConfig, plan: RunPlan, zero: set, log: Callable[[str], None], init=None) -> tuple:
    """The model as the plan places it (what stays in CPU memory, what is quantised or streamed), the method
    applied, trained tensors in fp32 (``init``: INIT_ADAPTER's in place of fresh ones), its execution options handed
    over."""
    from . import init_adapter, offload, tables
    from .quant import is_quantised_key, quantize_model
    device, stream, on_cpu = plan.device, plan.stream_quant, (plan.emb_on_cpu, plan.deep_embed_on_cpu)
    # QLoRA on a GPU: the weights to be quantised stay in the file (mmap) until quantize_model puts each,
    # quantised, on the GPU; so the whole model is never there in bf16. OFFLOAD_BLOCKS: those blocks stay in CPU
    # memory from the file on; offload.setup puts the rest of them on the GPU and their frozen matrices in pinned
    # memory. The frozen embedding and DeepEmbed tables stay in CPU memory on one GPU (tables.py): never on it.
    off_prefixes = tuple(f"blocks.{b}." for b in plan.offload_blocks)
    keep = None
    if stream or any(on_cpu) or off_prefixes:
        keep = lambda k: ((stream and is_quantised_key(k)) or tables.keeps(k, *on_cpu)  # noqa: E731
                          or k.startswith(off_prefixes))      # () when nothing is streamed: False
    model = checkpoint.load_model(cfg.model_path, dtype=plan.weight_dtype, device=device, keep_on_cpu=keep)
    method = plan.method
    if method.NOTE:                          # e.g. that FINETUNE_MODE=miss is Bone under its new name
        log(method.NOTE)
    method.apply(model, train_parts=cfg.TRAIN_PARTS)
    tables.hold_tables(model, *on_cpu, dtype=plan.weight_dtype)    # frozen now; as stored in the file until now
    off = offload.setup(model, plan.offload_blocks, device, dtype=plan.weight_dtype)
    if off is not None:
        log(f"OFFLOAD_BLOCKS: blocks {', '.join(map(str, off.order))} ({len(off.order)} of {plan.sizes.n_layer}) "
            f"stream their frozen weights ({len(off.order) * off.bytes_per_block / 2**30:.2f} GiB) from CPU memory"
            + ("" if off.pinned else " (not page-locked: the copies are slower and do not overlap the compute)"))
    report = quantize_model(model, cfg.QUANT, device=device if stream else None)  # int8 / nf4 base linears
    if report is not None:
        log(report.line())
    if stream:                               # the adapters were made beside the weights, on the CPU
        tables.to_device(model, device)
    for p in model.parameters():             # trained tensors in fp32 (exact optimizer), frozen ones lean
        if p.requires_grad:
            p.data = p.data.float()
    init_adapter.apply(init, method, model, log)     # in fp32 now: its values are not rounded to the weights' dtype
    if model.cfg.version == 7:               # stored in layer 0 but unused there: nothing to train (and DDP
        for name in ("v0", "v1", "v2"):      # refuses parameters that get no gradient)
            getattr(model.blocks[0].att, name).requires_grad_(False)
    for line in method.check_base(model, zero, cfg.model_path.name):   # refuses a base it cannot learn on
        log(line)
    model.set_execution(plan.execution)
    return model, method


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


def _compile(plan: RunPlan, model, log: Callable[[str], None]) -> None:
    """COMPILE: the blocks compiled, replayed as CUDA graphs where the plan says so."""
    if plan.compile_note:
        log(plan.compile_note)
    if not plan.compiled:
        return
    import torch._dynamo as dynamo

    from .device import keep_compiled
    dynamo.config.suppress_errors = True   # a block that fails to compile runs uncompiled, with a warning
    keep_compiled()                        # a warm cache after a reboot too: the first step compiles less
    if plan.graphs_note:
        log(plan.graphs_note)
    model.compile_blocks(cudagraphs=plan.cudagraphs)


def _dataset(cfg: TrainConfig, model, rank: int, data):
    """This process's share of the training items ``data``, the files checked against the model's vocabulary."""
    from .data.binidx import BinIdx
    from .data.dataset import make_dataset
    for prefix in (cfg.data_prefix, cfg.valid_prefix):
        if prefix is None:
            continue
        whole = BinIdx(prefix)
        top = int(whole.tokens.max()) if whole.total_tokens else 0
        if top >= model.cfg.vocab_size:
            raise UserError(f"{prefix}.bin holds token id {top}, but {cfg.model_path.name} has a vocabulary "
                            f"of {model.cfg.vocab_size}.", "tokenize the data for this model's vocabulary "
                            "(make_tokenize.sh uses the RWKV World tokenizer of 65536 ids)")
    return make_dataset(cfg.DATALOAD, data, ctx_len=cfg.CTX_LEN,
                        micro_bsz=cfg.MICRO_BSZ, epoch_steps=cfg.EPOCH_STEPS, seed=cfg.SEED,
                        loss_mask=cfg.LOSS_MASK, world_size=cfg.world_size, rank=rank)


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
    if cfg.NODES > 1:
        log(_machines_line(cfg))
    log("Plan (trainer/plan.py; the web page's memory panel shows the same):")
    for line in prep.plan.describe():
        log(f"  {line}")
    if prep.estimate is not None:
        log("The memory estimate, term by term" + ("" if prep.device.type == "cuda" else
                                                        " (this run is on the CPU: what a GPU would need)") + ":")
        log(prep.estimate.table())
    log(f"Trainable: {train:,} parameters ({100 * train / total:.3f}% of {total:,})")
    if prep.valid is not None:
        log(validate.describe(cfg, prep.valid).capitalize())
    prep.dataset.set_epoch(0)
    tok = get_tokenizer()
    for j in range(min(2, len(prep.dataset))):
        log(f"--- sample {j} (text the loss ignores is marked) ---")
        log(preview(prep.dataset[j], tok))
    log("Dry run only: nothing was trained.")
    return prep


def _machines_line(cfg: TrainConfig) -> str:
    """NODES > 1: this machine's part, or why it could not start (the dry run shows; training refuses)."""
    try:
        env = {**os.environ, **planning.rendezvous(cfg, os.environ)}
    except UserError as err:
        return f"Machines: {cfg.NODES}; training here would stop: {err}"
    return (f"Machines: {cfg.NODES} × {cfg.GPU_COUNT} GPU(s); this one is NODE_RANK={env['NODE_RANK'].strip()}, "
            f"meeting the first at {env['MASTER_ADDR'].strip()}:{env['MASTER_PORT'].strip()}")


# --------------------------------------------------------------------------- loss
def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions where mask is 1."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


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


@dataclass
class _Position:
    """Where the loop is, and what an interrupted run saves: the position after the last optimizer step."""
    epoch: int
    step: int                         # micro steps done in this epoch
    opt_step: int
    micro_step: int
    committed: tuple = ()             # (epoch, step, micro_step, rng) after the last optimizer step
    loss_acc: float = 0.0             # this optimizer step's mean loss so far
    rows: list = field(default_factory=list)      # loss.csv rows not written yet
    group: list = field(default_factory=list)     # this optimizer step's micro-batches (the OOM redo needs them)
    t_last: float = field(default_factory=time.perf_counter)
    tokens: int = 0                   # tokens since t_last
    last_log: float = field(default_factory=time.perf_counter)
    stack_trims: int = 0              # how often a grown thread-stack reserve may still be given back


@dataclass
class _Run:
    """What the loop works with, set up once in ``train``."""
    cfg: TrainConfig
    prep: Prepared
    fabric: object
    spread: Spread
    module: torch.nn.Module           # what runs forward (the model, or infctx's chunked loss around it)
    optimizer: torch.optim.Optimizer
    files: RunFiles
    bar: object
    log: Callable[[str], None]
    progress: bool
    wandb: object
    result: TrainResult
    total_opt_steps: int
    check: Validation | None = None   # the validation pass (VALID_DATA / VALID_FRACTION), or None
    record: Record = field(default_factory=Record)     # the best validation loss so far (EARLY_STOP counts here)
    postfix: dict = field(default_factory=dict)        # what the progress bar shows after the bar

    def forward_backward(self, x, y, m, boundary: bool):
        if self.prep.model.cudagraphs:     # CUDA graphs: this step's replays may reuse the last's memory
            torch.compiler.cudagraph_mark_step_begin()
        loss = self.module(x, targets=y, mask=m)    # the masked mean cross-entropy (head + loss chunked)
        self.spread.backward(self.fabric, self.module, loss, self.cfg.MINI_BSZ, boundary)
        return loss


def _redo_checkpointing_every_block(run: _Run, pos: _Position, batch: tuple, boundary: bool):
    """GRAD_CP=auto planned too many blocks without checkpointing (the estimate is off): the plan with every block
    checkpointed from now on, handed to the model, and this optimizer step's micro-batches done again."""
    prep = run.prep
    run.log(f"GRAD_CP=auto: out of GPU memory with the top {prep.plan.plain_top} blocks not checkpointed and "
            f"{prep.plan.keep_products} keeping their products; checkpointing every block from now on (slower), "
            "and redoing this step")
    prep.plan = prep.plan.but(plain_top=0, keep_products=0)
    prep.model.set_execution(prep.plan.execution)
    _release_gpu_memory(run.optimizer)
    pos.loss_acc = sum(run.forward_backward(*b, False).item() for b in pos.group[:-1]) / run.cfg.MINI_BSZ
    return run.forward_backward(*batch, boundary)


def _commit_step(run: _Run, pos: _Position) -> None:
    """The optimizer step, its counters, the loss row and the position an interrupted run saves, together: a
    Ctrl+C meanwhile waits, so the saved weights always match the saved position."""
    from . import device as gpu
    cfg = run.cfg
    with interrupt_deferred(what="the optimizer step"):
        lr = learning_rate(pos.opt_step, run.total_opt_steps, cfg.LR_INIT, cfg.LR_FINAL, cfg.WARMUP_STEPS,
                           cfg.LR_SCHEDULE)
        for g in run.optimizer.param_groups:      # every group (WEIGHT_DECAY > 0: decayed and not)
            g["lr"] = lr
        run.spread.step(run.fabric, run.module, run.optimizer)
        pos.stack_trims = gpu.trim_grown_stack(run.prep.device, pos.stack_trims)
        pos.opt_step += 1
        now = time.perf_counter()
        tps = pos.tokens / max(now - pos.t_last, 1e-9)
        pos.t_last, pos.tokens = now, 0
        loss = pos.loss_acc
        run.result.losses.append(loss)
        pos.rows.append([pos.opt_step, pos.epoch, f"{loss:.6f}", f"{lr:.3e}", f"{tps:.1f}", ""])
        _show(run, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if run.wandb is not None:
            run.wandb.log({"loss": loss, "lr": lr, "tokens_per_s": tps, "epoch": pos.epoch}, step=pos.opt_step)
        every = max(1, run.total_opt_steps // 20)     # plain log lines when there is no progress bar
        if not run.progress and (pos.opt_step % every == 0 or pos.opt_step in (1, run.total_opt_steps)
                                 or now - pos.last_log > 15):
            pos.last_log = now
            run.log(f"epoch {pos.epoch} step {pos.step + 1}/{cfg.EPOCH_STEPS}  optimizer step {pos.opt_step}/"
                    f"{run.total_opt_steps}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tokens/s")
        pos.loss_acc = 0.0
        pos.group = []
        pos.committed = (pos.epoch, pos.step + 1, pos.micro_step, torch.get_rng_state())
    if run.check is not None and validate.due(cfg, pos.opt_step, run.total_opt_steps,
                                              pos.step + 1 == cfg.EPOCH_STEPS, pos.epoch):
        _validate(run, pos)
    if len(pos.rows) >= 10:
        run.files.append_losses(pos.rows)


def _show(run: _Run, **values: str) -> None:
    """The progress bar's figures: the step's loss, lr and speed, and the last validation loss."""
    if run.result.valid_losses:
        values["valid"] = f"{run.result.valid_losses[-1][1]:.4f}"
    run.postfix = values
    run.bar.set_postfix(values)


def _validate(run: _Run, pos: _Position) -> None:
    """The validation loss after this optimizer step: into its loss.csv row, the log, the progress bar and wandb;
    a new best is saved as rwkv-best.pth; EARLY_STOP validations without one stop the run (saved as on Ctrl+C)."""
    cfg, t0 = run.cfg, time.perf_counter()
    reduce = None
    if run.fabric.world_size > 1:
        reduce = lambda t: run.fabric.all_reduce(t, reduce_op="sum")    # noqa: E731
    loss, tokens = run.check.loss(run.module, run.prep.device, reduce)
    took = time.perf_counter() - t0
    pos.rows[-1][5] = f"{loss:.6f}"
    run.result.valid_losses.append((pos.opt_step, loss))
    _show(run, **run.postfix)
    if run.wandb is not None:
        run.wandb.log({"valid_loss": loss}, step=pos.opt_step)
    best = run.record.add(loss, pos.opt_step)
    if best:
        path = run.files.save_best(epoch=pos.epoch, opt_step=pos.opt_step, valid_loss=loss,
                                   complete=pos.step + 1 == cfg.EPOCH_STEPS, optimizer=run.optimizer)
        how = f"the best so far: saved {path}"
    else:
        how = (f"not better than {run.record.best:.4f} (optimizer step {run.record.best_step}, {validate.BEST})"
               + (f"; {run.record.since} of EARLY_STOP={cfg.EARLY_STOP}" if cfg.EARLY_STOP else ""))
    line = (f"validation after optimizer step {pos.opt_step}: loss {loss:.4f} over {tokens:,} tokens "
            f"({took:.2f} s), {how}")
    (run.bar.write if run.progress else run.log)(line)
    if cfg.EARLY_STOP and run.record.since >= cfg.EARLY_STOP and pos.opt_step < run.total_opt_steps:
        raise EarlyStop               # (after the last step the run ends anyway, with its usual save)


def _micro_step(run: _Run, pos: _Position, warmup_ctx: bool, chunk_multiple: int) -> None:
    """One micro-batch forward and backward; the optimizer step where it completes one."""
    from .infctx import ctx_len_at, cut_batch
    cfg, prep = run.cfg, run.prep
    step = pos.step
    batch = prep.dataset.collate([prep.dataset[j] for j in range(step * cfg.MICRO_BSZ, (step + 1) * cfg.MICRO_BSZ)])
    if warmup_ctx:
        batch = cut_batch(batch, ctx_len_at(pos.opt_step, cfg.INITIAL_CTX_LEN, cfg.CTX_LEN, cfg.CTX_WARMUP_STEPS,
                                            chunk_multiple))
    xym = tuple(batch[k].to(prep.device) for k in ("input_ids", "targets", "mask"))
    boundary = (step + 1) % cfg.MINI_BSZ == 0 or step + 1 == cfg.EPOCH_STEPS
    pos.group.append(xym)
    try:
        loss = run.forward_backward(*xym, boundary)
    except torch.cuda.OutOfMemoryError:
        if not (prep.plan.plain_top or prep.plan.keep_products) or run.fabric.world_size > 1:
            raise
        loss = None       # redone below, after the error (whose frames hold the activations) is gone
    if loss is None:
        loss = _redo_checkpointing_every_block(run, pos, xym, boundary)
    if run.fabric.world_size > 1:      # report the loss of the whole batch, over every GPU
        loss = run.fabric.all_reduce(loss.detach(), reduce_op="mean")
    lv = loss.item()
    if not math.isfinite(lv):
        raise UserError(f"the loss became {lv} at epoch {pos.epoch}, step {step}; nothing was saved for this step.",
                        "lower LR_INIT, use PRECISION=bf16 instead of fp16, or check the data")
    pos.loss_acc += lv / cfg.MINI_BSZ
    pos.micro_step += 1
    pos.tokens += xym[0].numel() * run.fabric.world_size
    if boundary:
        _commit_step(run, pos)


def _end_of_epoch(run: _Run, pos: _Position, main: bool) -> None:
    cfg, files = run.cfg, run.files
    files.append_losses(pos.rows)
    if (pos.epoch + 1) % cfg.EPOCH_SAVE == 0 or pos.epoch + 1 == cfg.EPOCH_COUNT:
        with interrupt_deferred(what="the checkpoint being written"):   # then it stops and saves
            path = files.save(epoch=pos.epoch, step_in_epoch=cfg.EPOCH_STEPS, opt_step=pos.opt_step,
                              micro_step=pos.micro_step, optimizer=run.optimizer, complete=True,
                              valid=run.record.state())
            run.result.saved.append(path)
            if main:
                run.bar.write(f"saved {path}")
        if main:
            files.plot()
            files.sample(pos.epoch, run.bar.write)
        run.fabric.barrier()


def _save_interrupted(run: _Run, pos: _Position, stop: BaseException) -> None:
    """Ctrl+C, or out of GPU memory on one GPU (the settings' fault, not a bug): saved at the last optimizer step,
    then told how to continue (out of memory: with the changes that would fit). A partial gradient accumulation
    is dropped: resume restarts at the last optimizer step."""
    from .advice import out_of_memory
    oom = isinstance(stop, torch.cuda.OutOfMemoryError)
    run.bar.close()
    run.files.append_losses(pos.rows)
    c_epoch, c_step, c_micro, c_rng = pos.committed
    if oom:
        stop.__traceback__ = None       # its frames hold the step's activations
    _release_gpu_memory(run.optimizer)
    with interrupt_deferred(reraise=False):   # another Ctrl+C: this is already the save it asks for
        path = run.files.save(epoch=c_epoch, step_in_epoch=c_step, opt_step=pos.opt_step, micro_step=c_micro,
                              optimizer=run.optimizer, complete=False, rng=c_rng, valid=run.record.state())
    run.files.plot()
    run.result.saved.append(path)
    run.result.interrupted = True
    if oom:
        raise out_of_memory(run.prep.plan, pos.epoch, pos.step, path, c_epoch, c_step) from None
    if isinstance(stop, EarlyStop):
        run.result.stopped_early = True
        r = run.record
        run.log(f"\nEARLY_STOP={run.cfg.EARLY_STOP}: the validation loss has not improved on {r.best:.4f} (optimizer "
                f"step {r.best_step}) for {r.since} validations, so training stops. The best checkpoint is "
                f"{run.files.out / validate.BEST}; the last is {path} (epoch {c_epoch}, step {c_step}; RESUME=1 "
                "would continue it).")
        return
    run.log(f"\nstopped: saved {path} (epoch {c_epoch}, step {c_step}). Continue with RESUME=1.")


def _setup(cfg: TrainConfig, log: Callable[[str], None], progress: bool) -> tuple[_Run, _Position, bool]:
    """Devices and processes, the prepared run, the optimizer (restored on resume), OUTPUT held: the loop's objects."""
    from lightning_fabric import Fabric
    from tqdm import tqdm

    from . import device as gpu
    from .infctx import InfctxLoss

    machine = planning.Machine.probe(planning.device_for(cfg), memory_too=False)
    os.environ.update(planning.rendezvous(cfg, os.environ))     # several machines: where they meet, checked
    precision, _ = planning.precision_of(cfg, machine)
    if machine.type == "cuda":
        torch.set_float32_matmul_precision("high")      # TF32 for the few fp32 matmuls (Hopper/Ampere)
        gpu.configure_allocator(machine.device)         # less memory held in reserve (not on WSL2)
    spread = Spread(cfg)                  # one GPU, DDP or DeepSpeed: where the steps differ
    spread.check_device(torch.device(machine.device))
    fabric = Fabric(accelerator=machine.type, devices=cfg.GPU_COUNT, num_nodes=cfg.NODES,
                    strategy=spread.fabric_strategy(), precision=precision)
    fabric.launch()                       # several GPUs: one process per GPU from here on
    main = fabric.global_rank == 0        # only rank 0 logs and writes files
    if not main:
        log, progress = (lambda *_: None), False
    # every process prepares, or all stop with one line (before the first collective: fabric.setup)
    prep, optimizer = together(fabric, lambda: _prepared(cfg, log, fabric.device, fabric.global_rank, spread),
                               cfg.NODES)
    state = prep.resume
    # what runs forward under Fabric's wrapper (autocast, DDP gradient sync): the model, or for infctx the chunked
    # loss around it (one forward per backward, as DDP needs)
    module = InfctxLoss(prep.model, cfg.CHUNK_CTX) if cfg.TRAIN_TYPE == "infctx" else prep.model
    module, optimizer = fabric.setup(module, optimizer, move_to_device=False)
    spread.attach(fabric)
    pos = _Position(0, 0, 0, 0, stack_trims=gpu.GROWN_STACK_TRIMS)
    if state is not None:
        spread.load_optimizer(optimizer, state, cfg.output_dir)
        torch.set_rng_state(state["rng"])
        pos = _Position(state["epoch"], state["step_in_epoch"], state["opt_step"], state["micro_step"],
                        stack_trims=gpu.GROWN_STACK_TRIMS)
        log(f"resuming from {state['adapter']}: epoch {pos.epoch}, step {pos.step}, optimizer step {pos.opt_step}")
    pos.committed = (pos.epoch, pos.step, pos.micro_step, torch.get_rng_state())
    total_opt_steps = math.ceil(cfg.EPOCH_STEPS / cfg.MINI_BSZ) * cfg.EPOCH_COUNT
    n_train, n_total = count_trainable(prep.model)
    gpus = f" × {fabric.world_size} processes" if fabric.world_size > 1 else ""
    log(f"training {n_train:,} of {n_total:,} parameters on {prep.device}{gpus} ({prep.precision}, op "
        f"'{prep.op}'), {cfg.EPOCH_COUNT} epochs × {cfg.EPOCH_STEPS} steps → {cfg.output_dir}/")
    if prep.op in ("fla", "rwkvfla"):
        log("note: the first steps compile the GPU kernels (Triton, from flash-linear-attention): this takes a "
            "few minutes once, and later runs reuse the compiled kernels.")
    # OUTPUT from here on: held by this run, a killed run's temporaries swept, OVERWRITE's clearing, loss.csv cut
    # back to the resumed step; released when the loop ends. A refusal on the first process stops all of them.
    wandb, files = together(fabric, lambda: (_wandb_run(cfg) if main else None, RunFiles(
        cfg.output_dir, prep, write=main, spread=spread, log=log)), cfg.NODES)
    bar = tqdm(total=cfg.EPOCH_COUNT * cfg.EPOCH_STEPS, initial=pos.epoch * cfg.EPOCH_STEPS + pos.step,
               disable=not progress, unit="step", dynamic_ncols=True)
    run = _Run(cfg, prep, fabric, spread, module, optimizer, files, bar, log, progress, wandb,
               TrainResult(global_step=pos.opt_step), total_opt_steps)
    if prep.valid is not None:
        run.check = Validation(prep.valid, cfg.CTX_LEN, cfg.LOSS_MASK, cfg.MICRO_BSZ, fixed_len=prep.plan.compiled,
                               rank=fabric.global_rank, world=fabric.world_size)
        if state is not None and state["config"].get("VALID_DATA", "") == cfg.VALID_DATA:
            run.record = Record.restored(state.get("valid"))
        log(validate.describe(cfg, prep.valid) + (f"; best so far {run.record.best:.4f} (optimizer step "
                                                    f"{run.record.best_step})" if run.record.best_step >= 0 else ""))
    return run, pos, main


def _prepared(cfg: TrainConfig, log: Callable[[str], None], device: torch.device, rank: int, spread: Spread):
    """One process's prepared run, its saved tensors restored on resume, and the optimizer over its trained tensors."""
    prep = prepare(cfg, log, device=device, rank=rank)
    torch.manual_seed(cfg.SEED + 1 + rank)   # the training stream (dropout), apart from init
    if prep.resume is not None:
        from .resume import restore
        restore(prep, prep.resume)           # the saved tensors, before the optimizer takes the parameters
    trained = [(n, p) for n, p in prep.model.named_parameters() if p.requires_grad]
    return prep, spread.optimizer(spread.groups(trained), cfg.LR_INIT, log)    # WEIGHT_DECAY: matrices only


def train(cfg: TrainConfig, log: Callable[[str], None] = print, max_steps: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train as configured. ``max_steps`` (micro steps, for tests) stops early as if interrupted."""
    run, pos, main = _setup(cfg, log, progress)
    warmup_ctx = cfg.INITIAL_CTX_LEN > 0 and cfg.CTX_WARMUP_STEPS > 0
    chunk_multiple = cfg.CHUNK_CTX if cfg.TRAIN_TYPE == "infctx" else 16
    start_epoch, start_step = pos.epoch, pos.step
    run.module.train()
    try:
        for pos.epoch in range(start_epoch, cfg.EPOCH_COUNT):
            run.prep.dataset.set_epoch(pos.epoch)
            for pos.step in range(start_step if pos.epoch == start_epoch else 0, cfg.EPOCH_STEPS):
                if max_steps is not None and pos.micro_step >= max_steps:
                    raise KeyboardInterrupt
                _micro_step(run, pos, warmup_ctx, chunk_multiple)
                run.bar.update(1)
            _end_of_epoch(run, pos, main)
    except (KeyboardInterrupt, torch.cuda.OutOfMemoryError) as stop:
        # several GPUs out of memory: the others would wait for this one, so it stays an error
        if isinstance(stop, torch.cuda.OutOfMemoryError) and run.fabric.world_size > 1:
            raise
        _save_interrupted(run, pos, stop)
    finally:
        run.bar.close()
        run.files.close()
        if run.wandb is not None:
            run.wandb.finish()
        if run.fabric.world_size > 1:
            leave_group()
    run.result.global_step = pos.opt_step
    return run.result
