"""RESUME=1: what a save commits as one unit, and the checks that a resume continues exactly that unit.

A save (``loop.RunFiles.save``) writes, in this order:
  1. DeepSpeed only: its partitioned optimizer state, OUTPUT/deepspeed/<tag>/ (every rank; a new tag each save);
  2. the adapter, OUTPUT/rwkv-E.pth or rwkv-interrupted.pth: what merge.sh and the web page read;
  3. OUTPUT/train_state.pth, the unit: the trained tensors themselves, the optimizer's state (or the DeepSpeed tag
     with the sizes of its files), the position, the random state, the settings and the data's identity. Its
     atomic rename is the commit: killed before it, the previous unit is there whole; after it, the new one;
  4. older DeepSpeed tags are removed.
A resume reads the unit alone, so it never mixes two moments, and checks that it belongs to this run: the same
base model (fingerprint), the same data (its index's hash), settings that resume can honour (config.
RESUME_MAY_CHANGE), its DeepSpeed files complete. loss.csv rows after the unit's step (written before a kill)
are dropped, so the plot never doubles back.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import checkpoint
from .config import TrainConfig, resume_changes
from .errors import UserError

UNIT_FORMAT = 2
# Settings newer than some saved runs, as those runs had them (AdamW's constants, no L2Wrap): a resume compares
# against these, so that it says what changes.
BEFORE_THEY_EXISTED = {"WEIGHT_DECAY": "0", "BETA1": "0.9", "BETA2": "0.99", "ADAM_EPS": "1e-08", "L2WRAP": "0"}


def data_identity(prefix: Path) -> dict:
    """What identifies a tokenized data set: its item and byte counts and the hash of its index."""
    from .data.binidx import paths
    bin_path, idx_path = paths(prefix)
    h = hashlib.sha256()
    with open(idx_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"idx_sha256": h.hexdigest()[:16], "bin_bytes": bin_path.stat().st_size}


def unit(*, save_id: str, adapter: str, tensors: dict, meta: dict, epoch: int, step_in_epoch: int, opt_step: int,
         micro_step: int, optimizer_part: dict, rng: torch.Tensor, config: dict, data: dict | None,
         valid: dict | None = None) -> dict:
    """The contents of train_state.pth (see the module's comment); ``valid``: the best validation loss so far
    (validate.Record.state), so that EARLY_STOP goes on counting after RESUME=1."""
    return {"format": UNIT_FORMAT, "save_id": save_id, "adapter": adapter, "tensors": tensors, "meta": meta,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "opt_step": opt_step, "micro_step": micro_step,
            **optimizer_part, "rng": rng, "config": config, "data": data, "valid": valid}


_FIELDS = {"adapter": str, "epoch": int, "step_in_epoch": int, "opt_step": int, "micro_step": int,
           "config": Mapping, "rng": torch.Tensor}


def load(cfg: TrainConfig, base_meta: dict, data: dict | None, log: Callable[[str], None] = print) -> dict | None:
    """The saved unit that RESUME=1 continues, after every check (None when RESUME=0). Run before the model
    is built, so that --dry-run and the web page's check refuse what the run would."""
    if not cfg.RESUME:
        return None
    out = cfg.output_dir
    path = out / checkpoint.TRAIN_STATE
    state = checkpoint.load_train_state(path)
    damaged = f"{path} is damaged or was not written by this toolkit"
    for name, kind in _FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise UserError(f"{damaged} ({name} is missing or not a {kind.__name__}).",
                            "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)")
    fmt = state.get("format", 1)
    if not isinstance(fmt, int) or fmt > UNIT_FORMAT:
        raise UserError(f"{path} was written by a newer version of this toolkit (format {fmt}).",
                        "update rwkv-peft-simple")
    if fmt >= 2 and not (isinstance(state.get("tensors"), Mapping) and isinstance(state.get("meta"), Mapping)
                         and all(isinstance(v, torch.Tensor) for v in state["tensors"].values())):
        raise UserError(f"{damaged} (its trained tensors are missing).",
                        "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)")
    _check_settings(state, cfg, base_meta, data, path, log)
    if fmt < 2:
        state["tensors"] = _older_unit_tensors(state, out)
    _check_deepspeed_files(state, out)
    _note_adapter(state, out, log)
    return state


def _check_settings(state: dict, cfg: TrainConfig, base_meta: dict, data: dict | None, path: Path,
                    log: Callable[[str], None]) -> None:
    saved = {**BEFORE_THEY_EXISTED, **state["config"]}
    refused, honoured = resume_changes(saved, cfg)
    base = (state.get("meta") or {}).get("base") or {}
    if base.get("fingerprint") and base_meta.get("fingerprint") and base["fingerprint"] != base_meta["fingerprint"]:
        refused.insert(0, f"MODEL {base.get('name')} → {base_meta.get('name')} (other weights)")
    old_data = state.get("data")
    if isinstance(old_data, Mapping) and data is not None and dict(old_data) != data:
        refused.insert(0, f"the data {cfg.data_prefix} (tokenized again since: other items or order)")
    elif old_data is None and saved.get("DATA") not in (None, cfg.to_env()["DATA"]):
        refused.insert(0, f"DATA {saved['DATA']} → {cfg.DATA}")
    from .strategy import deepspeed_regroup_refusal
    regroup = deepspeed_regroup_refusal(saved, cfg)   # DeepSpeed: WEIGHT_DECAY between 0 and above 0
    if regroup:
        refused.append(regroup)
        honoured = [h for h in honoured if not h.startswith("WEIGHT_DECAY ")]
    saved_opt = saved.get("OPTIMIZER", "adamw")      # runs saved before OPTIMIZER existed ran AdamW
    if saved_opt != cfg.OPTIMIZER and not any(r.startswith("OPTIMIZER ") for r in refused):
        refused.append(f"OPTIMIZER {saved_opt} → {cfg.OPTIMIZER}")
    if refused:
        fix_vars = [r.split(" ", 1)[0] for r in refused if r.split(" ", 1)[0].isupper()]
        back = " ".join(f"{n}={saved[n]}" for n in fix_vars if n in saved)
        raise UserError(f"RESUME=1, but since the run in {path.parent}/ was saved, {'; '.join(refused)} changed: "
                        "resume cannot honour that (the saved tensors, optimizer state and data position depend on it).",
                        (f"set {back} to resume" if back else "use the model and data of that run to resume")
                        + ", or RESUME=0 with another OUTPUT (or OVERWRITE=1) to start afresh")
    for line in honoured:
        log(f"resuming with a changed setting: {line}")


def _older_unit_tensors(state: dict, out: Path) -> dict:
    """A train_state.pth of an older version holds no tensors: they are in the adapter it names, which must be
    of the same moment (its optimizer step), or the two were written at different times (a kill in between)."""
    p = out / state["adapter"]
    if Path(state["adapter"]).name != state["adapter"] or not p.is_file():
        raise UserError(f"RESUME=1: {p}, which {checkpoint.TRAIN_STATE} continues from, is missing.",
                        "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)")
    tensors, meta = checkpoint.load_adapter(p)
    if meta.get("optimizer_steps") not in (None, state["opt_step"]):
        raise UserError(f"RESUME=1: {p} (optimizer step {meta.get('optimizer_steps')}) and {checkpoint.TRAIN_STATE} "
                        f"(optimizer step {state['opt_step']}) are from two different moments (the run was "
                        "stopped while saving); they do not belong together.",
                        f"merge {p.name} as it is, or set RESUME=0 and OVERWRITE=1 to start afresh")
    return tensors


def _check_deepspeed_files(state: dict, out: Path) -> None:
    tag = state.get("deepspeed_tag")
    if tag is None:
        return
    from .strategy import DS_DIR
    folder = out / DS_DIR / str(tag)
    for name, size in (state.get("deepspeed_files") or {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"RESUME=1: DeepSpeed's optimizer state {folder}/ is incomplete ({name} "
                            f"{'is missing' if not f.is_file() else 'has another size'}).",
                            "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)")


def _note_adapter(state: dict, out: Path, log: Callable[[str], None]) -> None:
    """Say so when the adapter file is not the unit's own (written after it by a save that was killed)."""
    if "save_id" not in state:
        return
    p = out / state["adapter"]
    try:
        _tensors, meta = checkpoint.load_adapter(p)
    except UserError:
        meta = {}
    if meta.get("save_id") != state["save_id"]:
        log(f"note: {p.name} is not the checkpoint {checkpoint.TRAIN_STATE} was saved with (a save was cut off "
            f"by a kill); resuming from {checkpoint.TRAIN_STATE}'s position, and the next save replaces it")


def restore(prep, state: dict) -> None:
    """Put the unit's trained tensors into the prepared model (fp32, as trained)."""
    prep.method.load_adapter(prep.model, dict(state["tensors"]))
    for p in prep.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
