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

from .errors import UserError

MODES = ("lora", "pissa", "bone", "bat", "state", "full")
PARTS = ("emb", "head", "time", "ln")
DATALOADS = ("get", "pad", "only")
LOSS_MASKS = ("none", "pad", "qa")
SCHEDULES = ("cos", "wsd", "const")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAIN_TYPES = ("normal", "infctx")
QUANTS = ("none", "int8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit")
COMPILES = ("auto", "1", "0")
GRAD_CPS = ("auto", "1", "0")
# Options whose variable has its place in training.sh but whose code has not landed yet. They are refused
# with this reason, never silently ignored; each entry goes when its feature lands.
NOT_YET_AVAILABLE: dict[str, str] = {}
STRATEGIES = ("auto", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")


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
    # method
    FINETUNE_MODE: str = _var("lora | pissa | bone | bat | state | full", default="lora")
    LORA_R: int = _var("LoRA rank", default=64)
    LORA_ALPHA: float = _var("LoRA alpha; the update is scaled by alpha / r", default=128.0)
    LORA_DROPOUT: float = _var("dropout on the LoRA path, 0 to 0.5", default=0.0)
    PISSA_R: int = _var("PiSSA rank", default=64)
    SVD_NITER: int = _var("power iterations of PiSSA's fast randomized SVD", default=4)
    DISHA_R: int = _var("DiSHA (Bone/Bat) block size; must divide the layer widths", default=64)
    TRAIN_PARTS: tuple[str, ...] = _var("extra parts to train: any of emb head time ln", default=())
    # data
    CTX_LEN: int = _var("tokens per training sample", default=512)
    DATALOAD: str = _var("get | pad | only", default="pad")
    LOSS_MASK: str = _var("none | pad | qa", default="pad")
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
    QUANT: str = _var("none | int8 | nf4: store the frozen base weights quantised", default="none")
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
            elif f.name in env and (env[f.name].strip() != "" or f.type == "str"):
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
                              ("COMPILE", COMPILES), ("GRAD_CP", GRAD_CPS)):
            choice(name, allowed)
        for p in self.TRAIN_PARTS:
            if p not in PARTS:
                raise UserError(f"TRAIN_PARTS has {p!r}, which is not one of: {' '.join(PARTS)}.",
                                'write e.g. TRAIN_PARTS="time ln", or leave it empty')
        for name in ("LORA_R", "PISSA_R", "DISHA_R", "CTX_LEN", "MICRO_BSZ", "MINI_BSZ", "EPOCH_COUNT",
                     "EPOCH_STEPS", "EPOCH_SAVE", "GPU_COUNT", "NODES", "CHUNK_CTX"):
            positive(name)
        for name in ("SVD_NITER", "WARMUP_STEPS", "INITIAL_CTX_LEN", "CTX_WARMUP_STEPS", "SEED"):
            positive(name, zero_ok=True)
        if self.LORA_ALPHA <= 0:
            raise UserError(f"LORA_ALPHA={self.LORA_ALPHA} must be more than 0.", "a common choice is 2 × LORA_R")
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
        from .strategy import check_strategy  # DeepSpeed rules likewise (installed? CUDA? checked at start)
        check_strategy(self)
        from .offload import check_offload    # weight streaming likewise (the model's depth is checked at start)
        check_offload(self)
        if not self.MODEL:
            raise UserError("MODEL is empty.", "set MODEL in training.sh to the base model's file name in model/")
        if not self.DATA:
            raise UserError("DATA is empty.", "set DATA in training.sh to your data's name in data/ "
                            "(make it with ./make_tokenize.sh FILE.jsonl)")
        self._check_not_yet_available()

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
        p = Path(self.DATA)
        if p.suffix in (".bin", ".idx", ".jsonl"):
            p = p.with_suffix("")
        if p.parent == Path("."):
            p = Path("data") / p
        return p

    @property
    def output_dir(self) -> Path:
        return Path(self.OUTPUT)

    @property
    def world_size(self) -> int:
        return self.GPU_COUNT * self.NODES

    def check_files(self) -> None:
        """The model and data exist; their sizes fit the settings. Raises UserError, reads headers only."""
        mp = self.model_path
        if not mp.is_file():
            folder = mp.parent if mp.parent.is_dir() else Path("model")
            have = sorted(x.name for x in folder.glob("*.pth")) if folder.is_dir() else []
            raise UserError(f"MODEL: {mp} not found. Models in {folder}/: {', '.join(have) or 'none'}.",
                            "put the base model .pth in model/ and set MODEL to its file name")
        dp = self.data_prefix
        missing = [s for s in (".bin", ".idx") if not dp.with_suffix(s).is_file()]
        if missing:
            folder = dp.parent
            have = sorted(x.stem for x in folder.glob("*.idx")) if folder.is_dir() else []
            raise UserError(f"DATA: {dp}{'/'.join(missing)} not found. Data in {folder}/: {', '.join(have) or 'none'}.",
                            "make it with ./make_tokenize.sh FILE.jsonl and set DATA to FILE's name")
        self._check_data_fits()

    def _check_data_fits(self) -> None:
        from .data.dataset import data_facts, items_per_epoch
        facts = data_facts(self.data_prefix)
        per_epoch = items_per_epoch(self.EPOCH_STEPS, self.MICRO_BSZ, self.world_size)
        if self.DATALOAD in ("pad", "only") and per_epoch > facts.items:
            raise UserError(f"EPOCH_STEPS × MICRO_BSZ{' × GPUs' if self.world_size > 1 else ''} = {per_epoch} "
                            f"is more than the {facts.items} items in {self.data_prefix}.",
                            f"lower EPOCH_STEPS to at most {facts.items // (self.MICRO_BSZ * self.world_size)} "
                            "(see the table make_tokenize.sh printed), or tokenize with a higher REPEAT")
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


def _convert(f: dataclasses.Field, raw: str) -> Any:
    raw = raw.strip()
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
