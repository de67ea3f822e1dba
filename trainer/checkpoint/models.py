"""Model files: loading (weights only), size and version detection, atomic saving, new random models."""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import UserError, check_name_lengths
from ..model import RWKV, ModelConfig, init_weights_
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
        cfg.deep_embed = _deep_embed_rank(sd, where)
    _check_layout(sd, cfg, where)
    return cfg


def _deep_embed_rank(sd: Mapping[str, Tensor], where: str) -> int:
    """An RWKV-7 file's DeepEmbed rank (RWKV-7a: ``blocks.N.ffn.s1`` [C, r], trainer/deepembed.py), 0 for a plain
    RWKV-7; RWKV-7b (DeepEmbedAttention, ``blocks.N.qkv.*``) is refused."""
    if any(k.startswith("blocks.") and ".qkv." in k for k in sd):
        raise UserError(f"{where} is an RWKV-7b model (DeepEmbedAttention: 'blocks.N.qkv.' keys), which is not "
                        "supported: its attention keeps a cache that grows with the text, so state tuning, infctx "
                        "training and the carried state do not work as they are",
                        "use an RWKV-7 or RWKV-7a (DeepEmbed) model")
    s1 = sd.get("blocks.0.ffn.s1")
    if s1 is None:
        return 0
    if s1.dim() != 2 or s1.shape[1] < 1:
        raise UserError(f"{where}: 'blocks.0.ffn.s1' has shape {list(s1.shape)}, expected [n_embd, rank] for an "
                        "RWKV-7a (DeepEmbed) model", "the file is damaged or has a layout we do not support")
    return int(s1.shape[1])


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
    from ..files import atomic_write
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


