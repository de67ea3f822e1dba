"""Adapter files of other tools, read as ours: RWKV-PEFT's LoRA, PiSSA (with its separate init file), DiSHA (Bone,
Bat; now MiSS) and plain state files (RWKV-PEFT's, RWKV-LM's, and those ./merge.sh writes).

    tensors, meta = read_adapter(path)                                   # ours as it is; a state file converted
    tensors, meta = read_adapter(path, lora_alpha=32)                    # an RWKV-PEFT LoRA file
    tensors, meta = read_adapter(path, pissa_init="run/init_pissa.pth")  # an RWKV-PEFT PiSSA file

Another tool's file holds only its trained tensors, under the model's key names (shared/docs/formats.md,
"RWKV-PEFT's adapter files"). What it does not record is given by the caller or refused, never guessed:
  LoRA   ``X.lora_A`` [r, in], ``X.lora_B`` [out, r]; W + (alpha / r) · B A. alpha is not in the file: LORA_ALPHA.
  PiSSA  the same keys, and nothing in the file says it is PiSSA; the initial pair is a second file that RWKV-PEFT
         writes into the run's folder, ``init_pissa.pth`` (``X.init_lora_A`` / ``X.init_lora_B``, with or without
         a ``model.`` prefix): PISSA_INIT names it. W + B A − B0 A0 (no alpha).
  DiSHA  ``X.disha``, told apart by its shape (RWKV-PEFT's BoneLinear / BatLinear, its merge_disha.py): [r, out]
         is our Bone (the same slab added to every column block of W), [in/r, r, r] our Bat (each r × r block
         of W times its column's matrix, plus that matrix).
  state  ``blocks.N.att.time_state`` [H, N, N], the layout we write.
Tensors of TRAIN_PARTS (emb, head, time, ln) may sit beside them under their model names. A converted file
records no base model (nothing in it says which): merge wants BASE, INIT_ADAPTER takes MODEL, and the shapes are
checked against it when the tensors are used.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from torch import Tensor

from ..errors import UserError

from .models import _load_file, _name
from .runs import META_KEY, TRAIN_STATE, _adapter_from_obj

STATE_SUFFIX = ".att.time_state"
INIT_FILE = "init_pissa.pth"      # what RWKV-PEFT names PiSSA's initial A and B, in the run's folder
_OWN = {".lora_A": "lora", ".lora_B": "lora", ".disha": "disha", STATE_SUFFIX: "state"}


def state_key(layer: int) -> str:
    return f"blocks.{layer}{STATE_SUFFIX}"


def read_adapter(path, *, lora_alpha: float | None = None, pissa_init=None, pissa: bool = False,
                 tool: str = "merge.sh") -> tuple[dict[str, Tensor], dict]:
    """(trained tensors, metadata) of an adapter file: ours as it is, another tool's converted (see the module's
    comment), anything else refused with the reason. ``pissa``: the caller knows that a LoRA-keyed file is PiSSA
    (FINETUNE_MODE=pissa); ``tool``: whose variables the fixes name (merge.sh or training.sh)."""
    p = Path(path)
    obj = _load_file(p, "checkpoint")
    if isinstance(obj, Mapping) and META_KEY in obj:
        if pissa_init:
            raise UserError(f"{_name(p)} is a checkpoint of this toolkit, which holds PiSSA's initial A and B itself; "
                            f"PISSA_INIT={pissa_init} is for RWKV-PEFT's files", "leave PISSA_INIT empty")
        return _adapter_from_obj(obj, p)
    tensors = _plain_tensors(obj, p, tool)
    kind, parts = _classify(tensors, _name(p))
    if kind == "lora":
        return _lora(tensors, parts, p, lora_alpha, pissa_init, pissa, tool)
    for name, value in (("LORA_ALPHA", lora_alpha), ("PISSA_INIT", pissa_init)):
        if value not in (None, "") and (tool == "merge.sh" or name == "PISSA_INIT"):   # training.sh always has one
            raise UserError(f"{_name(p)} is {'a state' if kind == 'state' else 'a DiSHA'} file, which has no "
                            f"{name} (given: {value})", f"leave {name} empty")
    if kind == "disha":
        return _disha(tensors, parts, _name(p))
    return _state(tensors, parts, _name(p))


def _plain_tensors(obj, p: Path, tool: str) -> dict[str, Tensor]:
    """The tensors of a file without our metadata; a training state, a complete model, a wrapper or anything that is
    not a flat dict of tensors refused."""
    from ..peft.base import TARGET_RE
    where = _name(p)
    again = "give a checkpoint from output/ written by ./training.sh, or an RWKV-PEFT adapter or state file"
    if not isinstance(obj, Mapping):
        raise UserError(f"{where} was not written by this toolkit's trainer (it holds a {type(obj).__name__}, "
                        "not a dict of tensors)", again)
    if "opt_step" in obj and "tensors" in obj:
        raise UserError(f"{where} is a run's training state ({TRAIN_STATE}), not a checkpoint",
                        f"give the checkpoint beside it ({p.parent}/rwkv-N.pth)")
    for wrapper in ("state_dict", "module", "model", "optimizer"):
        if wrapper in obj:
            raise UserError(f"{where} is a training state of another tool (it has a {wrapper!r} entry), not a "
                            "checkpoint of trained tensors", again)
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{where} was not written by this toolkit's trainer (entry {bad[0]!r} is not a tensor)", again)
    if not obj:
        raise UserError(f"{where} holds no tensors", again)
    if "emb.weight" in obj and any(k.endswith(".weight") and TARGET_RE.match(k[:-len(".weight")]) for k in obj):
        raise UserError(f"{where} is a complete RWKV model, not a training checkpoint: there is nothing to "
                        f"{'merge' if tool == 'merge.sh' else 'start from'}",
                        "use it as it is (it already loads in RWKV-Runner, Ai00 and the rwkv package)"
                        if tool == "merge.sh" else "set MODEL to it to fine-tune it further, and INIT_ADAPTER=\"\"")
    return dict(obj)


def _classify(tensors: Mapping[str, Tensor], where: str) -> tuple[str, list[str]]:
    """The kind of a plain adapter file (lora | disha | state) and the TRAIN_PARTS its other tensors belong to."""
    from ..peft.base import PARTS, part_of
    kinds, parts = set(), set()
    for k in tensors:
        own = next((kind for suffix, kind in _OWN.items() if k.endswith(suffix)), None)
        if own is not None:
            kinds.add(own)
            continue
        part = part_of(k)
        if part is None:
            raise UserError(f"{where} was not written by this toolkit's trainer, nor is it an RWKV-PEFT adapter: "
                            f"it holds {k}, neither an adapter tensor (lora_A, lora_B, disha, time_state) nor one "
                            "of TRAIN_PARTS (emb, head, time, ln)", "give a checkpoint from output/, or an "
                            "RWKV-PEFT adapter or state file")
        parts.add(part)
    if len(kinds) > 1:
        raise UserError(f"{where} holds tensors of two methods ({' and '.join(sorted(kinds))}): not an adapter of "
                        "one method", "give the adapter file of one run")
    if not kinds:
        raise UserError(f"{where} holds only TRAIN_PARTS tensors ({' '.join(sorted(parts))}) and no adapter "
                        "(lora_A / lora_B, disha, time_state)", "give the adapter file of the run")
    return kinds.pop(), [p for p in PARTS if p in parts]


def _meta(method: str, settings: dict, parts: list[str], converted_from: str) -> dict:
    from ..peft import get_method
    return {"method": method, "settings": get_method(method)(settings).metadata(), "train_parts": parts,
            "quant": "none", "base": {}, "epoch": None, "complete": True, "converted_from": converted_from}


def _lora(tensors: dict, parts: list[str], p: Path, lora_alpha, pissa_init, pissa: bool, tool: str) -> tuple:
    """An RWKV-PEFT LoRA file: LoRA with the alpha given, or PiSSA with its init file."""
    where = _name(p)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))})
    ranks = set()
    for m in modules:
        a, b = tensors.get(m + ".lora_A"), tensors.get(m + ".lora_B")
        if a is None or b is None:
            has, lacks = ("A", "B") if b is None else ("B", "A")
            raise UserError(f"{where} has {m}.lora_{has} but no {m}.lora_{lacks}: the file is incomplete",
                            "give the whole adapter file")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{where}: {m}.lora_A {list(a.shape)} and .lora_B {list(b.shape)} are not a LoRA pair "
                            "([r, in] and [out, r])", "give an unmodified adapter file")
        ranks.add(a.shape[0])
    if len(ranks) > 1:
        raise UserError(f"{where} has LoRA ranks {sorted(ranks)} in different layers; this toolkit's LoRA has one "
                        "rank", "merge it with the tool that trained it")
    r = ranks.pop()
    if pissa_init:
        if lora_alpha is not None:
            raise UserError(f"LORA_ALPHA={lora_alpha:g} and PISSA_INIT together: PiSSA has no alpha (RWKV-PEFT adds "
                            "its B·A unscaled)", "leave LORA_ALPHA out for a PiSSA file")
        init = _pissa_init(Path(pissa_init), modules, tensors, where)
        return {**tensors, **init}, _meta("pissa", {"r": r}, parts, f"an RWKV-PEFT PiSSA file (rank {r}) with the "
                                          f"initial A and B of {_name(pissa_init)}")
    if pissa or lora_alpha is None:
        raise _lora_needs(p, r, pissa, tool)
    if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise UserError(f"LORA_ALPHA={lora_alpha} must be a number more than 0", "give the lora_alpha of its training")
    return tensors, _meta("lora", {"r": r, "alpha": float(lora_alpha), "dropout": 0.0}, parts,
                          f"an RWKV-PEFT LoRA file (rank {r}, LORA_ALPHA={lora_alpha:g} as given)")


def _lora_needs(p: Path, r: int, pissa: bool, tool: str) -> UserError:
    """What an RWKV-PEFT LoRA file lacks: the alpha (LoRA) or the init file (PiSSA), and where to give it."""
    beside = p.parent / INIT_FILE
    found = f" (there is one beside it: {beside})" if beside.is_file() else ""
    if pissa:
        return UserError(f"{_name(p)} is an RWKV-PEFT LoRA-layout file (rank {r}): as PiSSA (FINETUNE_MODE=pissa) "
                         f"it needs its initial A and B, which RWKV-PEFT saves apart, as {INIT_FILE} in the run's "
                         "folder", f"set PISSA_INIT in {tool} to that file{found}")
    how = ("LORA_ALPHA=32 ./merge.sh ..., or for a PiSSA file PISSA_INIT=<its folder>/" + INIT_FILE + " ./merge.sh ..."
           if tool == "merge.sh" else "set LORA_ALPHA in training.sh to it")
    return UserError(f"{_name(p)} is a plain RWKV-PEFT LoRA file (rank {r}, no {META_KEY} metadata): it does not record "
                     "the alpha it was trained with (RWKV-PEFT's default is 32) nor whether it was PiSSA, and a "
                     "guess would merge silently wrong", f"give its lora_alpha: {how}{found}")


def _pissa_init(q: Path, modules: list[str], tensors: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """PiSSA's initial pair from RWKV-PEFT's init file, under our names (``X.pissa_init_A`` / ``_B``)."""
    obj = _load_file(q, "PiSSA init file")
    if not isinstance(obj, Mapping) or META_KEY in obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise UserError(f"{_name(q)} is not an RWKV-PEFT PiSSA init file (a dict of ….init_lora_A / "
                        "….init_lora_B tensors)", f"give the {INIT_FILE} the RWKV-PEFT run wrote")
    init = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in obj.items()}
    out = {}
    for m in modules:
        for ours, theirs, trained in (("pissa_init_A", "init_lora_A", "lora_A"),
                                      ("pissa_init_B", "init_lora_B", "lora_B")):
            t = init.get(f"{m}.{theirs}")
            if t is None:
                raise UserError(f"PISSA_INIT={_name(q)} has no {m}.{theirs}: it is not the init file of {where}",
                                f"give the {INIT_FILE} written by the run that wrote {where}")
            if tuple(t.shape) != tuple(tensors[f"{m}.{trained}"].shape):
                raise UserError(f"PISSA_INIT={_name(q)}: its {m}.{theirs} has shape {list(t.shape)}, but {where}'s "
                                f"{m}.{trained} has {list(tensors[f'{m}.{trained}'].shape)}: another run's init file",
                                f"give the {INIT_FILE} written by the run that wrote {where}")
            out[f"{m}.{ours}"] = t
    return out


def _disha(tensors: dict, parts: list[str], where: str) -> tuple:
    """An RWKV-PEFT DiSHA file: Bone ([r, out]) or Bat ([in/r, r, r]), told by the shape."""
    ds = [v for k, v in tensors.items() if k.endswith(".disha")]
    if all(v.dim() == 2 for v in ds):
        method, ranks = "bone", {v.shape[0] for v in ds}
    elif all(v.dim() == 3 and v.shape[1] == v.shape[2] for v in ds):
        method, ranks = "bat", {v.shape[-1] for v in ds}
    else:
        raise UserError(f"{where}: its .disha tensors have shapes {sorted({tuple(v.shape) for v in ds})[:3]}, "
                        "neither all [r, out] (Bone) nor all [in/r, r, r] (Bat)", "give an unmodified adapter file")
    if len(ranks) > 1:
        raise UserError(f"{where} has DiSHA block sizes {sorted(ranks)} in different layers; this toolkit's has one",
                        "merge it with the tool that trained it")
    r = ranks.pop()
    shape = "[r, out]" if method == "bone" else "[in/r, r, r]"
    return tensors, _meta(method, {"r": r}, parts, f"an RWKV-PEFT DiSHA file ({method}: {shape} blocks, r = {r})")


def _state(tensors: dict, parts: list[str], where: str) -> tuple:
    states = [k for k in tensors if k.endswith(STATE_SUFFIX)]
    layers = sorted(int(k.split(".")[1]) for k in states if k.split(".")[1].isdigit())
    if layers != list(range(len(states))):
        raise UserError(f"{where} looks like a state file but its layers are {layers[:6]}...: incomplete",
                        "give the complete state file")
    bad = next((k for k in states if tensors[k].dim() != 3 or tensors[k].shape[1] != tensors[k].shape[2]), None)
    if bad is not None:
        raise UserError(f"{where}: {bad} has shape {list(tensors[bad].shape)}, not [H, N, N]",
                        "give an unmodified state file")
    return tensors, _meta("state", {}, parts, "a plain RWKV-PEFT / RWKV-LM state file")


def parse_lora_alpha(text: str) -> float | None:
    """LORA_ALPHA as typed (merge.sh's variable, the web page's field) as a number; empty: not given."""
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"LORA_ALPHA={text!r} is not a number more than 0",
                        "give the lora_alpha the RWKV-PEFT run trained with, e.g. LORA_ALPHA=32 ./merge.sh 0")
    return value


def check_given_alpha(meta: dict, lora_alpha: float | None, where: str) -> None:
    """LORA_ALPHA given for a checkpoint of ours, which records its own: refused unless it is that very value."""
    if lora_alpha is None or meta.get("converted_from"):
        return
    settings = meta.get("settings") or {}
    if meta.get("method") != "lora":
        raise UserError(f"LORA_ALPHA={lora_alpha:g} was given, but {where} is a {meta.get('method')} checkpoint of "
                        "this toolkit (LORA_ALPHA is for RWKV-PEFT's LoRA files)", "leave LORA_ALPHA out")
    if float(settings.get("alpha", 0)) != float(lora_alpha):
        raise UserError(f"LORA_ALPHA={lora_alpha:g} was given, but {where} records the alpha it was trained with, "
                        f"{settings.get('alpha'):g}", "leave LORA_ALPHA out: it is read from the checkpoint")
