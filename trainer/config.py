"""The one validated training config.

``training.sh`` exports its annotated variables (``set -a``) and calls ``python -m tools.train``; this
module turns those variables into one ``TrainConfig``, checks every value and every combination, and
raises ``UserError`` with a one-line message naming the variable and the fix. The trainer, the dry run
and the web page all use this object; every rule and its message lives here.

Validation has two stages, both before any model is built:
  ``TrainConfig.from_env(env)``   types, ranges, choices, combinations of settings;
  ``cfg.check_files()``            the model and data files exist; sizes read from the checkpoint header
                                   and the data index (cheap, memory-mapped) fit the settings.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError, check_name_lengths

from .choices import (COMPILES, DATALOADS, GRAD_CPS, LORA_SCALINGS, LOSS_MASKS, OPTIMIZERS, PARTS,  # noqa: F401
                      PRECISIONS, QUANTS, SCHEDULES, STRATEGIES, TRAIN_TYPES)
from .choices import METHODS as MODES
# Options whose variable has its place in training.sh but whose code has not landed yet. They are refused
# with this reason, never silently ignored; each entry goes when its feature lands.
NOT_YET_AVAILABLE: dict[str, str] = {}
# Upper bounds of the whole-number settings: far beyond any real run, so that a typo (an extra digit, a value
# pasted into the wrong variable) is refused with its name instead of failing deep inside NumPy or PyTorch.
MAX_SEED = 2**63 - 1          # torch seeds are 64-bit; the trainer also seeds SEED + 1 + rank
MAX_WHOLE = 2**31 - 1         # any other whole number (steps, epochs, ranks, batch sizes, GPUs)
MAX_CTX = 2**24               # tokens of one sample (CTX_LEN, CHUNK_CTX, INITIAL_CTX_LEN): 16M
MAX_SVD_NITER = 64            # PiSSA's power iterations (4 is plenty; each one is a pass over every weight)


def grad_cp_mode(value: Any) -> str:
    """GRAD_CP as one of GRAD_CPS: 0/1 also as a bool, a number or yes/no/true/false/on/off; anything else
    unchanged (validate names it)."""
    if isinstance(value, bool) or isinstance(value, int):
        return "1" if value else "0"
    low = str(value).strip().lower()
    return {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(low, low)


def _var(help_: str, **kw: Any) -> Any:
    return field(metadata={"help": help_}, **kw)


@dataclass
class TrainConfig:
    # paths
    MODEL: str = _var("base model: a .pth file in model/ (or a path)", default="")
    DATA: str = _var("training data: the binidx name in data/ (data/NAME.bin + .idx)", default="")
    OUTPUT: str = _var("folder for checkpoints, loss.csv and the loss plot", default="output")
    INIT_ADAPTER: str = _var("start a new run from a trained adapter file (output/rwkv-N.pth, a state file, an "
                             "RWKV-PEFT adapter) instead of a fresh one; empty = off", default="")
    PISSA_INIT: str = _var("INIT_ADAPTER of RWKV-PEFT's PiSSA: the init_pissa.pth it wrote beside it", default="")
    # method
    FINETUNE_MODE: str = _var(" | ".join(MODES) + " (miss: Bone's current name)", default="lora")
    LORA_R: int = _var("LoRA rank (lora, dora)", default=64)
    LORA_ALPHA: float = _var("LoRA alpha; the update is scaled by alpha / r", default=128.0)
    LORA_DROPOUT: float = _var("dropout on the LoRA path, 0 to 0.5", default=0.0)
    LORA_SCALING: str = _var("standard (alpha / r) | rslora (alpha / sqrt(r)); lora and dora", default="standard")
    PISSA_R: int = _var("PiSSA rank", default=64)
    SVD_NITER: int = _var("power iterations of PiSSA's fast randomized SVD", default=4)
    DISHA_R: int = _var("DiSHA (Bone/Bat) block size; must divide the layer widths", default=64)
    TRAIN_PARTS: tuple[str, ...] = _var("extra parts to train: any of emb head time ln deepembed", default=())
    # data
    CTX_LEN: int = _var("tokens per training sample", default=512)
    DATALOAD: str = _var("get | pad | only", default="pad")
    LOSS_MASK: str = _var("none | pad | qa", default="pad")
    VALID_DATA: str = _var("validation data: a binidx name in data/ (e.g. NAME.valid from make_tokenize.sh --valid); "
                           "empty = none", default="")
    VALID_FRACTION: float = _var("hold this share of DATA's items out for validation (0 = none); the choice follows "
                                 "SEED", default=0.0)
    VALID_EVERY: int = _var("validate every N optimizer steps (and after the last); 0 = at every save", default=0)
    EARLY_STOP: int = _var("stop (saving as on Ctrl+C) after N validations without a better loss; 0 = never",
                           default=0)
    # schedule
    MICRO_BSZ: int = _var("samples per GPU per step", default=1)
    MINI_BSZ: int = _var("gradient accumulation: micro-batches per optimizer step", default=1)
    EPOCH_COUNT: int = _var("number of epochs", default=1)
    EPOCH_STEPS: int = _var("steps (micro-batches) per epoch", default=100)
    EPOCH_SAVE: int = _var("save a checkpoint every N epochs", default=1)
    LR_INIT: float = _var("learning rate at the start (after warm-up)", default=1e-4)
    LR_FINAL: float = _var("learning rate at the end", default=1e-5)
    WARMUP_STEPS: int = _var("optimizer steps of linear warm-up", default=0)
    LR_SCHEDULE: str = _var("cos | wsd | const", default="cos")
    WEIGHT_DECAY: float = _var("AdamW's weight decay, on the trained matrices only (strategy.decays); 0 = off",
                               default=0.0)
    BETA1: float = _var("AdamW's beta1: how slowly its running mean of the gradient moves, 0 to below 1",
                        default=0.9)
    BETA2: float = _var("AdamW's beta2: how slowly its running mean of the squared gradient moves, 0 to below 1",
                        default=0.99)
    ADAM_EPS: float = _var("AdamW's eps, added to the root of that mean: more than 0", default=1e-8)
    L2WRAP: bool = _var("1 = RWKV-LM's L2Wrap: a small extra gradient on each position's largest logit keeps "
                        "the logits from drifting up (the loss is unchanged)", default=True)
    # long context (issue: infctx)
    TRAIN_TYPE: str = _var("normal | infctx", default="normal")
    CHUNK_CTX: int = _var("infctx: tokens per chunk", default=512)
    INITIAL_CTX_LEN: int = _var("infctx warm-up: starting CTX_LEN (0 = off)", default=0)
    CTX_WARMUP_STEPS: int = _var("infctx warm-up: steps to grow to CTX_LEN", default=0)
    # hardware
    OP: str = _var("WKV kernel: auto | triton | fla | rwkvfla | chunk | torch", default="auto")
    PRECISION: str = _var("auto (bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU) | bf16 | fp16 "
                          "| fp32", default="auto")
    GRAD_CP: str = _var("gradient checkpointing: 1 saves memory, 0 is faster, auto checkpoints only the blocks "
                        "that must be to fit in the GPU's memory", default="auto")
    COMPILE: str = _var("torch.compile the blocks: auto (on a GPU) | 1 | 0", default="auto")
    QUANT: str = _var("none | int8 | nf4 | fp8: store the frozen base weights quantised", default="none")
    OPTIMIZER: str = _var("adamw | adamw8bit: AdamW's two states in 8 bits (bitsandbytes; NVIDIA GPU)",
                          default="adamw")
    OFFLOAD_BLOCKS: str = _var("blocks whose frozen weights stay in CPU memory, copied to the GPU as they run: "
                               "auto (only when the model would not fit otherwise) | 0 | a number", default="auto")
    STRATEGY: str = _var("auto | deepspeed_stage_1 | ... (several GPUs)", default="auto")
    GPU_COUNT: int = _var("GPUs per node", default=1)
    NODES: int = _var("machines", default=1)
    ACCELERATOR: str = _var("auto | cuda | cpu", default="auto")
    SEED: int = _var("random seed", default=42)
    WANDB: str = _var("wandb project name; empty = off", default="")
    RESUME: bool = _var("1 = continue from the newest checkpoint in OUTPUT", default=False)
    OVERWRITE: bool = _var("1 = a new run (RESUME=0) may replace an earlier run's files in OUTPUT", default=False)
    SAMPLE_PROMPT: str = _var("prompt for the sample generated at each save",
                              default="User: Hello, who are you?\n\nAssistant:")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "TrainConfig":
        """Read every known variable from ``env`` (default: os.environ), convert and validate."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif env.get(f.name) is not None and (str(env[f.name]).strip() != "" or f.type == "str"):
                values[f.name] = _convert(f, env[f.name])  # an empty number keeps its default
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_env(self) -> dict[str, str]:
        """The config as training.sh variables (what the web page writes back)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = " ".join(v) if isinstance(v, tuple) else (str(int(v)) if isinstance(v, bool) else str(v))
        return out

    # ------------------------------------------------------------------ rules
    def validate(self) -> None:
        self.GRAD_CP = grad_cp_mode(self.GRAD_CP)
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            val = getattr(self, name)
            if val not in allowed:
                raise UserError(f"{name}={val!r} is not one of: {' | '.join(allowed)}.",
                                f"set {name} in training.sh to one of those")

        def positive(name: str, zero_ok: bool = False) -> None:
            val = getattr(self, name)
            if val < 0 or (val == 0 and not zero_ok):
                raise UserError(f"{name}={val} must be {'0 or more' if zero_ok else 'more than 0'}.",
                                f"set {name} in training.sh to a {'non-negative' if zero_ok else 'positive'} number")

        for name, allowed in (("FINETUNE_MODE", MODES), ("DATALOAD", DATALOADS), ("LOSS_MASK", LOSS_MASKS),
                              ("LR_SCHEDULE", SCHEDULES), ("PRECISION", PRECISIONS),
                              ("TRAIN_TYPE", TRAIN_TYPES), ("QUANT", QUANTS), ("STRATEGY", STRATEGIES),
                              ("OPTIMIZER", OPTIMIZERS), ("ACCELERATOR", ("auto", "cuda", "cpu")),
                              ("COMPILE", COMPILES), ("GRAD_CP", GRAD_CPS), ("LORA_SCALING", LORA_SCALINGS)):
            choice(name, allowed)
        self._check_scaling()
        for p in self.TRAIN_PARTS:
            if p not in PARTS:
                raise UserError(f"TRAIN_PARTS has {p!r}, which is not one of: {' '.join(PARTS)}.",
                                'write e.g. TRAIN_PARTS="time ln", or leave it empty')
        for name in ("LORA_R", "PISSA_R", "DISHA_R", "CTX_LEN", "MICRO_BSZ", "MINI_BSZ", "EPOCH_COUNT",
                     "EPOCH_STEPS", "EPOCH_SAVE", "GPU_COUNT", "NODES", "CHUNK_CTX"):
            positive(name)
        for name in ("SVD_NITER", "WARMUP_STEPS", "INITIAL_CTX_LEN", "CTX_WARMUP_STEPS", "SEED", "VALID_EVERY",
                     "EARLY_STOP"):
            positive(name, zero_ok=True)
        from .validate import check_settings    # the validation set's rules likewise
        check_settings(self)
        self._check_sizes()
        if not (self.LORA_ALPHA > 0 and math.isfinite(self.LORA_ALPHA)):
            raise UserError(f"LORA_ALPHA={self.LORA_ALPHA} must be a number more than 0.",
                            "a common choice is 2 × LORA_R")
        if not 0 <= self.LORA_DROPOUT < 1:
            raise UserError(f"LORA_DROPOUT={self.LORA_DROPOUT} must be at least 0 and below 1.",
                            "use 0 (off) or a small value such as 0.05")
        for name in ("LR_INIT", "LR_FINAL"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"{name}={v} must be a positive number.", "e.g. LR_INIT=1e-4 LR_FINAL=1e-5 for LoRA")
        if self.LR_FINAL > self.LR_INIT:
            raise UserError(f"LR_FINAL={self.LR_FINAL} is larger than LR_INIT={self.LR_INIT}.",
                            "the learning rate decays from LR_INIT to LR_FINAL: make LR_FINAL <= LR_INIT")
        if self.DATALOAD == "only" and self.MICRO_BSZ > 1:
            raise UserError(f"DATALOAD=only trains one item per step, but MICRO_BSZ={self.MICRO_BSZ}.",
                            "set MICRO_BSZ=1 (use MINI_BSZ to accumulate), or DATALOAD=pad")
        from .infctx import check_infctx      # infctx and ctx warm-up rules live beside their code
        check_infctx(self)
        from .quant import check_quant        # quantisation rules likewise (the device is checked later)
        check_quant(self.QUANT, self.FINETUNE_MODE)
        from .strategy import check_optimizer, check_strategy  # DeepSpeed's and AdamW's rules likewise
        check_strategy(self)                  # (DeepSpeed installed? CUDA? checked at start)
        check_optimizer(self)
        from .offload import check_offload    # weight streaming likewise (the model's depth is checked at start)
        check_offload(self)
        self._check_init()
        if self.RESUME and self.OVERWRITE:
            raise UserError("RESUME=1 and OVERWRITE=1 contradict each other: continue the run in OUTPUT, or "
                            "replace it.", "set OVERWRITE=0 to continue it, or RESUME=0 to start afresh over it")
        self._check_names()
        if self.WANDB and not wandb_installed():
            raise UserError(f"WANDB={self.WANDB} but the wandb package is not installed.",
                            "pip install wandb (and run `wandb login` once), or set WANDB=\"\"")
        self._check_not_yet_available()

    def _check_names(self) -> None:
        """MODEL and DATA given; no NUL anywhere; the file and folder names short enough and names, not folders."""
        if not self.MODEL:
            raise UserError("MODEL is empty.", "set MODEL in training.sh to the base model's file name in model/")
        if not self.DATA:
            raise UserError("DATA is empty.", "set DATA in training.sh to your data's name in data/ "
                            "(make it with ./make_tokenize.sh FILE.jsonl)")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, str) and "\x00" in v:
                raise UserError(f"{f.name} holds a NUL character (\\x00), which no file name or setting may hold.",
                                f"retype {f.name}")
        names = [("MODEL", "rwkv7-g1-0.1b.pth"), ("DATA", "sample"), ("OUTPUT", "output")]
        for name, example in names + ([("VALID_DATA", "sample.valid")] if self.VALID_DATA else []):
            check_name_lengths(name, getattr(self, name), f"set {name} in training.sh to a shorter name")
            if not Path(getattr(self, name)).name:
                raise UserError(f"{name}={getattr(self, name)!r} names a folder, not a file name.",
                                f"set {name} in training.sh to a name, e.g. {name}=\"{example}\"")

    def _check_scaling(self) -> None:
        """LORA_SCALING=rslora changes how LORA_ALPHA scales the update: refused for a method without that scale."""
        from .peft import get_method
        if self.LORA_SCALING != "standard" and not get_method(self.FINETUNE_MODE).SCALED_BY_ALPHA:
            scaled = " or ".join(m for m in MODES if get_method(m).SCALED_BY_ALPHA)
            raise UserError(f"LORA_SCALING={self.LORA_SCALING} changes the LORA_ALPHA scaling of the update, which "
                            f"FINETUNE_MODE={self.FINETUNE_MODE} does not have (only {scaled} scale by alpha).",
                            f"set LORA_SCALING=standard, or FINETUNE_MODE to {scaled}")

    def _check_init(self) -> None:
        """INIT_ADAPTER and PISSA_INIT, without reading them (check_files reads them: init_adapter.load)."""
        if self.INIT_ADAPTER and self.RESUME:
            raise UserError(f"RESUME=1 and INIT_ADAPTER={self.INIT_ADAPTER} contradict each other: RESUME continues "
                            "the run in OUTPUT, which holds its own trained tensors; INIT_ADAPTER starts a new run.",
                            "set INIT_ADAPTER=\"\" to resume, or RESUME=0 with a new OUTPUT to start from the file")
        if self.PISSA_INIT and not self.INIT_ADAPTER:
            raise UserError(f"PISSA_INIT={self.PISSA_INIT} is set but INIT_ADAPTER is empty: it is read only with an "
                            "RWKV-PEFT PiSSA file as INIT_ADAPTER.", "set INIT_ADAPTER to that file, or PISSA_INIT=\"\"")
        if self.PISSA_INIT and self.FINETUNE_MODE != "pissa":
            raise UserError(f"PISSA_INIT={self.PISSA_INIT} is for FINETUNE_MODE=pissa, not {self.FINETUNE_MODE}.",
                            "set FINETUNE_MODE=pissa to start from an RWKV-PEFT PiSSA file, or PISSA_INIT=\"\"")
        for name in ("INIT_ADAPTER", "PISSA_INIT"):
            value = getattr(self, name)
            if value:
                check_name_lengths(name, value, f"set {name} in training.sh to a shorter path")
                if not Path(value).name:
                    raise UserError(f"{name}={value!r} names a folder, not a file.",
                                    f"set {name} to the file's path, e.g. {name}=\"output/rwkv-0.pth\"")

    def _check_sizes(self) -> None:
        """Whole numbers beyond any real run (MAX_SEED, MAX_CTX, MAX_SVD_NITER, MAX_WHOLE)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type != "int" or isinstance(v, bool):
                continue
            if f.name == "SEED":
                most, fix = MAX_SEED, "use a smaller seed, e.g. SEED=42"
            elif f.name in ("CTX_LEN", "CHUNK_CTX", "INITIAL_CTX_LEN"):
                most, fix = MAX_CTX, (f"use the CTX_LEN make_tokenize.sh suggested (e.g. 1024 to 4096); longer texts "
                                      f"train with TRAIN_TYPE=infctx, up to {MAX_CTX} tokens")
            elif f.name == "SVD_NITER":
                most, fix = MAX_SVD_NITER, "SVD_NITER=4 is plenty"
            else:
                most, fix = MAX_WHOLE, f"set {f.name} in training.sh to a smaller number"
            if v > most:
                raise UserError(f"{f.name}={v} is too large: at most {most}.", fix)

    def _check_not_yet_available(self) -> None:
        """Options whose place is kept but whose code has not landed: refused, never silently ignored."""
        for name, default in (("TRAIN_TYPE", "normal"), ("QUANT", "none"), ("STRATEGY", "auto")):
            if getattr(self, name) != default and name in NOT_YET_AVAILABLE:
                raise UserError(f"{name}={getattr(self, name)} is not available in this version: "
                                f"{NOT_YET_AVAILABLE[name]}.", f"set {name}={default} in training.sh")
        if self.world_size > 1 and "GPU_COUNT" in NOT_YET_AVAILABLE:
            raise UserError(f"GPU_COUNT={self.GPU_COUNT} NODES={self.NODES}: {NOT_YET_AVAILABLE['GPU_COUNT']}.",
                            "set GPU_COUNT=1 NODES=1")

    # ------------------------------------------------------------------ derived
    @property
    def checkpointing(self) -> bool:
        """GRAD_CP is 1 or auto: the blocks (all, or the bottom ones) are checkpointed."""
        return self.GRAD_CP != "0"

    @property
    def model_path(self) -> Path:
        p = Path(self.MODEL)
        if p.suffix != ".pth":
            p = p.with_name(p.name + ".pth")
        if p.exists() or p.is_absolute() or p.parent != Path("."):
            return p
        return Path("model") / p

    @property
    def data_prefix(self) -> Path:
        return _data_path(self.DATA)

    @property
    def valid_prefix(self) -> Path | None:
        """VALID_DATA's binidx prefix (looked up in data/ as DATA is), or None."""
        if not self.VALID_DATA:
            return None
        return _data_path(self.VALID_DATA)

    @property
    def has_validation(self) -> bool:
        return bool(self.VALID_DATA) or self.VALID_FRACTION > 0

    @property
    def output_dir(self) -> Path:
        return Path(self.OUTPUT)

    @property
    def world_size(self) -> int:
        return self.GPU_COUNT * self.NODES

    def check_files(self) -> None:
        """The model and data exist; their sizes fit the settings; OUTPUT can take this run (check_output).
        Raises UserError, reads headers only."""
        mp = self.model_path
        given = Path(self.MODEL)
        if given.suffix != ".pth" and given.is_file():
            raise UserError(f"MODEL={self.MODEL} is a {given.suffix or 'plain'} file, not a model (.pth).",
                            "set MODEL to the base model's .pth file in model/")
        if not mp.is_file():
            folder = mp.parent if mp.parent.is_dir() else Path("model")
            have = sorted(x.name for x in folder.glob("*.pth") if x.is_file()) if folder.is_dir() else []
            raise UserError(f"MODEL: {_why_not_a_file(mp)}. Models in {folder}/: {', '.join(have) or 'none'}.",
                            "put the base model .pth in model/ and set MODEL to its file name")
        _check_binidx("DATA", self.data_prefix, "make it with ./make_tokenize.sh FILE.jsonl and set DATA to FILE's name")
        if self.VALID_DATA:
            _check_binidx("VALID_DATA", self.valid_prefix, "make it with ./make_tokenize.sh FILE --valid 0.05 (it "
                          "writes NAME.valid) or from a held-out file, or use VALID_FRACTION")
        self._check_data_fits()
        self.check_output()
        if self.INIT_ADAPTER:
            from .init_adapter import load
            load(self)                  # the file, its method, settings, base and TRAIN_PARTS (read, not applied)

    def _check_output(self) -> None:
        """OUTPUT is a folder, or one can be made there (no file in the way, writable where it can be checked)."""
        out = self.output_dir
        if out.is_symlink() and not out.exists():
            raise UserError(f"OUTPUT={self.OUTPUT} is a link to {os.readlink(out)}, which does not exist.",
                            "set OUTPUT in training.sh to a folder, or make the folder the link points to")
        if out.exists() and not out.is_dir():
            raise UserError(f"OUTPUT={self.OUTPUT} is a file, not a folder: the checkpoints cannot be written there.",
                            f"set OUTPUT in training.sh to a folder name (e.g. OUTPUT=\"{out.name}-run\"), or move "
                            "the file away")
        above = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not above.is_dir():
            raise UserError(f"OUTPUT={self.OUTPUT} cannot be made: {above} is a file, not a folder.",
                            "set OUTPUT in training.sh to a folder name such as output/run1")
        if not os.access(above, os.W_OK | os.X_OK):
            raise UserError(f"OUTPUT={self.OUTPUT}: the folder {above} cannot be written to (permissions).",
                            f"set OUTPUT to a folder of yours, or give yourself write access (chmod u+w {above})")

    def check_output(self) -> None:
        """OUTPUT is (or can become) a folder, and holds no earlier run unless this one continues it (RESUME=1)
        or is told to replace it (OVERWRITE=1). RESUME=1 needs a run there to continue."""
        from .checkpoint import TRAIN_STATE, run_files
        self._check_output()
        out = self.output_dir
        found = run_files(out)
        if self.RESUME:
            if not (out / TRAIN_STATE).is_file():
                if self.NODES > 1 and os.environ.get("NODE_RANK", "0").strip() not in ("", "0"):   # not the first
                    raise UserError(f"RESUME=1 but this machine has nothing to resume in {out}/ (no {TRAIN_STATE}).",
                                    "with NODES > 1 every machine needs the run's files: make OUTPUT a folder the "
                                    "machines share, or copy it from the first machine (NODE_RANK=0) to the others")
                raise UserError(f"RESUME=1 but there is nothing to resume in {out}/ (no {TRAIN_STATE}).",
                                "set RESUME=0 to start a new run" + (" (with OVERWRITE=1 to replace the files there, "
                                                                     "or another OUTPUT)" if found else ""))
            return
        if found and not self.OVERWRITE:
            names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise UserError(f"OUTPUT={self.OUTPUT} already holds a training run ({names}); a new run (RESUME=0) "
                            "would overwrite it.", "set RESUME=1 to continue that run, set OUTPUT to a new folder, "
                            "or set OVERWRITE=1 to replace it")

    def _check_data_fits(self) -> None:
        from .data.dataset import data_facts, items_per_epoch
        from .validate import check_valid_data, split_data
        train, valid = split_data(self)            # VALID_FRACTION: the items left for training
        if valid is not None:
            check_valid_data(valid, str(self.valid_prefix) if self.VALID_DATA
                             else f"(VALID_FRACTION={self.VALID_FRACTION} of {self.data_prefix})")
        facts = data_facts(train)
        held = f" left for training (VALID_FRACTION={self.VALID_FRACTION} held out)" if self.VALID_FRACTION else ""
        if facts.longest < 2:
            raise UserError(f"{self.data_prefix} holds {facts.items} items" + (
                f", none with 2 tokens or more (the longest has {facts.longest}): there is nothing to train on."
                if facts.items else ", so there is nothing to train on."),
                "put text in the items of your data and run ./make_tokenize.sh on it again")
        per_epoch = items_per_epoch(self.EPOCH_STEPS, self.MICRO_BSZ, self.world_size)
        if self.DATALOAD in ("pad", "only") and per_epoch > facts.items:
            gpus = self.world_size
            per_step = self.MICRO_BSZ * gpus
            if gpus > facts.items:
                fix = (f"train on at most {facts.items} GPUs (GPU_COUNT × NODES), or tokenize with a higher "
                       "REPEAT")
            elif per_step > facts.items:
                bsz = facts.items // gpus
                fix = (f"lower MICRO_BSZ to at most {bsz} (then EPOCH_STEPS to at most "
                       f"{facts.items // (bsz * gpus)}; see the table make_tokenize.sh printed), or tokenize with a "
                       "higher REPEAT")
            else:
                fix = (f"lower EPOCH_STEPS to at most {facts.items // per_step} (see the table make_tokenize.sh "
                       "printed), or tokenize with a higher REPEAT")
            raise UserError(f"EPOCH_STEPS × MICRO_BSZ{' × GPUs' if gpus > 1 else ''} = {per_epoch} "
                            f"is more than the {facts.items} items in {self.data_prefix}{held}.", fix)
        if self.DATALOAD == "get" and facts.total_tokens < self.CTX_LEN + 1:
            raise UserError(f"DATALOAD=get needs at least CTX_LEN+1 = {self.CTX_LEN + 1} tokens, but "
                            f"{self.data_prefix} has {facts.total_tokens}.",
                            f"lower CTX_LEN below {facts.total_tokens}, or use DATALOAD=pad")

    def summary(self) -> str:
        lines = []
        for f in fields(self):
            v = getattr(self, f.name)
            shown = " ".join(v) if isinstance(v, tuple) else (int(v) if isinstance(v, bool) else v)
            if isinstance(shown, str) and ("\n" in shown or not shown.strip()):
                shown = repr(shown)
            lines.append(f"  {f.name:<17} = {shown!s:<24} # {f.metadata['help']}")
        return "\n".join(lines)


# RESUME=1 continues a saved run. What it may change, and why each change is honoured; every other setting must
# stay as the run was saved (the saved tensors, the optimizer's state and the data position depend on it).
RESUME_MAY_CHANGE: dict[str, str] = {
    "EPOCH_COUNT": "more or fewer epochs (the learning-rate schedule is stretched to the new length)",
    "EPOCH_SAVE": "when checkpoints are written",
    "LR_INIT": "the learning rate follows the new schedule from the next step on",
    "LR_FINAL": "the learning rate follows the new schedule from the next step on",
    "WARMUP_STEPS": "the learning rate follows the new schedule from the next step on",
    "LR_SCHEDULE": "the learning rate follows the new schedule from the next step on",
    "LORA_DROPOUT": "dropout applies from the next step on",
    "WEIGHT_DECAY": "AdamW's running means stay valid; the new decay applies from the next step on",
    "BETA1": "AdamW's running means stay valid; they move at the new rate from the next step on",
    "BETA2": "AdamW's running means stay valid; they move at the new rate from the next step on",
    "ADAM_EPS": "AdamW's running means stay valid; the new eps applies from the next step on",
    "L2WRAP": "L2Wrap's extra gradient applies (or not) from the next step on",
    "TRAIN_TYPE": "infctx computes the same gradient in chunks",
    "CHUNK_CTX": "infctx computes the same gradient in chunks of any size",
    "OP": "every WKV kernel computes the same function",
    "PRECISION": "the trained tensors are kept in fp32 whatever the precision",
    "GRAD_CP": "checkpointing changes memory and speed, not the result",
    "COMPILE": "compiling changes speed, not the result",
    "OFFLOAD_BLOCKS": "streaming weights changes memory and speed, not the result",
    "ACCELERATOR": "the saved state loads on any device",
    "WANDB": "logging only",
    "SAMPLE_PROMPT": "the sample at each save only",
    "VALID_DATA": "the validation from now on (the best loss so far was measured on the earlier set: it starts "
                  "afresh)",
    "VALID_EVERY": "when the validation runs",
    "EARLY_STOP": "when the run stops",
}


# Not compared on RESUME=1: the run's own switches; MODEL and DATA by their contents (resume.py), not their names;
# INIT_ADAPTER and PISSA_INIT only choose where a new run starts, and the saved unit holds the tensors since (a resume
# with INIT_ADAPTER set is refused by TrainConfig.validate, so the run's saved value is always "changed" to empty).
RESUME_IGNORES = ("RESUME", "OVERWRITE", "OUTPUT", "MODEL", "DATA", "INIT_ADAPTER", "PISSA_INIT")


def resume_changes(saved: Mapping[str, str], cfg: "TrainConfig") -> tuple[list[str], list[str]]:
    """(refused, honoured): the settings of ``cfg`` that differ from the ``saved`` run's (``to_env`` strings),
    each as "NAME old → new"; honoured ones end with why they are fine. A setting the saved run did not record
    (saved by an older version) is taken as unchanged."""
    now = cfg.to_env()
    refused, honoured = [], []
    for name in TrainConfig.names():
        if name not in saved or name in RESUME_IGNORES:
            continue
        old, new = str(saved[name]), now[name]
        if old == new or _same_value(old, new):
            continue
        line = f"{name} {old or '(empty)'} → {new or '(empty)'}"
        if name in RESUME_MAY_CHANGE:
            honoured.append(f"{line} ({RESUME_MAY_CHANGE[name]})")
        else:
            refused.append(line)
    return refused, honoured


def _same_value(a: str, b: str) -> bool:
    """1e-4 and 0.0001 are the same setting."""
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def wandb_installed() -> bool:
    """Whether ``import wandb`` can work (found, not imported: importing it takes seconds)."""
    import importlib.util
    import sys
    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def _check_binidx(var: str, dp: Path, fix: str) -> None:
    """``dp``.bin and .idx are files; else one line naming what is there instead, and the data that exists."""
    missing = [s for s in (".bin", ".idx") if not dp.with_name(dp.name + s).is_file()]
    if not missing:
        return
    folder = dp.parent
    have = sorted(x.stem for x in folder.glob("*.idx") if x.is_file()) if folder.is_dir() else []
    above = next((q for q in dp.parents if q.exists()), None)
    odd = [_why_not_a_file(dp.with_name(dp.name + s)) for s in missing]
    odd = [w for w in odd if not w.endswith(" not found")]
    what = (f"{dp} cannot exist: {above} is a file, not a folder" if above is not None and not above.is_dir()
            else "; ".join(odd) if odd else f"{dp}{'/'.join(missing)} not found")
    raise UserError(f"{var}: {what}. Data in {folder}/: {', '.join(have) or 'none'}.", fix)


def _data_path(name: str) -> Path:
    """A binidx named in training.sh (DATA, VALID_DATA): its prefix, looked up in data/ when it is a bare name."""
    p = Path(name)
    if p.suffix in (".bin", ".idx", ".jsonl"):
        p = p.with_suffix("")
    if p.parent == Path("."):
        p = Path("data") / p
    return p


def _why_not_a_file(p: Path) -> str:
    """Why ``p`` is not a readable file, in words: a folder, a broken link, below a file, or not found."""
    if p.is_dir():
        return f"{p} is a folder, not a file"
    if p.is_symlink() and not p.exists():
        return f"{p} is a link to {os.readlink(p)}, which does not exist"
    above = next((q for q in p.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        return f"{p} cannot exist: {above} is a file, not a folder"
    return f"{p} not found"


def _convert(f: dataclasses.Field, raw: str) -> Any:
    raw = str(raw).strip()
    kind = f.type
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind.startswith("tuple"):
            return tuple(x for x in raw.replace(",", " ").replace("[", " ").replace("]", " ")
                         .replace('"', " ").replace("'", " ").split() if x)
        return raw
    except ValueError:
        what = {"int": "a whole number", "float": "a number", "bool": "0 or 1"}.get(kind, "a value")
        raise UserError(f"{f.name}={raw!r} is not {what}.", f"fix {f.name} in training.sh") from None
