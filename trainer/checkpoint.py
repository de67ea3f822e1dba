"""Every read and write of a user's model file: loading, size detection, atomic saving, random init.

This is the only module that calls ``torch.load`` / ``torch.save`` on user files.

    sd = load_checkpoint(path)                    # dict of tensors, CPU, weights_only, memory-mapped
    cfg = detect_config(sd, path)                 # version and every size, from the keys and shapes
    model = load_model(path, dtype=None, device="cpu")
    save_atomic(model.state_dict(), path)         # temp file + fsync + rename: never half-written
    model = init_model(config_from_sizes(7, 2, 128), seed=0)
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .errors import UserError, check_name_lengths, interrupt_deferred
from .model import RWKV, ModelConfig, init_weights_

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Keys of one block, per version (the official layout; see docs formats.md).
_COMMON_BLOCK = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.receptance.weight", "att.key.weight",
                 "att.value.weight", "att.output.weight", "att.ln_x.weight", "att.ln_x.bias", "ffn.key.weight",
                 "ffn.value.weight"]
_BLOCK_KEYS = {
    5: _COMMON_BLOCK + ["att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g", "att.time_decay",
                        "att.time_faaaa", "att.gate.weight", "ffn.time_mix_k", "ffn.time_mix_r",
                        "ffn.receptance.weight"],
    6: _COMMON_BLOCK + ["att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v", "att.time_maa_r",
                        "att.time_maa_g", "att.time_maa_w1", "att.time_maa_w2", "att.time_decay",
                        "att.time_decay_w1", "att.time_decay_w2", "att.time_faaaa", "att.gate.weight",
                        "ffn.time_maa_k", "ffn.time_maa_r", "ffn.receptance.weight"],
    7: _COMMON_BLOCK + ["att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.w1",
                        "att.w2", "att.a0", "att.a1", "att.a2", "att.v0", "att.v1", "att.v2", "att.g1", "att.g2",
                        "att.k_k", "att.k_a", "att.r_k", "ffn.x_k"],
}
_V7_LAYER0_OPTIONAL = ("att.v0", "att.v1", "att.v2")   # unused in layer 0; some exporters drop them


def _name(path) -> str:
    return str(path)


# ------------------------------------------------------------------------------------------ loading
def load_checkpoint(path) -> dict[str, Tensor]:
    """Read a ``.pth`` state dict onto the CPU (weights only, memory-mapped where the format allows).

    Raises UserError naming the file when it is missing, unreadable, truncated, not a torch file or
    not a flat dict of tensors.
    """
    p = Path(path)
    sd = _load_file(p, "model file")
    if not isinstance(sd, Mapping) or not sd:
        raise UserError(f"{_name(p)} does not hold a dict of tensors (found {type(sd).__name__})",
                        "give an RWKV .pth model file")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{_name(p)} is not a plain dict of tensors (entry {bad[0]!r} is "
                        f"{type(sd[bad[0]]).__name__})", "give an RWKV .pth model file, not a training checkpoint")
    return dict(sd)


def _load_file(p: Path, what: str) -> Any:
    """torch.load (weights only) with every failure turned into a one-line UserError naming the file."""
    check_name_lengths(what, p, "give the right path")
    if not p.exists():
        raise UserError(f"{what} {_name(p)} does not exist",
                        "check the path (MODEL in training.sh, --model of the tools); models usually live in model/"
                        if what == "model file" else f"check the path of the {what}")
    if p.is_dir():
        raise UserError(f"{_name(p)} is a folder, not a {what}", "give the path of the .pth file inside it")
    if p.stat().st_size == 0:
        raise UserError(f"{what} {_name(p)} is empty", "download or save it again")
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError as err:
        raise UserError(f"{what} {_name(p)} cannot be read ({err.strerror or err})",
                        "check that the file is yours and readable") from None
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):     # zip (torch.save) or a legacy pickle
        raise UserError(f"{_name(p)} is not a PyTorch checkpoint (.pth) file", "give an RWKV .pth model file")
    try:
        return _torch_load(p)
    except UserError:
        raise
    except (zipfile.BadZipFile, EOFError):
        raise UserError(f"{what} {_name(p)} is truncated or corrupt", "download or save it again") from None
    except Exception as err:      # any failure to read a user's file (struct.error on a few bytes, ...): not ours
        low = str(err).lower()
        if "weights only" in low or "weights_only" in low:
            raise UserError(f"{_name(p)} holds Python objects besides tensors; refusing to load it "
                            "(not a plain RWKV checkpoint)", "use an RWKV .pth state dict") from None
        if head.startswith(b"PK") or any(s in low for s in ("zip", "central directory", "stream", "eof", "truncat",
                                                             "unexpected end")):
            raise UserError(f"{what} {_name(p)} is truncated or corrupt (an incomplete download or "
                            "copy?)", "download or save it again") from None
        raise UserError(f"{_name(p)} is not a PyTorch checkpoint (.pth) file",
                        "give an RWKV .pth model file") from None


def _torch_load(p: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # e.g. "Detected pickle protocol 4" on odd files
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
        return torch.load(p, map_location="cpu", weights_only=True)   # legacy (non-zip) format: no mmap


def detect_config(sd: Mapping[str, Tensor], path="checkpoint") -> ModelConfig:
    """The version and every size of the model in ``sd``, read from its keys and shapes.

    An unknown or incomplete layout gives a one-line UserError naming ``path`` and what is missing.
    """
    where = _name(path)

    def need(key: str) -> Tensor:
        if key not in sd:
            raise UserError(f"{where} is not an RWKV-5/6/7 checkpoint: no '{key}'",
                            "give an official RWKV .pth (or one made by tools.make_model / merge)")
        return sd[key]

    emb = need("emb.weight")
    if emb.dim() != 2:
        raise UserError(f"{where}: emb.weight has shape {list(emb.shape)}, expected [vocab, n_embd]")
    V, C = emb.shape
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layers:
        raise UserError(f"{where} is not an RWKV checkpoint: no 'blocks.*' keys",
                        "give an official RWKV .pth model file")
    L = max(layers) + 1
    missing_layers = sorted(set(range(L)) - layers)
    if missing_layers:
        raise UserError(f"{where}: layer {missing_layers[0]} is missing (blocks go up to {L - 1})",
                        "the file is incomplete: save or download it again")
    if "blocks.0.att.r_k" in sd:
        version = 7
    elif "blocks.0.att.time_maa_x" in sd:
        version = 6
    elif "blocks.0.att.time_decay" in sd and sd["blocks.0.att.time_decay"].dim() == 2 \
            and "blocks.0.att.gate.weight" in sd:
        version = 5
    elif "blocks.0.att.time_decay" in sd or "blocks.0.att.time_first" in sd:
        raise UserError(f"{where} is an older RWKV model (RWKV-4 or 5.0/5.1); only RWKV-5.2, 6 and 7 are "
                        "supported", "use an RWKV-5.2 (World v2), RWKV-6 or RWKV-7 model")
    else:
        raise UserError(f"{where}: cannot tell the RWKV version (no blocks.0.att.r_k, time_maa_x or "
                        "time_decay)", "give an official RWKV-5.2/6/7 .pth model file")
    a = "blocks.0.att."
    if version == 7:
        H, N = need(a + "r_k").shape
    else:
        H, N = need(a + "time_faaaa").shape
    if H * N != C:
        raise UserError(f"{where}: {H} heads of size {N} do not make the width {C}",
                        "the file does not have an RWKV layout we support")
    cfg = ModelConfig(version=version, n_layer=L, n_embd=C, vocab_size=V, head_size=N,
                      ffn_dim=need("blocks.0.ffn.key.weight").shape[0])
    if version == 6:
        cfg.d_mix = need(a + "time_maa_w1").shape[1] // 5
        cfg.d_decay = need(a + "time_decay_w1").shape[1]
    elif version == 7:
        cfg.d_decay = need(a + "w1").shape[1]
        cfg.d_aaa = need(a + "a1").shape[1]
        if a + "v1" in sd:
            cfg.d_mv = sd[a + "v1"].shape[1]
        elif L > 1:
            cfg.d_mv = need("blocks.1.att.v1").shape[1]
        else:                                  # one layer, v1 dropped: unused, any rank will do
            cfg.d_mv = _lora_dim(1.7, C)
        cfg.d_gate = need(a + "g1").shape[1]
    _check_layout(sd, cfg, where)
    return cfg


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official layout of ``cfg`` with its shape."""
    with torch.device("meta"):
        model = RWKV(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_layout(sd: Mapping[str, Tensor], cfg: ModelConfig, where: str) -> None:
    shapes = expected_shapes(cfg)
    optional = {f"blocks.0.{k}" for k in _V7_LAYER0_OPTIONAL} if cfg.version == 7 else set()
    missing = [k for k in shapes if k not in sd and k not in optional]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: RWKV-{cfg.version} checkpoint is missing '{missing[0]}'{more}",
                        "the file is incomplete or has a layout we do not support")
    extra = [k for k in sd if k not in shapes and not _is_time_state(k, cfg)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise UserError(f"{where}: unexpected key '{extra[0]}'{more} for an RWKV-{cfg.version} model",
                        "this variant of the architecture is not supported")
    for k, shape in shapes.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise UserError(f"{where}: '{k}' has shape {list(sd[k].shape)}, expected {list(shape)} for "
                            f"an RWKV-{cfg.version} model of width {cfg.n_embd}",
                            "the file is damaged or has a layout we do not support")
    for k in sd:
        if _is_time_state(k, cfg) and tuple(sd[k].shape) != (cfg.n_head, cfg.head_size, cfg.head_size):
            raise UserError(f"{where}: '{k}' has shape {list(sd[k].shape)}, expected "
                            f"{[cfg.n_head, cfg.head_size, cfg.head_size]}")


def _is_time_state(key: str, cfg: ModelConfig) -> bool:
    parts = key.split(".")
    return (len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < cfg.n_layer
            and parts[2:] == ["att", "time_state"])


def checkpoint_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype holding most of the weights (checkpoints keep a few tensors in fp32 sometimes)."""
    count: dict[torch.dtype, int] = {}
    for v in sd.values():
        if v.is_floating_point():
            count[v.dtype] = count.get(v.dtype, 0) + v.numel()
    return max(count, key=count.get) if count else torch.float32


def model_from_state_dict(sd: Mapping[str, Tensor], cfg: ModelConfig, dtype: torch.dtype,
                          device="cpu", keep_on_cpu: Callable[[str], bool] | None = None) -> RWKV:
    """Build an RWKV holding ``sd`` (official layout; ``time_state`` keys become parameters).

    ``keep_on_cpu(key)``: those tensors stay where and as they are stored (the checkpoint's mmap, its own
    dtype), the rest goes to ``device`` in ``dtype``. QLoRA uses it to quantise the big linear weights
    straight from the file into the GPU, one at a time, instead of first holding them all in bf16."""
    with torch.device("meta"):
        model = RWKV(cfg)
    for k in sd:
        if _is_time_state(k, cfg):
            i = int(k.split(".")[1])
            with torch.device("meta"):
                model.blocks[i].att.time_state = torch.nn.Parameter(torch.empty(cfg.n_head, cfg.head_size,
                                                                                 cfg.head_size))
    full = {k: v if keep_on_cpu is not None and keep_on_cpu(k) else v.to(device=device, dtype=dtype)
            for k, v in sd.items()}
    if cfg.version == 7:   # layer 0's unused v0/v1/v2 when an exporter dropped them
        for k in _V7_LAYER0_OPTIONAL:
            key = f"blocks.0.{k}"
            if key not in full:
                full[key] = torch.zeros(model.state_dict()[key].shape, dtype=dtype, device=device)
    model.load_state_dict(full, strict=True, assign=True)
    return model


def load_model(path, dtype: torch.dtype | str | None = None, device="cpu",
               keep_on_cpu: Callable[[str], bool] | None = None) -> RWKV:
    """Load an official RWKV-5.2/6/7 ``.pth`` as an ``RWKV`` (eval mode) in ``dtype`` (default: the
    checkpoint's own) on ``device``. Checkpoints with ``time_state`` keys get those as parameters.
    ``keep_on_cpu``: see model_from_state_dict."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype '{dtype}'", f"choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    sd = load_checkpoint(path)
    cfg = detect_config(sd, path)
    model = model_from_state_dict(sd, cfg, dtype or checkpoint_dtype(sd), device, keep_on_cpu)
    return model.eval()


# ------------------------------------------------------------------------------------------ writing
def save_atomic(obj: Any, path) -> None:
    """``torch.save`` to a temporary in the same folder, fsync, then rename over ``path`` (files.atomic_write).

    Either the old file or the complete new one is there afterwards, never a half-written file; a full disk
    is one line naming the folder and the size needed. Ctrl+C during the write lets it finish and is raised
    afterwards.
    """
    from .files import atomic_write
    with atomic_write(path, need=payload_bytes(obj)) as f:
        torch.save(obj, f)


def payload_bytes(obj: Any) -> int:
    """About what ``torch.save(obj)`` writes: the bytes of its tensors (plus a little per entry)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size() + 64
    if isinstance(obj, Mapping):
        return sum(payload_bytes(v) + 64 for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) + 16 for v in obj)
    if isinstance(obj, (str, bytes)):
        return len(obj)
    return 16


# ----------------------------------------------------------------------------------- new models
def _lora_dim(factor: float, C: int) -> int:
    return max(32, int(round(factor * C ** 0.5 / 32) * 32))


def config_from_sizes(version: int, n_layer: int, n_embd: int, vocab_size: int = 65536,
                      head_size: int = 64) -> ModelConfig:
    """The ModelConfig RWKV-LM would build for these sizes (its default FFN width and low ranks)."""
    if version not in (5, 6, 7):
        raise UserError(f"RWKV version {version} is not supported", "choose 5, 6 or 7")
    if n_layer < 1 or n_embd < 1 or vocab_size < 1 or head_size < 1:
        raise UserError("layers, width, vocabulary and head size must be positive")
    if n_embd % head_size:
        raise UserError(f"width {n_embd} is not a multiple of the head size {head_size}",
                        f"use a width like {max(head_size, n_embd // head_size * head_size)}")
    if n_embd % 32:
        raise UserError(f"width {n_embd} is not a multiple of 32", "use 128, 256, 512, 768, 1024, ...")
    cfg = ModelConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, head_size=head_size)
    if version == 7:
        cfg.ffn_dim = 4 * n_embd
        cfg.d_decay, cfg.d_aaa = _lora_dim(2.5, n_embd), _lora_dim(2.5, n_embd)
        cfg.d_mv, cfg.d_gate = _lora_dim(1.7, n_embd), _lora_dim(5, n_embd)
    else:
        cfg.ffn_dim = int(n_embd * 3.5) // 32 * 32
        if version == 6:
            cfg.d_mix = 64 if n_embd == 4096 else 32
            cfg.d_decay = 128 if n_embd == 4096 else 64
    return cfg


def init_model(cfg: ModelConfig, seed: int = 0, output_gain: float = 0.0) -> RWKV:
    """A new fp32 model on the CPU with RWKV-LM's random initialisation for its version (``output_gain``:
    see init_weights_)."""
    return init_weights_(RWKV(cfg), seed, output_gain)


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


def base_metadata(path) -> dict:
    """What an adapter records about its base model (read from the file, before any method changes it)."""
    sd = load_checkpoint(path)
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
    from .peft import METHODS, get_method
    from .peft.base import PARTS

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
    if quant not in ("none", "int8", "nf4"):
        raise damaged(f"its quant {quant!r} is not one of none | int8 | nf4")
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
    from .peft import get_method
    tensors, meta = load_adapter(adapter_path)
    check_base(meta, base_path, where=_name(adapter_path))
    method = get_method(meta["method"])(meta.get("settings", {}))
    method.apply(model, train_parts=tuple(meta.get("train_parts", ())))
    method.load_adapter(model, {k: v.to(model.device) for k, v in tensors.items()})
    if meta.get("quant", "none") not in ("none", "", None):   # a QLoRA run: the weights training saw
        from .quant import quantize_model
        quantize_model(model, meta["quant"])
    model.requires_grad_(False)
    return meta


# ------------------------------------------------------------------------------------------ merge
# ./merge.sh EPOCH reads output/rwkv-EPOCH.pth (trained tensors + metadata) and the base model it names, and writes
#   merge/<base-stem>-<method>-EPOCH.pth   the merged model: official keys only, one dtype, nothing else
#   merge/<base-stem>-state-EPOCH.pth      state tuning: the keys blocks.N.att.time_state alone
#   merge/<base-stem>-state-EPOCH-model.pth  state tuning, optional: the base model with those keys inside
# The method, its settings, TRAIN_PARTS, QUANT and the base model come from the checkpoint, never retyped.
#
# State files: ``blocks.N.att.time_state`` [H, N, N] laid out [head, value, key] -- the layout RWKV-LM and RWKV-PEFT
# state tuning save, and our own S[value, key] unchanged, for every RWKV version. Readers: the rwkv pip package
# (v5/v6) loads a model's time_state with ``.transpose(1, 2)`` into its [key, value] state; its RWKV-7 state is
# [value, key] already (put the tensor into state[3i+1] as it is; it ignores time_state keys in v7 models);
# web-rwkv (Ai00, RWKV-Runner's WebGPU mode) reads v5/v6/v7 state files with one and the same code.
STATE_SUFFIX = ".att.time_state"
MERGE_METHODS_WITH_MODEL = ("lora", "pissa", "bone", "bat", "full")


def state_key(layer: int) -> str:
    return f"blocks.{layer}{STATE_SUFFIX}"


def list_epochs(output_dir) -> list[str]:
    """The epochs saved in ``output_dir`` ("0", "1", ..., then "interrupted" if there is one)."""
    d = Path(output_dir)
    tags = [p.name[len("rwkv-"):-len(".pth")] for p in d.glob("rwkv-*.pth") if p.is_file()] if d.is_dir() else []
    nums = sorted(int(t) for t in tags if t.isdigit())
    return [str(n) for n in nums] + (["interrupted"] if "interrupted" in tags else [])


def checkpoint_path(output_dir, epoch) -> Path:
    """``output_dir/rwkv-EPOCH.pth``; a missing one is refused with the epochs that exist."""
    tag = str(epoch).strip()
    if not (tag.isascii() and tag.isdigit() or tag == "interrupted"):
        raise UserError(f"EPOCH must be an epoch number or 'interrupted', not {tag[:40]!r}", "e.g. ./merge.sh 0")
    tag = (tag.lstrip("0") or "0") if tag.isdigit() else tag
    check_name_lengths("OUTPUT", output_dir, "set OUTPUT in merge.sh to the folder training wrote to")
    if len(tag) > 18:
        have = list_epochs(output_dir)
        raise UserError(f"EPOCH {tag[:18]}... has {len(tag)} digits: there is no such checkpoint"
                        + (f" ({output_dir} has epochs {', '.join(have)})" if have else ""),
                        f"run ./merge.sh {have[-1]}" if have else "e.g. ./merge.sh 0")
    p = Path(output_dir) / f"rwkv-{tag}.pth"
    if p.is_file():
        return p
    have = list_epochs(output_dir)
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"OUTPUT={output_dir} is a file, not the folder of training's checkpoints",
                        "set OUTPUT in merge.sh to the folder training wrote to (training.sh's OUTPUT)")
    if not Path(output_dir).is_dir():
        raise UserError(f"the folder {output_dir} does not exist, so there is no checkpoint to merge",
                        "run ./training.sh first, or set OUTPUT in merge.sh to the folder training wrote to")
    if p.is_dir() or p.is_symlink():
        what = "a folder" if p.is_dir() else f"a link to {os.readlink(p)}, which does not exist"
        raise UserError(f"{p} is {what}, not a checkpoint" + (f" ({output_dir} has epoch{'s' if len(have) > 1 else ''} "
                        f"{', '.join(have)})" if have else ""), "give the epoch of a checkpoint file written by ./training.sh")
    if not have:
        raise UserError(f"{output_dir} holds no checkpoint (rwkv-N.pth)",
                        "train first (./training.sh), or set OUTPUT in merge.sh to the folder training wrote to")
    raise UserError(f"there is no {p}: {output_dir} has epoch{'s' if len(have) > 1 else ''} {', '.join(have)}",
                    f"run ./merge.sh {have[-2] if have[-1] == 'interrupted' and len(have) > 1 else have[-1]}")


def read_training_checkpoint(path) -> tuple[dict[str, Tensor], dict]:
    """(trained tensors, metadata) of a checkpoint to merge.

    Ours (written by training.sh) as is. A plain RWKV-PEFT / RWKV-LM state file (only ``blocks.N.att.time_state``
    keys, no metadata) is converted: state tuning has no settings, so nothing is missing except the base model's
    name (give it as BASE). Any other file is refused with the reason; a plain RWKV-PEFT LoRA file in particular,
    because LORA_ALPHA (and whether it was PiSSA) is not recorded in it and a guess would merge silently wrong.
    """
    p = Path(path)
    obj = _load_file(p, "checkpoint")
    if isinstance(obj, Mapping) and META_KEY in obj:
        return _adapter_from_obj(obj, p)
    where = _name(p)
    if not isinstance(obj, Mapping):
        raise UserError(f"{where} was not written by this toolkit's trainer (it holds a {type(obj).__name__}, "
                        "not a dict of tensors)", "give a checkpoint from output/ written by ./training.sh")
    for wrapper in ("state_dict", "module", "model", "optimizer"):
        if wrapper in obj:
            raise UserError(f"{where} is a training state of another tool (it has a {wrapper!r} entry), not a "
                            "checkpoint of trained tensors", "give a checkpoint from output/ written by ./training.sh")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{where} was not written by this toolkit's trainer (entry {bad[0]!r} is not a tensor)",
                        "give a checkpoint from output/ written by ./training.sh")
    keys = list(obj)
    if "emb.weight" in obj and any(k.startswith("blocks.") for k in keys):
        raise UserError(f"{where} is a complete RWKV model, not a training checkpoint: there is nothing to merge",
                        "use it as it is (it already loads in RWKV-Runner, Ai00 and the rwkv package)")
    lora = [k for k in keys if k.endswith((".lora_A", ".lora_B"))]
    if lora:
        a = next((obj[k] for k in lora if k.endswith(".lora_A")), None)
        rank = f"rank {a.shape[0]}" if a is not None and a.dim() == 2 else "its rank"
        raise UserError(f"{where} is a plain RWKV-PEFT LoRA checkpoint (no {META_KEY} metadata): {rank} can be read "
                        "from it, but not LORA_ALPHA (the update's scale) nor whether it was PiSSA (which needs the "
                        "initial A and B) -- a guess would merge silently wrong",
                        "merge it with the tool that trained it, giving its lora_alpha, or train with ./training.sh")
    if any(k.endswith(".disha") for k in keys):
        raise UserError(f"{where} is a plain RWKV-PEFT DiSHA (Bone/Bat) checkpoint without metadata; only plain "
                        "state files are converted", "merge it with the tool that trained it, or train with "
                        "./training.sh")
    states = [k for k in keys if k.endswith(STATE_SUFFIX)]
    if states and len(states) == len(keys):
        layers = sorted(int(k.split(".")[1]) for k in states if k.split(".")[1].isdigit())
        if layers != list(range(len(states))):
            raise UserError(f"{where} looks like a state file but its layers are {layers[:6]}...: incomplete",
                            "give the complete state file")
        meta = {"method": "state", "settings": {}, "train_parts": [], "quant": "none", "base": {},
                "epoch": None, "complete": True, "converted_from": "a plain RWKV-PEFT / RWKV-LM state file"}
        return {k: obj[k] for k in keys}, meta
    if states:
        raise UserError(f"{where} has time_state keys and other tensors ({[k for k in keys if k not in states][0]}, "
                        "...) but no metadata: not a file this toolkit can convert", "give a checkpoint from output/ "
                        "written by ./training.sh")
    raise UserError(f"{where} was not written by this toolkit's trainer (no {META_KEY} metadata, first key "
                    f"{keys[0]!r})", "give a checkpoint from output/ written by ./training.sh")


def find_base_model(meta: dict, model_dir="model", override=None, where: str = "the checkpoint") -> Path:
    """The base model file: ``override`` (a path, or a name inside ``model_dir``) or the name recorded in ``meta``."""
    d = Path(model_dir)
    check_name_lengths("the model folder", d, "give the folder of the base models (model/)")
    if override:
        check_name_lengths("BASE", override, "set BASE in merge.sh to the base model's path, or leave it empty")
        p = Path(override)
        if not p.is_file() and (d / override).is_file():
            p = d / override
        if not p.is_file():
            raise UserError(f"the base model BASE={override} does not exist (looked at {p}"
                            f"{'' if p == d / override else ' and ' + str(d / override)})",
                            "give the path of the .pth, or a file name inside model/, or leave BASE empty")
        return p
    name = meta.get("base", {}).get("name")
    if not name:
        raise UserError(f"{where} does not record its base model", "set BASE in merge.sh to the model it was "
                        "trained on (a file in model/)")
    p = d / name
    if not p.is_file():
        have = sorted(q.name for q in d.glob("*.pth")) if d.is_dir() else []
        raise UserError(f"{where} was trained on {name}, which is not in {d}/ (it has: {', '.join(have) or 'nothing'})",
                        f"put {name} back in {d}/, or set BASE in merge.sh to where it is now")
    return p


def base_as_trained(base_sd: dict[str, Tensor], quant: str | None, adapter: Mapping[str, Tensor]
                    ) -> dict[str, Tensor]:
    """The base weights as training saw them: the file itself, or for a quantised run (QLoRA) every quantised
    linear as dequantise(quantise(W)) exactly as training computed it (``trainer.quant.dequantised_base``;
    PiSSA's layers need the checkpoint's tensors, ``adapter``)."""
    if quant in (None, "", "none"):
        return base_sd
    from .quant import dequantised_base
    return dequantised_base(base_sd, quant, dict(adapter))


def _group(key: str) -> str:
    parts = key.split(".")
    return f"blocks.{parts[1]}" if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else ""


def merge_state_dicts(base_sd: Mapping[str, Tensor], tensors: Mapping[str, Tensor], meta: dict,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The merged state dict (base keys, plus time_state keys for state tuning) in ``dtype``.

    The method's own ``merge`` runs in fp32, one block at a time (so a large model needs only one block in fp32
    at once), on the base as training saw it (``base_as_trained``)."""
    from .peft import get_method
    method = get_method(meta.get("method", ""))
    settings = meta.get("settings", {}) or {}
    groups: dict[str, tuple[dict, dict]] = {}
    for k, v in base_sd.items():
        groups.setdefault(_group(k), ({}, {}))[0][k] = v
    for k, v in tensors.items():
        groups.setdefault(_group(k), ({}, {}))[1][k] = v
    out: dict[str, Tensor] = {}
    quant = meta.get("quant", "none")
    for g, (b, a) in groups.items():
        b = base_as_trained(b, quant, a)      # a QLoRA run trained on the dequantised weights
        merged = method.merge(b, a, settings) if a else b
        for k, v in merged.items():
            out[k] = v.to(dtype).contiguous()
    return out


def release_state_dict(sd: Mapping[str, Tensor], cfg: ModelConfig, with_state: bool = False) -> dict[str, Tensor]:
    """Only the official keys of ``cfg`` in their order (plus time_state keys if ``with_state``)."""
    out = {k: sd[k] for k in expected_shapes(cfg) if k in sd}
    if with_state:
        out.update({state_key(i): sd[state_key(i)] for i in range(cfg.n_layer) if state_key(i) in sd})
    return out


def state_file_dict(sd: Mapping[str, Tensor], n_layer: int) -> dict[str, Tensor]:
    """The state file: ``blocks.N.att.time_state`` of every layer, nothing else."""
    missing = [i for i in range(n_layer) if state_key(i) not in sd]
    if missing:
        raise UserError(f"the state checkpoint has no time_state for layer {missing[0]} (of {n_layer})",
                        "use the complete checkpoint written by ./training.sh")
    return {state_key(i): sd[state_key(i)].contiguous() for i in range(n_layer)}


def load_state_file(path, cfg: ModelConfig | None = None) -> list[Tensor]:
    """The per-layer initial WKV states [H, N, N] (fp32, S[value, key]) of a state file; checked against ``cfg``."""
    p = Path(path)
    obj = _load_file(p, "state file")
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{_name(p)} is not a state file (no dict of tensors)", "give a file written by ./merge.sh "
                        "for a state-tuning run (merge/<model>-state-N.pth)")
    if META_KEY in obj:
        raise UserError(f"{_name(p)} is a training checkpoint, not a state file",
                        "use --adapter for it, or ./merge.sh to write the state file")
    states = {k: v for k, v in obj.items() if isinstance(k, str) and k.endswith(STATE_SUFFIX)}
    if not states or len(states) != len(obj):
        other = next((k for k in obj if k not in states), None)
        raise UserError(f"{_name(p)} is not a state file" + (f" (it has {other!r})" if other else ""),
                        "a state file holds only blocks.N.att.time_state keys (./merge.sh writes one for state tuning)")
    n = len(states)
    if set(states) != {state_key(i) for i in range(n)}:
        raise UserError(f"{_name(p)}: the time_state keys do not cover layers 0..{n - 1}", "give the complete file")
    out = [states[state_key(i)].float() for i in range(n)]
    if cfg is not None:
        want = (cfg.n_head, cfg.head_size, cfg.head_size)
        if n != cfg.n_layer or any(tuple(s.shape) != want for s in out):
            raise UserError(f"{_name(p)} holds {n} states of shape {list(out[0].shape)}, but the model has "
                            f"{cfg.n_layer} layers with states {list(want)}: it belongs to another model",
                            "use the state file made for this base model")
    return out


def attach_state_file(model: RWKV, path) -> None:
    """Make the states of a state file the model's initial state (as state tuning's time_state parameters)."""
    states = load_state_file(path, model.cfg)
    for blk, s in zip(model.blocks, states):
        blk.att.time_state = torch.nn.Parameter(s.to(model.device), requires_grad=False)


@dataclass
class MergeResult:
    checkpoint: Path
    base: Path
    meta: dict
    version: int
    model: Path | None = None       # the merged model (None for state tuning without STATE_MODEL)
    state: Path | None = None       # the state file (state tuning)
    notes: list = field(default_factory=list)


MERGED_FROM = ".merged-from.json"     # MERGE_DIR: which checkpoint each file there was merged from


def _merged_from(merge_dir: Path) -> dict:
    import json
    try:
        got = json.loads((merge_dir / MERGED_FROM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def _check_merge_targets(targets: list[Path], source: str, overwrite: bool) -> None:
    """A merge replaces a file in MERGE_DIR only where it was merged from the same checkpoint (merging it again,
    in another DTYPE say), or when told (OVERWRITE=1): a file of another run is never replaced silently."""
    if overwrite:
        return
    for t in targets:
        if t.exists():
            was = _merged_from(t.parent).get(t.name)
            if was != source:
                raise UserError(f"{t} exists already, merged from {was or 'another checkpoint'}; merging {source} "
                                "would replace it.", "set MERGE_DIR to another folder, move that file away, or "
                                "OVERWRITE=1 ./merge.sh ... to replace it")


def _record_merged_from(targets: list[Path], source: str) -> None:
    import json

    from .files import write_bytes
    if not targets:
        return
    record = _merged_from(targets[0].parent)
    record.update({t.name: source for t in targets})
    write_bytes(targets[0].parent / MERGED_FROM, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def merge_checkpoint(checkpoint, model_dir="model", merge_dir="merge", dtype: str = "bf16", base=None,
                     state_model: bool = False, tag: str | None = None, overwrite: bool = False) -> MergeResult:
    """Merge one training checkpoint with its base model and write the results (see the section comment).

    ``dtype``: "bf16" | "fp16" | "fp32" for every tensor written. ``base``: override of the base model (path or a
    name in ``model_dir``). ``state_model``: for state tuning, also write the base model with the state inside.
    ``tag``: the EPOCH part of the names (default: from the checkpoint's file name). Files are written atomically
    and only after every check has passed; a file in ``merge_dir`` merged from another checkpoint is replaced only
    with ``overwrite``."""
    if dtype not in DTYPES:
        raise UserError(f"DTYPE={dtype!r} is not one of {', '.join(DTYPES)}", "set DTYPE=bf16 in merge.sh")
    check_name_lengths("MERGE_DIR", merge_dir, "set MERGE_DIR in merge.sh to a shorter folder name")
    above = next((q for q in (Path(merge_dir), *Path(merge_dir).parents) if q.exists()), Path("."))
    if not above.is_dir():
        raise UserError(f"MERGE_DIR={merge_dir}: {above} is a file, not a folder, so nothing can be written there",
                        "set MERGE_DIR in merge.sh to a folder (default merge), or move the file away")
    ckpt = Path(checkpoint)
    tensors, meta = read_training_checkpoint(ckpt)
    method = meta.get("method")
    if method not in MERGE_METHODS_WITH_MODEL + ("state",):
        raise UserError(f"{ckpt} records the method {method!r}, which this version cannot merge",
                        "update rwkv-peft-simple")
    base_path = find_base_model(meta, model_dir, base, where=_name(ckpt))
    base_sd = load_checkpoint(base_path)
    cfg = detect_config(base_sd, base_path)
    rec = meta.get("base", {})
    for k, got in (("vocab_size", cfg.vocab_size), ("head_size", cfg.head_size)):
        if rec.get(k) is not None and rec[k] != got:
            raise UserError(f"{ckpt} was trained on {rec.get('name')} ({k.replace('_', ' ')} {rec[k]}) but "
                            f"{base_path} has {k.replace('_', ' ')} {got}", f"use the base model {rec.get('name')}")
    if rec:
        check_base(meta, base_path, base_sd, where=_name(ckpt))
    try:
        merged = merge_state_dicts(base_sd, tensors, meta, DTYPES[dtype])
        detect_config(merged, "the merged model")                        # self-check of the layout
        states = state_file_dict(merged, cfg.n_layer) if method == "state" else {}
    except UserError as err:
        raise UserError(f"{ckpt} does not fit the base model {base_path}: {err.message}", err.fix) from None
    if tag is None:
        name = ckpt.name
        tag = name[len("rwkv-"):-len(".pth")] if name.startswith("rwkv-") and name.endswith(".pth") else ckpt.stem
    stem = base_path.name[:-len(".pth")] if base_path.name.endswith(".pth") else base_path.name
    out_dir = Path(merge_dir)
    res = MergeResult(ckpt, base_path, meta, cfg.version)
    source = str(ckpt.resolve())
    for name in (f"{stem}-state-{tag}.pth", f"{stem}-state-{tag}-model.pth", f"{stem}-{method}-{tag}.pth"):
        if (out_dir / name).is_dir():
            raise UserError(f"{out_dir / name} is a folder, so the merged file cannot be written under that name",
                            f"move or rename the folder {out_dir / name}")
    if method == "state":
        parts = [k for k in tensors if not k.endswith(STATE_SUFFIX)]
        res.state = out_dir / f"{stem}-state-{tag}.pth"
        if parts and not state_model:
            state_model = True
            res.notes.append(f"the run also trained {len(parts)} other tensors (TRAIN_PARTS {' '.join(meta.get('train_parts', []))}): "
                             "the state file alone is not the trained model, so the model with the state is written too")
        if state_model:
            res.model = out_dir / f"{stem}-state-{tag}-model.pth"
        if cfg.version == 7:
            res.notes.append("RWKV-7: the rwkv pip package ignores time_state keys in a model file (it starts from "
                             "zero); give it the state file as the initial state instead. Ai00 reads them.")
    else:
        res.model = out_dir / f"{stem}-{method}-{tag}.pth"
    targets = [p for p in (res.state, res.model) if p is not None]
    _check_merge_targets(targets, source, overwrite)
    from .files import sweep_temps
    for p in sweep_temps(out_dir):
        res.notes.append(f"removed {p.name}, a temporary file left by a merge that was killed while writing")
    with interrupt_deferred():      # the state file and the model with it: both, even on Ctrl+C
        if res.state is not None:
            save_atomic(states, res.state)
        if res.model is not None:
            save_atomic(release_state_dict(merged, cfg, with_state=method == "state"), res.model)
        _record_merged_from(targets, source)
    return res


def merge_epoch(epoch, output_dir="output", model_dir="model", merge_dir="merge", dtype: str = "bf16", base=None,
                state_model: bool = False, overwrite: bool = False) -> MergeResult:
    """``./merge.sh EPOCH``: ``merge_checkpoint(output_dir/rwkv-EPOCH.pth, ...)``."""
    path = checkpoint_path(output_dir, epoch)
    return merge_checkpoint(path, model_dir, merge_dir, dtype, base, state_model, overwrite=overwrite)


def merge_usage_text(res) -> str:
    """How to use what merge wrote: RWKV-Runner, Ai00, the rwkv package."""
    v7 = res.version == 7
    env = 'import os; os.environ["RWKV_V7_ON"] = "1"   # RWKV-7: before importing rwkv\n    ' if v7 else ""
    lines = []
    if res.state is not None:
        shape = "s" if v7 else "s.transpose(1, 2)"
        lines += [
            f"Use the state file {res.state} with the base model {res.base}:",
            "  RWKV-Runner: copy both into its models/ folder; in Configs choose the base model as the model",
            "               and the state file as its state (state-tuned model).",
            "  Ai00: convert the state file with convert_safetensors.py too, and list the .st under [[state]]",
            "        in Ai00's Config.toml next to the base model.",
            "  the rwkv package: start every prompt from the tuned state (layer i's WKV state is state[3*i+1]):",
            f"    import torch; {env.strip() + chr(10) + '    ' if env else ''}from rwkv.model import RWKV",
            f"    model = RWKV(model=\"{str(res.base)[:-len('.pth')] if str(res.base).endswith('.pth') else res.base}\", "
            "strategy=\"cpu fp32\"); st = torch.load(\"" + str(res.state) + "\")",
            "    state = [None] * (3 * model.args.n_layer); C = model.args.n_embd",
            "    for i in range(model.args.n_layer): s = st[f'blocks.{i}.att.time_state'].float(); "
            f"state[3*i:3*i+3] = [torch.zeros(C), {shape}.contiguous(), torch.zeros(C)]",
            "    logits, state = model.forward([token ids], state)",
        ]
    if res.model is not None:
        if lines:
            lines.append("")
        path = str(res.model)[:-len(".pth")]
        lines += [
            f"Use {res.model}" + (" (the base model with the tuned state inside):" if res.state else ":"),
            "  RWKV-Runner: copy it into RWKV-Runner's models/ folder and choose it as the model in Configs.",
            "  Ai00: convert it with Ai00's convert_safetensors.py (--input FILE.pth --output FILE.st) and set",
            "        model_path to the .st file in Ai00's Config.toml.",
            "  the rwkv package (pip install rwkv):",
            f"    {env}from rwkv.model import RWKV",
            f"    model = RWKV(model=\"{path}\", strategy=\"cuda fp16\")   # or \"cpu fp32\"; the path without .pth",
            "    logits, state = model.forward([token ids], None)",
        ]
    return "\n".join(lines)
