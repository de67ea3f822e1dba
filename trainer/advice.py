"""What the trainer tells about memory: the plan's lines before loading (estimate, GRAD_CP=auto's and
OFFLOAD_BLOCKS=auto's choices, a warning with the changes of settings that would fit), and the error of a run that
ran out of GPU memory. A suggestion is a change of settings, resolved again into a plan and estimated.

    for line in report(plan): log(line)
    suggestions(plan, budget)                 # the cheapest changes whose plan fits in ``budget`` bytes
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .memory import FIT_FRACTION, GiB, Estimate
from . import device
from .plan import HOST_FRACTION, RunPlan, checkpoints_every_block, offload_host_limit, resolve

# Rough slowdowns, only to rank the suggestions (cheapest first); a combination costs their product. Where the
# measured ones were measured: bench/RESULTS.md.
COST_COMPILE = 1.0            # COMPILE=0 -> auto: faster (a minute of compiling at the start)
COST_GRAD_CP = 1.3            # the blocks' forward runs twice
COST_GRAD_CP_AUTO = 1.15      # GRAD_CP=0 -> auto: only the blocks that do not fit run their forward twice
COST_HALVE_BATCH = 0.1        # per halving of MICRO_BSZ (smaller products, same samples per step)
COST_NF4 = 1.25               # dequantisation in every forward and backward; slightly less precise weights
COST_INFCTX = 1.35            # each chunk's forward runs once more; + COST_HALVE_CHUNK per halving of the chunk
COST_HALVE_CHUNK = 0.1
COST_OPT8 = 1.15              # OPTIMIZER=adamw8bit: a step per trained tensor (H100: 24 % slower at 1.5B LoRA ctx
                              # 1024 x 1, 3 % at 4096 x 8), rounded states
COST_METHOD = 2.0             # a method that trains the base -> a leaner one: a different method, the last resort
COST_OFFLOAD = 1.1            # OFFLOAD_BLOCKS=N: + COST_OFFLOAD_ALL × N / layers (the copies that do not hide
COST_OFFLOAD_ALL = 0.4        # behind the compute; H100, ctx 1024 x 1: 3B 12 of 32 x1.19, 31 of 32 x1.71)


@dataclass
class Change:
    settings: dict                 # variable -> new value
    why: str                       # its cost, in words
    estimate: Estimate
    cost: float = 1.0              # rough slowdown (COST_*), what the suggestions are ranked by

    def line(self) -> str:
        sets = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{sets}   (~{self.estimate.total / GiB:.1f} GiB; {self.why})"


def _candidates(plan: RunPlan) -> list[tuple[dict, str, float]]:
    """Single changes of settings: (settings, what it costs in words, rough slowdown)."""
    from .offload import why_not
    cfg, sizes = plan.cfg, plan.sizes
    out: list[tuple[dict, str, float]] = []
    if cfg.GRAD_CP == "0":
        if checkpoints_every_block(cfg):         # GRAD_CP=auto would checkpoint every block there too
            out.append(({"GRAD_CP": 1}, "about 30% slower, same results", COST_GRAD_CP))
        else:                                    # the estimate shown is its least (every block checkpointed)
            out.append(({"GRAD_CP": "auto"}, "checkpoints only the blocks that do not fit, and uses the rest "
                         "of the memory for speed; up to 30% slower, same results", COST_GRAD_CP_AUTO))
    B, mini = cfg.MICRO_BSZ, cfg.MINI_BSZ
    for b in sorted((d for d in range(1, B) if B % d == 0), reverse=True):
        out.append(({"MICRO_BSZ": b, "MINI_BSZ": mini * B // b},
                    f"the same {B * mini} samples per optimizer step, slower",
                    1 + COST_HALVE_BATCH * math.log2(B / b)))
    if cfg.COMPILE == "0" and cfg.QUANT == "none":
        out.append(({"COMPILE": "auto"}, "compiled blocks keep fewer activations, and run faster", COST_COMPILE))
    if cfg.OPTIMIZER != "adamw8bit" and cfg.ACCELERATOR != "cpu" and not cfg.STRATEGY.startswith("deepspeed_stage_"):
        out.append(({"OPTIMIZER": "adamw8bit"}, "AdamW's states in 8 bits (bitsandbytes): slower where steps "
                     "are short, slightly rounded updates", COST_OPT8))
    if not plan.method.TRAINS_BASE and cfg.QUANT != "nf4":
        out.append(({"QUANT": "nf4"}, "frozen weights in 4 bits: slower, a little less precise", COST_NF4))
    infctx = cfg.TRAIN_TYPE == "infctx"
    chunk = cfg.CHUNK_CTX if infctx else cfg.CTX_LEN
    if not cfg.STRATEGY.startswith("deepspeed_stage_3"):      # infctx is refused there
        c = 1 << (chunk - 1).bit_length() - 1 if chunk > 1 else 1          # the largest power of 2 below
        while c >= 128:
            out.append(({"TRAIN_TYPE": "infctx", "CHUNK_CTX": c},
                        f"the same CTX_LEN={cfg.CTX_LEN} in chunks of {c}, exact gradient, slower",
                        (1.0 if infctx else COST_INFCTX) + COST_HALVE_CHUNK * math.log2(chunk / c)))
            c //= 2
    L = sizes.n_layer
    if not why_not(cfg) and cfg.OFFLOAD_BLOCKS != "auto":
        host = plan.machine.host if plan.machine.probed else device.host_available()
        most = offload_host_limit(cfg, sizes, plan.precision, host)        # no more than the CPU memory holds
        for k in sorted({min(k, L - 1 if most is None else most) for k in (L // 4, L // 2, L - 1)} - {0, 1, 2}):
            out.append(({"OFFLOAD_BLOCKS": k}, f"{k} of {L} blocks' frozen weights in CPU memory, copied in as "
                         "they run: slower where the copies do not hide behind the compute",
                         COST_OFFLOAD + COST_OFFLOAD_ALL * k / L))
    leaner = plan.method.LEANER
    if leaner:
        from .peft import get_method
        out.append(({"FINETUNE_MODE": leaner}, f"{get_method(leaner).TITLE} trains far fewer numbers than "
                     f"{plan.method.TITLE}", COST_METHOD))
    return out


def _kind(settings: dict) -> frozenset:
    return frozenset("MICRO_BSZ" if k == "MINI_BSZ" else "TRAIN_TYPE" if k == "CHUNK_CTX" else k for k in settings)


def _unsearched(plan: RunPlan, **settings: Any) -> Estimate | None:
    """The estimate of the plan's settings changed by ``settings``, on its machine without the auto searches
    (every block checkpointed, no blocks streamed by auto); None where the machine refuses them."""
    cfg = dataclasses.replace(plan.cfg, **settings)
    try:
        return resolve(cfg, plan.sizes, dataclasses.replace(plan.machine, free=None), op=plan.op).estimate
    except UserError:
        return None


def suggestions(plan: RunPlan, budget: float, limit: int = 3) -> list[Change]:
    """Changes of settings (one to three single changes together) whose estimate fits in ``budget`` bytes,
    cheapest first by the rough COST_* slowdowns; one per kind of change (its cheapest variant that fits), and
    none that adds changes to a cheaper one that already fits."""
    singles = _candidates(plan)
    fitting: list[tuple[float, Change]] = []
    for n in (1, 2, 3):
        for combo in itertools.combinations(singles, n):
            kinds = [_kind(s) for s, _, _ in combo]
            if len(set().union(*kinds)) < sum(len(k) for k in kinds):
                continue                                   # two variants of the same change
            settings = {k: v for s, _, _ in combo for k, v in s.items()}
            est = _unsearched(plan, **settings)
            if est is not None and est.total <= budget:
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


def suggest(plan: RunPlan, free: float) -> list[str]:
    """The cheapest changes that would fit in ``free`` bytes, as training.sh settings with their estimate. Empty
    when the settings already fit; one line saying so when nothing we can suggest fits."""
    est = _unsearched(plan)
    if est.total <= free:
        return []
    found = suggestions(plan, free)
    if found:
        return [c.line() for c in found]
    why = (f" (its peak comes while loading: the whole model in bf16 before quantising, for "
           f"{plan.method.NEEDS_BASE_ON_GPU or 'the set-up'})" if est.peak_at == "loading" and plan.cfg.QUANT != "none"
           else "")
    return [f"none of GRAD_CP=1 (or auto), a smaller MICRO_BSZ, QUANT=nf4, OPTIMIZER=adamw8bit, OFFLOAD_BLOCKS or "
            f"TRAIN_TYPE=infctx fits in {free / GiB:.1f} GiB{why}: use a smaller model, a GPU with more memory, or "
            "several GPUs"]


def report(plan: RunPlan) -> list[str]:
    """The lines the trainer prints before loading: the estimate (a CPU run: what a GPU would need), what the auto
    searches chose, and where it will not fit a warning with the changes that would."""
    est, cfg, L = plan.estimate, plan.cfg, plan.sizes.n_layer
    if est is None:
        return [f"(memory estimate unavailable: {plan.estimate_error})"]
    if plan.machine.type != "cuda":
        return [f"Estimated peak GPU memory for these settings: {est.total / GiB:.1f} GiB (not checked: this run is "
                f"on the {plan.machine.type})"]
    free = plan.free
    if free is None:                  # its free memory was not looked at: nothing to compare with
        return [f"Estimated peak GPU memory: {est.total / GiB:.1f} GiB (the GPU's free memory was not read)"]
    lines = [f"Estimated peak GPU memory: {est.total / GiB:.1f} GiB (GPU has {free / GiB:.1f} GiB free)"]
    if plan.offload and cfg.OFFLOAD_BLOCKS == "auto":
        lines.append(f"OFFLOAD_BLOCKS=auto: {plan.offload} of {L} blocks keep their frozen weights in CPU memory and "
                     "copy them in as they run (it would not fit otherwise; slower where the copies do not hide "
                     "behind the compute)"
                     + (f"; no more: {HOST_FRACTION:.0%} of the CPU memory available holds {plan.host_limit}"
                        if plan.offload == plan.host_limit and est.total > FIT_FRACTION * free else ""))
    if cfg.GRAD_CP == "auto":
        said = "GRAD_CP=auto: " + plan.tiers()
        if not (plan.plain_top or plan.keep_products):
            said += (" (infctx and DeepSpeed checkpoint every block)"
                     if checkpoints_every_block(cfg) else " (no room to leave any out)")
        lines.append(said)
    if est.total > free:
        lines.append("WARNING: these settings will probably run out of GPU memory (the estimate can be off by "
                     "15%; training starts anyway). Changes that would fit:")
        lines += [f"  - {line}" for line in suggest(plan, free)]
        lines += [f"  note: {note}" for note in est.notes]
    elif est.tight():
        lines.append("  (close to the limit: the estimate can be off by 15%)")
    return lines


def out_of_memory(plan: RunPlan, epoch: int, step: int, saved: Any, c_epoch: int, c_step: int) -> UserError:
    """The error for a run that ran out of GPU memory: where, what was saved, and the cheapest changes of settings
    whose estimate fits in FIT_FRACTION of what it had estimated (it was too low) or of the GPU's free memory,
    whichever is less."""
    import torch
    est, where = plan.estimate, ""
    if plan.machine.type == "cuda":
        _free, total = torch.cuda.mem_get_info(plan.device)
        where = f" ({plan.machine.name}, {total / GiB:.0f} GiB)"
    msg = (f"out of GPU memory{where} at epoch {epoch}, step {step + 1}. Saved {saved} (epoch {c_epoch}, "
           f"step {c_step}): change the settings and continue with RESUME=1.")
    found = []
    if est is not None:
        budget = FIT_FRACTION * min(est.total, est.free or est.total)
        try:
            found = suggestions(plan, budget)
        except Exception:                   # advice must not hide the error
            found = []
    if found:
        fix = "one of: " + "; or ".join(c.line() for c in found)
    else:
        fix = ("lower MICRO_BSZ (raise MINI_BSZ to keep the batch), set GRAD_CP=1, QUANT=nf4, OPTIMIZER=adamw8bit "
               "or TRAIN_TYPE=infctx")
    return UserError(msg, fix)
