"""INIT_ADAPTER: a new run that starts from the trained tensors of an adapter file instead of the method's fresh
initialisation. RESUME=1 continues a run (its optimizer, schedule and position); INIT_ADAPTER starts one: a new
OUTPUT, a new schedule from step 0, a fresh optimizer, only the tensors taken over.

    init = load(cfg, base_meta, log)       # before the model is built: prepare (and check_files: --dry-run, the page)
    apply(init, method, model, log)        # loop._build, once the method is applied and its tensors are in fp32

The file: a checkpoint of ours (output/rwkv-N.pth, any method), a state file (merge/<model>-state-N.pth, or
RWKV-PEFT's, RWKV-LM's: FINETUNE_MODE=state), or an RWKV-PEFT adapter (LoRA with the config's LORA_ALPHA, since its
files do not record alpha; PiSSA with its init file, PISSA_INIT; DiSHA), read by checkpoint.read_adapter. Refused,
each with one line and its fix, before anything is built:
  - a method other than FINETUNE_MODE, or other values of the settings its tensors depend on
    (Method.FIXED_SETTINGS: LORA_R and LORA_ALPHA, PISSA_R, DISHA_R). The values are not taken over from the file:
    training.sh stays the one record of the run (what its checkpoints store and a resume compares), and a value
    that silently differs from what the user reads there would be a surprise. The message gives the file's values.
  - a file trained on another base (its fingerprint; another tool's file records none: its shapes are checked when
    its tensors are loaded into MODEL, and the log says so).
  - tensors of TRAIN_PARTS this run would not train: loading them frozen would lose them, since the new run's
    checkpoints hold only what it trains, so its merge would silently drop them. Parts this run trains that the
    file did not train start from the base model's values, which is what the file's model has for them.
  - a file among the run files in OUTPUT that OVERWRITE=1 would remove.
Tensors this run trains that the file does not hold (layers an RWKV-PEFT run did not adapt, parts it did not train)
start as in a fresh run, which leaves the model the file's: LoRA's B, DiSHA's blocks and the states start at zero,
PiSSA's residual keeps W. PiSSA's residual is rebuilt from the file's initial A and B, as on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor

from . import checkpoint
from .errors import UserError

_LEAVE = "or leave INIT_ADAPTER empty"


@dataclass
class InitAdapter:
    path: Path
    tensors: dict[str, Tensor]
    meta: dict


def load(cfg, base_meta: dict | None = None, log: Callable[[str], None] | None = None) -> InitAdapter | None:
    """INIT_ADAPTER's file, read and checked against ``cfg`` (a TrainConfig); None when INIT_ADAPTER is empty. What
    a run should know (the base not recorded, parts that start from the base) goes to ``log``."""
    if not cfg.INIT_ADAPTER:
        return None
    say = log or (lambda _line: None)
    p = Path(cfg.INIT_ADAPTER)
    _check_path(cfg, p)
    mode = cfg.FINETUNE_MODE
    tensors, meta = checkpoint.read_adapter(p, lora_alpha=None if mode == "pissa" else cfg.LORA_ALPHA,
                                            pissa_init=cfg.PISSA_INIT or None, pissa=mode == "pissa",
                                            tool="training.sh")
    where = f"INIT_ADAPTER={cfg.INIT_ADAPTER}"
    _check_method(cfg, meta, where)
    _check_base(cfg, meta, where, say)
    _check_parts(cfg, meta, where, say)
    if meta.get("converted_from"):
        say(f"{where}: starting from {meta['converted_from']}")
    else:
        when = f"epoch {meta.get('epoch')}" if meta.get("complete", True) else "an interrupted run"
        say(f"{where}: starting from its trained {mode} tensors ({when}, {meta.get('optimizer_steps', '?')} "
            "optimizer steps); a new run: the schedule and optimizer start afresh")
    return InitAdapter(p, tensors, meta)


def _check_path(cfg, p: Path) -> None:
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        folder = p.parent if p.parent.is_dir() else None
        have = sorted(q.name for q in folder.glob("*.pth") if q.is_file())[:8] if folder is not None else []
        listing = f" ({folder}/ has {', '.join(have)})" if have else ""
        raise UserError(f"INIT_ADAPTER: {p} {what}{listing}.", "give the path of a checkpoint such as "
                        f"output/rwkv-0.pth (or a state file, merge/<model>-state-N.pth), {_LEAVE}")
    if cfg.OVERWRITE and p.resolve() in {q.resolve() for q in checkpoint.run_files(cfg.output_dir)}:
        raise UserError(f"INIT_ADAPTER={p} is a file of the run in OUTPUT={cfg.OUTPUT}, which OVERWRITE=1 removes "
                        "before the new run starts.", "set OUTPUT to a new folder for the new run")


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_method(cfg, meta: dict, where: str) -> None:
    """Its method is FINETUNE_MODE, and the settings its tensors depend on are the config's."""
    from .peft import get_method
    method = meta["method"]
    if method != cfg.FINETUNE_MODE:
        raise UserError(f"{where} holds a {method} adapter, but FINETUNE_MODE={cfg.FINETUNE_MODE}.",
                        f"set FINETUNE_MODE={method} to go on from it (or, for {cfg.FINETUNE_MODE} on top of it, "
                        f"merge it with ./merge.sh and set MODEL to the merged model), {_LEAVE}")
    cls = get_method(method)
    saved = cls(meta.get("settings") or {}).metadata()
    now = cls(cls.settings_from(cfg)).metadata()
    diff = [(var, saved.get(key), now.get(key)) for key, var in cls.FIXED_SETTINGS.items()
            if saved.get(key) != now.get(key)]
    if diff:
        was = " ".join(f"{var}={_text(a)}" for var, a, _ in diff)
        raise UserError(f"{where} was trained with {was}, but training.sh has "
                        f"{' '.join(f'{var}={_text(b)}' for var, _, b in diff)}.", f"set {was} to match, {_LEAVE}")


def _check_base(cfg, meta: dict, where: str, say: Callable[[str], None]) -> None:
    base = meta.get("base") or {}
    if not base:
        say(f"{where} records no base model (another tool's file): it is taken to be trained on MODEL={cfg.MODEL}; "
            "its shapes are checked when it is loaded, its weights cannot be")
        return
    try:
        checkpoint.check_base(meta, cfg.model_path, where=where)
    except UserError as err:
        raise UserError(err.message + ".", f"set MODEL={base.get('name')} (the model it was trained on), "
                        f"{_LEAVE}") from None


def _check_parts(cfg, meta: dict, where: str, say: Callable[[str], None]) -> None:
    """Its TRAIN_PARTS tensors are all trained by this run (else they would be lost); this run's others start from
    the base."""
    from .peft.base import PARTS
    if cfg.FINETUNE_MODE == "full":         # every tensor trains
        return
    had = list(meta.get("train_parts") or [])
    lost = [p for p in had if p not in cfg.TRAIN_PARTS]
    if lost:
        keep = " ".join(p for p in PARTS if p in lost or p in cfg.TRAIN_PARTS)
        raise UserError(f"{where} also trained TRAIN_PARTS {' '.join(lost)}, which this run would not train: those "
                        "tensors would be lost (the new run's checkpoints, and what merge makes of them, hold only "
                        "what it trains).", f"set TRAIN_PARTS=\"{keep}\" to go on training them, {_LEAVE}")
    fresh = [p for p in cfg.TRAIN_PARTS if p not in had]
    if fresh:
        say(f"{where}: TRAIN_PARTS {' '.join(fresh)} start from the base model's values (it did not train them)")


def apply(init: InitAdapter | None, method, model, log: Callable[[str], None] = print) -> None:
    """After ``method.apply`` (and the trained tensors made fp32): the file's tensors replace the fresh ones. A
    tensor the file holds that this run does not train, or one of another shape, is refused."""
    if init is None:
        return
    where = f"INIT_ADAPTER={init.path}"
    current = method.adapter_state_dict(model)
    extra = sorted(set(init.tensors) - set(current))
    if extra:
        raise UserError(f"{where} holds {len(extra)} tensors this {method.name} run has no place for "
                        f"({', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}): it was made for another model or "
                        "set-up", f"use a file trained on MODEL with this FINETUNE_MODE, {_LEAVE}")
    missing = [k for k in current if k not in init.tensors]
    if missing:
        log(f"{where}: {len(missing)} of the {len(current)} tensors this run trains are not in it and start as in a "
            f"new run ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''})")
    device = model.device
    sd = {k: current[k] for k in missing}           # loaded onto themselves: unchanged
    sd.update({k: v.to(device) for k, v in init.tensors.items()})
    try:
        method.load_adapter(model, sd)
    except UserError as err:
        raise UserError(f"{where} does not fit MODEL: {err.message}",
                        f"use a file trained on this base model, {_LEAVE}") from None
