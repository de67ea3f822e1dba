"""A training run's files in OUTPUT: adapters with their metadata, the resume unit (train_state.pth), the list of
a run's files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import UserError
from ..model import RWKV

from .models import _load_file, _name, detect_config, load_checkpoint, save_atomic

# ------------------------------------------------------------------------------------------ training files
# An adapter file (output/rwkv-E.pth) is a flat dict: the trained tensors under their model key names, plus
# one string entry META_KEY holding JSON: the method and its settings, TRAIN_PARTS, the base model's name,
# sizes and fingerprint, the epoch. Everything merge and resume need, so nothing is ever retyped.
META_KEY = "_rwkv_peft_simple"
ADAPTER_FORMAT = 1
_FINGERPRINT_KEYS = ("ln_out.weight", "ln_out.bias", "blocks.0.ln0.weight", "blocks.0.ln1.weight",
                     "blocks.0.att.receptance.weight", "head.weight")


def fingerprint(sd: Mapping[str, Tensor]) -> str:
    """A short hash identifying a base model: its keys and shapes, and values of a few tensors (as fp32,
    so the same weights stored in fp32 or bf16 after rounding to bf16 give the same fingerprint)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in _FINGERPRINT_KEYS:
        if k in sd:
            t = sd[k].reshape(-1)[:4096].to(torch.bfloat16).float()
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def base_metadata(path, sd: Mapping[str, Tensor] | None = None) -> dict:
    """What an adapter records about its base model (read from the file, before any method changes it; ``sd``: the
    file's tensors when they are loaded already)."""
    sd = load_checkpoint(path) if sd is None else sd
    cfg = detect_config(sd, path)
    return {"name": Path(path).name, "version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "head_size": cfg.head_size, "vocab_size": cfg.vocab_size, "fingerprint": fingerprint(sd)}


def save_adapter(path, tensors: Mapping[str, Tensor], meta: dict) -> None:
    import json
    obj = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    obj[META_KEY] = json.dumps({"format": ADAPTER_FORMAT, **meta}, ensure_ascii=False)
    save_atomic(obj, path)


def load_adapter(path) -> tuple[dict[str, Tensor], dict]:
    """(trained tensors, metadata) of a file written by save_adapter; another tool's file is refused."""
    p = Path(path)
    obj = _load_file(p, "checkpoint")
    if not isinstance(obj, Mapping) or META_KEY not in obj:
        raise UserError(f"{_name(p)} was not written by this toolkit's trainer (no {META_KEY} metadata)",
                        "give a checkpoint from output/ written by ./training.sh")
    return _adapter_from_obj(obj, p)


def _adapter_from_obj(obj: Mapping, p: Path) -> tuple[dict[str, Tensor], dict]:
    import json
    try:
        meta = json.loads(obj[META_KEY])
    except (TypeError, ValueError, RecursionError):
        raise UserError(f"{_name(p)}: its {META_KEY} metadata is damaged", "save or copy the checkpoint again") from None
    tensors = {k: v for k, v in obj.items() if k != META_KEY}
    check_adapter_meta(meta, tensors, _name(p))
    return tensors, meta


TRAIN_STATE = "train_state.pth"       # OUTPUT's resume unit (trainer/resume.py)
DS_DIR = "deepspeed"                  # OUTPUT/deepspeed/<tag>/: DeepSpeed's partitioned optimizer state
_RUN_FILES = (TRAIN_STATE, "loss.csv", "loss.png", "samples.txt", DS_DIR)


def run_files(output_dir) -> list[Path]:
    """The files of a training run in ``output_dir``: checkpoints, train_state.pth, loss.csv, ... (not the web
    page's saved configs)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(d.glob("rwkv-*.pth")) + [d / n for n in _RUN_FILES if (d / n).exists()]


def clear_run(output_dir) -> list[Path]:
    """OVERWRITE=1: remove an earlier run's files from ``output_dir``; returns what was removed."""
    import shutil
    removed = run_files(output_dir)
    for p in removed:
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as err:
            raise UserError(f"OVERWRITE=1: cannot remove {p} ({err.strerror or err}).",
                            "remove it yourself, or set OUTPUT to a new folder") from None
    return removed
def check_adapter_meta(meta: Any, tensors: Mapping, where: str) -> None:
    """The one check of an adapter file's metadata (and that its tensors belong to its method), so that merge, resume,
    the chat add-on and evaluate never meet a wrong type: a file damaged or edited by hand is refused as such."""
    from ..choices import QUANTS
    from ..peft import METHODS, get_method
    from ..peft.base import PARTS

    def damaged(what: str) -> UserError:
        return UserError(f"{where} is damaged or not a checkpoint of this toolkit: {what}",
                         "use an unmodified output/rwkv-N.pth written by ./training.sh (train again if it was edited)")

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(meta, dict):
        raise damaged(f"its {META_KEY} metadata is a JSON {_json_kind(meta)}, not an object")
    fmt = meta.get("format", 0)
    if not whole(fmt) or fmt < 0:
        raise damaged(f"its format is {fmt!r}, not a version number")
    if fmt > ADAPTER_FORMAT:
        raise UserError(f"{where} was written by a newer version of this toolkit (format {fmt})",
                        "update rwkv-peft-simple")
    method = meta.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise damaged(f"it records the method {method!r}, not one of {' | '.join(METHODS)}")
    settings = meta.get("settings", {})
    if not isinstance(settings, dict):
        raise damaged(f"its settings are a JSON {_json_kind(settings)}, not an object")
    cls = get_method(method)
    try:
        cls(settings)                       # each method checks its own settings (types and ranges)
    except UserError as err:
        raise damaged(f"its {method} settings {json_text(settings)} are wrong ({err.message.rstrip('.')})") from None
    parts = meta.get("train_parts", [])
    if not isinstance(parts, list) or not all(isinstance(x, str) and x in PARTS for x in parts):
        raise damaged(f"its train_parts {parts!r} are not a list of {' '.join(PARTS)}")
    quant = meta.get("quant", "none")
    if quant not in QUANTS:
        raise damaged(f"its quant {quant!r} is not one of {' | '.join(QUANTS)}")
    epoch = meta.get("epoch")
    if epoch is not None and (not whole(epoch) or epoch < 0):
        raise damaged(f"its epoch {epoch!r} is not an epoch number")
    if not isinstance(meta.get("complete", True), bool):
        raise damaged(f"its 'complete' {meta['complete']!r} is not true or false")
    base = meta.get("base")
    if not isinstance(base, dict):
        raise damaged(f"its base model record {base!r} is not an object")
    name = base.get("name")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise damaged(f"its base model name {name!r} is not a file name")
    for k in ("version", "n_layer", "n_embd", "head_size", "vocab_size"):
        v = base.get(k)
        if (k in ("version", "n_layer", "n_embd") or v is not None) and (not whole(v) or v < 1):
            raise damaged(f"its base model's {k} is {v!r}, not a positive whole number")
    if base["version"] not in (5, 6, 7):
        raise damaged(f"its base model's version is {base['version']}, not 5, 6 or 7")
    if not isinstance(base.get("fingerprint", ""), str):
        raise damaged(f"its base model's fingerprint {base['fingerprint']!r} is not a text")
    bad = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise damaged(f"its entry {bad!r} is not a tensor")
    own = set(cls.SUFFIXES + cls.EXTRA_SUFFIXES)
    foreign = {s for m in METHODS for s in get_method(m).SUFFIXES + get_method(m).EXTRA_SUFFIXES} - own
    bad = next((k for k in tensors if k.rsplit(".", 1)[-1] in foreign), None)
    if bad is not None:
        raise damaged(f"it records the method {method} but holds {bad}, a tensor of another method")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", type(None): "null", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def json_text(value: Any, limit: int = 80) -> str:
    import json
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def save_train_state(path, state: dict) -> None:
    save_atomic(state, path)


def load_train_state(path) -> dict:
    obj = _load_file(Path(path), "training state")
    if not isinstance(obj, Mapping) or "opt_step" not in obj or not ("optimizer" in obj or "deepspeed_tag" in obj):
        raise UserError(f"{_name(path)} is damaged or is not a training state written by ./training.sh",
                        "set RESUME=0 and OVERWRITE=1 to start afresh (or another OUTPUT)")
    return dict(obj)


def check_base(meta: dict, base_path, sd: Mapping[str, Tensor] | None = None, where: str = "") -> None:
    """Refuse a base model that is not the one the adapter was trained on (sizes or fingerprint)."""
    base = meta.get("base", {})
    sd = load_checkpoint(base_path) if sd is None else sd
    cfg = detect_config(sd, base_path)
    got = {"version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
    want = {k: base.get(k) for k in got}
    if got != want:
        raise UserError(f"{where or 'the checkpoint'} was trained on {base.get('name')} (RWKV-{want['version']}, "
                        f"{want['n_layer']}x{want['n_embd']}) but {_name(base_path)} is RWKV-{got['version']}, "
                        f"{got['n_layer']}x{got['n_embd']}", f"use the base model {base.get('name')}")
    if base.get("fingerprint") and base["fingerprint"] != fingerprint(sd):
        raise UserError(f"{_name(base_path)} is not the base model {where or 'the checkpoint'} was trained on "
                        f"({base.get('name')}, fingerprint {base['fingerprint']}): same size, other weights",
                        f"use the model file {base.get('name')} that training used")


def attach_adapter(model: RWKV, adapter_path, base_path) -> dict:
    """Apply a trained checkpoint from output/ to ``model`` (loaded from ``base_path``): the method is
    read from the file and applied through the PEFT interface. Returns the checkpoint's metadata."""
    from ..peft import get_method
    tensors, meta = load_adapter(adapter_path)
    check_base(meta, base_path, where=_name(adapter_path))
    method = get_method(meta["method"])(meta.get("settings", {}))
    method.apply(model, train_parts=tuple(meta.get("train_parts", ())))
    method.load_adapter(model, {k: v.to(model.device) for k, v in tensors.items()})
    if meta.get("quant", "none") not in ("none", "", None):   # a QLoRA run: the weights training saw
        from ..quant import quantize_model
        quantize_model(model, meta["quant"])
    model.requires_grad_(False)
    return meta


