"""DiSHA (arXiv 2409.15371, Jiale Kang): Bone and Bat, block-shared updates of W in r × r blocks.

Cut W [out, in] into r × r blocks W_ab (a = row block, b = column block; W_ab[i, j] = W[a·r+i, b·r+j]).
The trainable tensor is ``<linear>.disha``, zero at the start, so the adapted model equals the base.

Bone (block-wise, no dependence on W)     ``disha`` D [r, out]:
    ΔW[o, b·r + j] = D[j, o]   — the same [out, r] slab Dᵀ is added to every column block of W.
    Computed without forming ΔW: ΔW x = Dᵀ (Σ_b x_b), x_b the r-chunks of x.
Bat (block affine, uses W)                 ``disha`` D [in/r, r, r]  (one r × r matrix per column block):
    ΔW_ab = W_ab D_b + D_b     — every block of W multiplied by its column's shared matrix, plus it.

These are the layouts RWKV-PEFT uses for its ``.disha`` tensors (Bone [r, out], Bat [in/r, r, r]).
RWKV-PEFT has since renamed Bone (DiSHA) to MiSS: FINETUNE_MODE=miss is Bone under that name (``MiSS``), the
same tensors, settings and steps; its files record "miss" and the merged file is named after it.
Settings: ``{"r": DISHA_R}``; r must divide every adapted layer width. Merge: W + ΔW(W_base) in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .base import (AdaptedLinear, LinearCounts, Method, base_weight_of, merge_rest, need, replace_module,
                   target_linears)


def bone_delta(d: Tensor, shape: tuple[int, int]) -> Tensor:
    """ΔW [out, in] of Bone for D [r, out]."""
    out_f, in_f = shape
    return d.T.repeat(1, in_f // d.shape[0])


def bat_delta(w: Tensor, d: Tensor) -> Tensor:
    """ΔW [out, in] of Bat: blocks W_ab D_b + D_b, for D [in/r, r, r]."""
    out_f, in_f = w.shape
    r = d.shape[-1]
    blocks = w.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)       # [a, b, r, r] = W_ab
    delta = blocks @ d + d                                                    # D_b broadcast over a
    return delta.permute(0, 2, 1, 3).reshape(out_f, in_f)


class BoneLinear(AdaptedLinear):
    def __init__(self, linear: nn.Linear, r: int):
        super().__init__(linear)
        w = self.weight
        self.r = r
        self.disha = nn.Parameter(torch.zeros(r, self.out_features, device=w.device, dtype=w.dtype))

    def delta_forward(self, x: Tensor) -> Tensor:
        h = x.to(self.disha.dtype)
        summed = h.reshape(*h.shape[:-1], self.in_features // self.r, self.r).sum(-2)   # Σ_b x_b
        return (summed @ self.disha).to(x.dtype)


class BatLinear(AdaptedLinear):
    def __init__(self, linear: nn.Linear, r: int):
        super().__init__(linear)
        w = self.weight
        self.r = r
        self.disha = nn.Parameter(torch.zeros(self.in_features // r, r, r, device=w.device, dtype=w.dtype))

    def delta_forward(self, x: Tensor) -> Tensor:
        delta = bat_delta(self.base_weight().detach().to(self.disha.dtype), self.disha)
        return F.linear(x.to(delta.dtype), delta).to(x.dtype)


class _DiSHA(Method):
    SUFFIXES = ("disha",)
    FIXED_SETTINGS = {"r": "DISHA_R"}
    LINEAR: type[AdaptedLinear] = BoneLinear

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.r = self._int("r", "DISHA_R")
        self.settings = {"r": self.r}

    @classmethod
    def settings_from(cls, cfg) -> dict:
        return {"r": cfg.DISHA_R}

    R_DIM = 0            # where the block size r can be read from a saved .disha tensor

    def _wrap(self, model: nn.Module) -> None:
        targets = target_linears(model)
        check_block_size(self.r, sorted({n for m in targets.values() for n in (m.in_features, m.out_features)}))
        for name, linear in targets.items():
            replace_module(model, name, self.LINEAR(linear, self.r))

    @classmethod
    def merge(cls, base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        """W + the method's update for every adapted layer (shape-checked), in fp32; the rest as saved."""
        modules = [k[: -len(".disha")] for k in adapter_sd if k.endswith(".disha")]
        out = merge_rest(base_sd, adapter_sd, {m + ".disha" for m in modules})
        for m in modules:
            w = base_weight_of(base_sd, m, "disha", adapter_sd)
            d = need(adapter_sd, m + ".disha")
            r = int(settings.get("r", d.shape[cls.R_DIM]))
            ok, want = cls._fits(w, d, r)
            _check(m, w, d, ok, want, r)
            out[m + ".weight"] = w + cls._delta(w, d)
        return out


def check_block_size(r: int, widths: list[int]) -> None:
    bad = [w for w in widths if w % r]
    if bad:
        g = math.gcd(*widths)
        valid = [d for d in range(1, g + 1) if g % d == 0]
        raise UserError(f"DISHA_R={r} does not divide the layer widths of this model "
                        f"({', '.join(map(str, widths))}; not {', '.join(map(str, bad))}).",
                        f"set DISHA_R to one of {', '.join(map(str, valid))}")


class Bone(_DiSHA):
    TITLE = "Bone"
    name = "bone"
    LINEAR = BoneLinear
    ACT_FAMILY = "block"

    def linear_counts(self, out_f: int, in_f: int) -> LinearCounts:
        own = self.r * out_f
        return LinearCounts(own, (own,), own)

    @staticmethod
    def _fits(w: Tensor, d: Tensor, r: int) -> tuple[bool, str]:
        ok = d.dim() == 2 and d.shape[0] == r and d.shape[1] == w.shape[0] and w.shape[1] % r == 0
        return ok, f"[r, {w.shape[0]}] with r dividing {w.shape[1]}"

    @staticmethod
    def _delta(w: Tensor, d: Tensor) -> Tensor:
        return bone_delta(d, tuple(w.shape))


class MiSS(Bone):
    TITLE = "MiSS"
    name = "miss"
    NOTE = ("FINETUNE_MODE=miss: MiSS is RWKV-PEFT's current name for Bone (DiSHA); it trains exactly as "
            "FINETUNE_MODE=bone would (DISHA_R is its block size), and its files are named miss")


class Bat(_DiSHA):
    TITLE = "Bat"
    name = "bat"
    LINEAR = BatLinear
    R_DIM = -1
    ACT_FAMILY = "block_rebuilt"
    KEPT_PER_ADAPTED = 4.2       # bf16 blocks of W and the bf16 ΔW, per adapted weight (simulated: memory.py)
    REBUILD_WORK = 8.6           # per weight of the largest layer while its ΔW is rebuilt

    def linear_counts(self, out_f: int, in_f: int) -> LinearCounts:
        own = in_f * self.r
        return LinearCounts(own, (own,), in_f * out_f, rebuild_flops=2 * out_f * in_f * self.r)

    @staticmethod
    def _fits(w: Tensor, d: Tensor, r: int) -> tuple[bool, str]:
        ok = (d.dim() == 3 and tuple(d.shape[1:]) == (r, r) and d.shape[0] * r == w.shape[1]
              and w.shape[0] % r == 0)
        return ok, f"[{w.shape[1]}/r, r, r] with r dividing {w.shape[0]}"

    @staticmethod
    def _delta(w: Tensor, d: Tensor) -> Tensor:
        return bat_delta(w, d)


def _check(module: str, w: Tensor, d: Tensor, ok: bool, want: str, r: int | None) -> None:
    if not ok:
        raise UserError(f"{module}.disha has shape {list(d.shape)}, which does not fit the base weight "
                        f"{list(w.shape)} (expected {want}, r={r}).",
                        "merge with the base model the adapter was trained on, using its own checkpoint")
