"""LoRA: W x + s · B A dropout(x), with A [r, in] random and B [out, r] zero at the start.

The scale s is alpha / r (LORA_SCALING=standard) or alpha / √r (rslora: rank-stabilised LoRA, Kalajdzievski
2023, whose update keeps its size as r grows; peft's ``use_rslora``). ``lora_scale`` is the one formula.
Tensors: ``<linear>.lora_A`` [r, in], ``<linear>.lora_B`` [out, r] on every targeted linear layer
(see base.py). Settings: ``{"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "scaling": LORA_SCALING}``
(a file without "scaling" was written before rslora existed: standard).
Merge: ``W + s · B A`` in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import LORA_SCALINGS
from ..errors import UserError
from .base import (AdaptedLinear, LinearCounts, Method, base_weight_of, merge_rest, need, replace_module, shape_error,
                   target_linears)


def lora_scale(alpha: float, r: int, scaling: str = "standard") -> float:
    """The factor of B A: alpha / r, or alpha / √r for rslora."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


class LoraLinear(AdaptedLinear):
    def __init__(self, linear: nn.Linear, r: int, scale: float, dropout: float):
        super().__init__(linear)
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))      # the usual LoRA initialisation
        self.scale = scale
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_forward(self, x: Tensor) -> Tensor:
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(x.dtype)


class LoRA(Method):
    TITLE = "LoRA"
    name = "lora"
    SUFFIXES = ("lora_A", "lora_B")
    FIXED_SETTINGS = {"r": "LORA_R", "alpha": "LORA_ALPHA"}      # the update is (alpha / r) · B A

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.r = self._int("r", "LORA_R")
        alpha = self._number("alpha", "LORA_ALPHA")
        if not alpha > 0:
            raise UserError(f"LORA_ALPHA={alpha} must be more than 0.", "a common choice is 2 × LORA_R")
        dropout = self._number("dropout", "LORA_DROPOUT", 0.0)
        if not 0 <= dropout < 1:
            raise UserError(f"LORA_DROPOUT={dropout} must be at least 0 and below 1.", "use 0 to 0.1")
        scaling = self.settings.get("scaling", "standard")
        if scaling not in LORA_SCALINGS:
            raise UserError(f"LORA_SCALING={scaling!r} is not one of: {' | '.join(LORA_SCALINGS)}.",
                            "set LORA_SCALING=standard (alpha / r) or rslora (alpha / √r)")
        self.alpha, self.dropout, self.scaling = float(alpha), dropout, scaling
        self.scale = lora_scale(self.alpha, self.r, scaling)
        self.settings = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "scaling": scaling}

    ACT_FAMILY = "low_rank"
    SCALED_BY_ALPHA = True        # LORA_SCALING applies (config.py refuses rslora for a method without alpha)

    @classmethod
    def settings_from(cls, cfg) -> dict:
        return {"r": cfg.LORA_R, "alpha": cfg.LORA_ALPHA, "dropout": cfg.LORA_DROPOUT, "scaling": cfg.LORA_SCALING}

    def linear_counts(self, out_f: int, in_f: int) -> LinearCounts:
        own = self.r * (in_f + out_f)
        return LinearCounts(own, (self.r * in_f, self.r * out_f), own)

    def act_per_linear(self) -> float:
        return 2.0 * (self.r - 64)          # memory.ACT's low_rank row was measured at r = 64: B·T·r bf16 twice

    def random_in_forward(self) -> bool:
        return self.dropout > 0

    def _wrap(self, model: nn.Module) -> None:
        targets = target_linears(model)
        smallest = min(min(m.in_features, m.out_features) for m in targets.values())
        if self.r > smallest:     # B A has rank at most the smallest width: a larger r only costs memory
            raise UserError(f"LORA_R={self.r} is larger than the smallest layer width of this model ({smallest}).",
                            f"set LORA_R to at most {smallest} (8 to 64 is usual)")
        for name, linear in targets.items():
            replace_module(model, name, self._linear(linear))

    def _linear(self, linear: nn.Linear) -> AdaptedLinear:
        return LoraLinear(linear, self.r, self.scale, self.dropout)

    @classmethod
    def merge(cls, base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        r = int(settings["r"])
        scale = lora_scale(float(settings["alpha"]), r, settings.get("scaling", "standard"))
        modules = [k[: -len(".lora_A")] for k in adapter_sd if k.endswith(".lora_A")]
        handled = {f"{m}.{s}" for m in modules for s in cls.SUFFIXES}
        out = merge_rest(base_sd, adapter_sd, handled)
        for m in modules:
            w = base_weight_of(base_sd, m, "lora_A", adapter_sd)
            a, b = need(adapter_sd, m + ".lora_A"), need(adapter_sd, m + ".lora_B")
            if a.shape[0] != r:
                raise UserError(f"{m}.lora_A has rank {a.shape[0]} but the checkpoint's settings say r={r}.",
                                "the checkpoint is damaged or was edited: use an unmodified output/rwkv-N.pth")
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise shape_error(m + ".weight", (b.shape[0], a.shape[1]), tuple(w.shape))
            out[m + ".weight"] = cls._merged(m, w + scale * (b @ a), adapter_sd)
        return out

    @staticmethod
    def _merged(module: str, v: Tensor, adapter_sd: dict) -> Tensor:
        """The merged weight of ``module`` from V = W + s B A (fp32): LoRA's is V itself."""
        return v
