"""./merge.sh's work: a checkpoint and its base model into a model (or a state file) the RWKV tools run."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..choices import METHODS
from ..errors import UserError, check_name_lengths, interrupt_deferred
from ..model import RWKV, ModelConfig

from .models import (DTYPES, _load_file, _name, detect_config, expected_shapes, load_checkpoint, save_atomic)
from .imports import STATE_SUFFIX, check_given_alpha, read_adapter, state_key
from .runs import META_KEY, check_base

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
MERGE_METHODS_WITH_MODEL = tuple(m for m in METHODS if m != "state")   # state files are used beside the model


def list_epochs(output_dir) -> list[str]:
    """The epochs saved in ``output_dir`` ("0", "1", ..., then "interrupted" and "best" where there are such)."""
    d = Path(output_dir)
    tags = [p.name[len("rwkv-"):-len(".pth")] for p in d.glob("rwkv-*.pth") if p.is_file()] if d.is_dir() else []
    nums = sorted(int(t) for t in tags if t.isdigit())
    return [str(n) for n in nums] + [t for t in ("interrupted", "best") if t in tags]


def checkpoint_path(output_dir, epoch) -> Path:
    """``output_dir/rwkv-EPOCH.pth``; a missing one is refused with the epochs that exist."""
    tag = str(epoch).strip()
    if not (tag.isascii() and tag.isdigit() or tag in ("interrupted", "best")):
        raise UserError(f"EPOCH must be an epoch number, 'interrupted' or 'best', not {tag[:40]!r}",
                        "e.g. ./merge.sh 0")
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
    from ..quant import dequantised_base
    return dequantised_base(base_sd, quant, dict(adapter))


def _group(key: str) -> str:
    parts = key.split(".")
    return f"blocks.{parts[1]}" if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else ""


def merge_state_dicts(base_sd: Mapping[str, Tensor], tensors: Mapping[str, Tensor], meta: dict,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The merged state dict (base keys, plus time_state keys for state tuning) in ``dtype``.

    The method's own ``merge`` runs in fp32, one block at a time (so a large model needs only one block in fp32
    at once), on the base as training saw it (``base_as_trained``)."""
    from ..peft import get_method
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
    deep_embed: bool = False        # RWKV-7a (DeepEmbed): the rwkv package needs RWKV_DE_VERSION=1


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

    from ..files import write_bytes
    if not targets:
        return
    record = _merged_from(targets[0].parent)
    record.update({t.name: source for t in targets})
    write_bytes(targets[0].parent / MERGED_FROM, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def _read_for_merge(ckpt: Path, model_dir, base, lora_alpha, pissa_init) -> tuple:
    """The checkpoint (ours, or another tool's converted: imports.py) and the base model it is merged into, checked
    to belong together: (tensors, meta, base path, base state dict, its ModelConfig, notes)."""
    tensors, meta = read_adapter(ckpt, lora_alpha=lora_alpha, pissa_init=pissa_init)
    check_given_alpha(meta, lora_alpha, _name(ckpt))
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
    notes = []
    if rec:
        check_base(meta, base_path, base_sd, where=_name(ckpt))
    else:
        notes.append(f"{ckpt} is {meta.get('converted_from', 'a file of another tool')}: it records no base model, "
                     f"so only the shapes of BASE={base_path} could be checked, not that it is the model it was "
                     "trained on")
    from ..deepembed import rank_note
    notes += [n for n in [rank_note(cfg.deep_embed, base_path)] if n]     # a 7a rank the rwkv package lacks
    return tensors, meta, base_path, base_sd, cfg, notes


def merge_checkpoint(checkpoint, model_dir="model", merge_dir="merge", dtype: str = "bf16", base=None,
                     state_model: bool = False, tag: str | None = None, overwrite: bool = False,
                     lora_alpha: float | None = None, pissa_init=None) -> MergeResult:
    """Merge one training checkpoint with its base model and write the results (see the section comment).

    ``dtype``: "bf16" | "fp16" | "fp32" for every tensor written. ``base``: override of the base model (path or a
    name in ``model_dir``). ``state_model``: for state tuning, also write the base model with the state inside.
    ``tag``: the EPOCH part of the names (default: from the checkpoint's file name). Files are written atomically
    and only after every check has passed; a file in ``merge_dir`` merged from another checkpoint is replaced only
    with ``overwrite``. ``lora_alpha``, ``pissa_init``: what an RWKV-PEFT LoRA / PiSSA file does not record
    (imports.py)."""
    if dtype not in DTYPES:
        raise UserError(f"DTYPE={dtype!r} is not one of {', '.join(DTYPES)}", "set DTYPE=bf16 in merge.sh")
    check_name_lengths("MERGE_DIR", merge_dir, "set MERGE_DIR in merge.sh to a shorter folder name")
    above = next((q for q in (Path(merge_dir), *Path(merge_dir).parents) if q.exists()), Path("."))
    if not above.is_dir():
        raise UserError(f"MERGE_DIR={merge_dir}: {above} is a file, not a folder, so nothing can be written there",
                        "set MERGE_DIR in merge.sh to a folder (default merge), or move the file away")
    ckpt = Path(checkpoint)
    tensors, meta, base_path, base_sd, cfg, notes = _read_for_merge(ckpt, model_dir, base, lora_alpha, pissa_init)
    method = meta["method"]
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
    res = MergeResult(ckpt, base_path, meta, cfg.version, notes=notes, deep_embed=bool(cfg.deep_embed))
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
    from ..files import sweep_temps
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
                state_model: bool = False, overwrite: bool = False, lora_alpha: float | None = None,
                pissa_init=None) -> MergeResult:
    """``./merge.sh EPOCH``: ``merge_checkpoint(output_dir/rwkv-EPOCH.pth, ...)``."""
    path = checkpoint_path(output_dir, epoch)
    return merge_checkpoint(path, model_dir, merge_dir, dtype, base, state_model, overwrite=overwrite,
                            lora_alpha=lora_alpha, pissa_init=pissa_init)


def merge_usage_text(res) -> str:
    """How to use what merge wrote: RWKV-Runner, Ai00, the rwkv package."""
    v7 = res.version == 7
    env = 'import os; os.environ["RWKV_V7_ON"] = "1"   # RWKV-7: before importing rwkv\n    ' if v7 else ""
    if res.deep_embed:    # without it the package runs a 7a file as plain RWKV-7, silently wrong
        env = ('import os; os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_DE_VERSION"] = "1"   # RWKV-7a '
               '(DeepEmbed): both before importing rwkv\n    ')
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
            *(["  RWKV-7a (DeepEmbed): RWKV-Runner and Ai00 run it only in their versions that know RWKV-7a."]
              if res.deep_embed else []),
            "  the rwkv package (pip install rwkv):",
            f"    {env}from rwkv.model import RWKV",
            f"    model = RWKV(model=\"{path}\", strategy=\"cuda fp16\")   # or \"cpu fp32\"; the path without .pth",
            "    logits, state = model.forward([token ids], None)",
        ]
    return "\n".join(lines)
