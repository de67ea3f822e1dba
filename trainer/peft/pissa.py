"""PiSSA: start the low-rank pair from W's principal singular directions, train them, freeze the rest.

At ``apply``: U S Vᵀ ≈ W from a fast randomized SVD (``torch.svd_lowrank``, ``svd_niter`` power
iterations, 8 extra sampled directions, the top r kept), A0 = √S Vᵀ [r, in], B0 = U √S [out, r]; the
model's ``weight`` becomes the residual W − B0 A0 and computes ``W_res x + B A x`` (no scaling, no
dropout), equal to ``W x`` at the start up to fp32 rounding.

Tensors: ``<linear>.lora_A``, ``<linear>.lora_B`` (trained) and ``<linear>.pissa_init_A``,
``<linear>.pissa_init_B`` (A0, B0: non-persistent buffers, saved in the adapter because merge needs them).
Settings: ``{"r": PISSA_R, "svd_niter": SVD_NITER}``.
Merge, on the user's ORIGINAL base weights: ``W + B A − B0 A0`` in fp32.

A zero base weight stays zero (ZERO_STAYS_ZERO): its SVD is zero, so A0 = B0 = 0 and the residual is zero;
with A = B = 0 the gradient of each (dL/dA = Bᵀ G xᵀ, dL/dB = G (A x)ᵀ) is zero, at every step. A freshly
initialised model's att.output and ffn.value are zero, and every other adapter reaches the loss only
through them: nothing learns, and loop.prepare refuses such a base (Method.check_base).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .base import (AdaptedLinear, LinearCounts, Method, base_weight_of, merge_rest, need, replace_module, shape_error,
                   target_linears)

INIT = ("pissa_init_A", "pissa_init_B")
OVERSAMPLE = 8          # torch.svd_lowrank wants q slightly above the rank it should find


class PissaLinear(AdaptedLinear):
    def __init__(self, linear: nn.Linear, r: int, niter: int):
        super().__init__(linear)
        w = self.base_weight().detach()
        q = min(r + OVERSAMPLE, *w.shape)                          # a few extra directions, then keep r
        u, s, v = torch.svd_lowrank(w.float(), q=q, niter=niter)
        u, s, v = u[:, :r], s[:r], v[:, :r]
        root = s.sqrt()
        a = (root[:, None] * v.T).to(w.dtype)                      # √S Vᵀ  [r, in]
        b = (u * root[None, :]).to(w.dtype)                        # U √S   [out, r]
        self.lora_A = nn.Parameter(a.clone())
        self.lora_B = nn.Parameter(b.clone())
        self.register_buffer("pissa_init_A", a.clone(), persistent=False)
        self.register_buffer("pissa_init_B", b.clone(), persistent=False)
        self.set_residual(w.float() - b.float() @ a.float())

    def set_residual(self, w_res: Tensor) -> None:
        """Store the frozen residual as the base weight (a quantised base re-quantises it here)."""
        with torch.no_grad():
            self.weight.copy_(w_res.to(self.weight.dtype))

    def delta_forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B).to(x.dtype)


class PiSSA(Method):
    TITLE = "PiSSA"
    name = "pissa"
    SUFFIXES = ("lora_A", "lora_B")
    EXTRA_SUFFIXES = INIT
    FIXED_SETTINGS = {"r": "PISSA_R"}        # SVD_NITER only shapes a fresh start
    ZERO_STAYS_ZERO = True
    WHY_NO_GRADIENT = ("PiSSA starts the adapter of a zero weight at A = B = 0 (its SVD is zero), where neither "
                       "gives the other a gradient, and the other adapters reach the loss only through those "
                       "projections")

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.r = self._int("r", "PISSA_R")
        self.niter = self._int("svd_niter", "SVD_NITER", minimum=0, default=4)
        self.settings = {"r": self.r, "svd_niter": self.niter}

    ACT_FAMILY = "low_rank"
    NEEDS_BASE_ON_GPU = "PiSSA's SVD"       # the SVD of each weight, on the GPU

    @classmethod
    def settings_from(cls, cfg) -> dict:
        return {"r": cfg.PISSA_R, "svd_niter": cfg.SVD_NITER}

    def linear_counts(self, out_f: int, in_f: int) -> LinearCounts:
        own = self.r * (in_f + out_f)
        return LinearCounts(own, (self.r * in_f, self.r * out_f), own, buffers=own)

    def act_per_linear(self) -> float:
        return 2.0 * (self.r - 64)

    def _wrap(self, model: nn.Module) -> None:
        targets = target_linears(model)
        smallest = min(min(m.in_features, m.out_features) for m in targets.values())
        if self.r > smallest:
            raise UserError(f"PISSA_R={self.r} is larger than the smallest layer width of this model "
                            f"({smallest}).", f"set PISSA_R to at most {smallest} (e.g. 64 or less)")
        for name, linear in targets.items():
            replace_module(model, name, PissaLinear(linear, self.r, self.niter))

    def _modules(self, model: nn.Module) -> dict[str, PissaLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, PissaLinear)}

    def _extra_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {f"{n}.{b}": getattr(m, b).detach() for n, m in self._modules(model).items() for b in INIT}

    def _before_load(self, model: nn.Module, sd: dict[str, Tensor]) -> None:
        # The residual was made from this run's SVD; rebuild it from the saved initial pair instead:
        # W_res' = W_res + B0 A0 (this run) − B0' A0' (saved).
        for n, m in self._modules(model).items():
            a0, b0 = sd[n + ".pissa_init_A"].float(), sd[n + ".pissa_init_B"].float()
            w = m.weight.float() + m.pissa_init_B.float() @ m.pissa_init_A.float() - b0 @ a0
            m.set_residual(w)

    @staticmethod
    def merge(base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        modules = [k[: -len(".lora_A")] for k in adapter_sd if k.endswith(".lora_A")]
        handled = {f"{m}.{s}" for m in modules for s in ("lora_A", "lora_B") + INIT}
        out = merge_rest(base_sd, adapter_sd, handled)
        for m in modules:
            w = base_weight_of(base_sd, m, "lora_A", adapter_sd)
            a, b = need(adapter_sd, m + ".lora_A"), need(adapter_sd, m + ".lora_B")
            a0, b0 = need(adapter_sd, m + ".pissa_init_A"), need(adapter_sd, m + ".pissa_init_B")
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise shape_error(m + ".weight", (b.shape[0], a.shape[1]), tuple(w.shape))
            out[m + ".weight"] = w + b @ a - b0 @ a0
        return out
