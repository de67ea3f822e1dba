"""DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation, arXiv 2402.09353) on LoRA's pair A, B:

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖

‖·‖ is the Euclidean norm of each output row, taken over the input dimension (dim 1 of W [out, in]); m [out]
scales each row. That is peft's axis for an nn.Linear (DoraLinearLayer.get_weight_norm:
``torch.linalg.norm(W + s·B A, dim=1)``, magnitude of shape [out]). A and B are LoRA's (same initialisation;
s = alpha / r, or alpha / √r with LORA_SCALING=rslora; dropout on the low-rank path); m starts at ‖W‖ per row,
so at the start W' = W: the adapted model is the base. Trained: A, B and m.

Forward: y = W x + s·B A dropout(x) (LoRA's), out = (m / n) ⊙ y with n = ‖W + s·B A‖. The norm n is a
constant for the backward pass (detached), as section 4.3 of the paper suggests and peft does (it detaches
the weight norm, and computes it from a detached B A): A and B get their gradient through the numerator only,
m through m / n. n is recomputed at every forward pass (A and B move every step) without forming W + s·B A:

    n_o² = ‖w_o‖² + 2s·Σ_k B[o,k] (A w_o)[k] + s²·B[o] (A Aᵀ) B[o]ᵀ

‖w_o‖² is kept from the set-up (W is frozen; refreshed by ``base_changed`` when QUANT replaces W by its
quantised copy), A Wᵀ [r, out] is ``base_forward(A)``: one pass over W per forward pass, r·in·out
multiply-adds (as many as forming B A), no [out, in] temporary, and a quantised base gives its own dequantised
W, the one its base product uses. (peft forms W + s·B A: a full-size weight and two more passes over it.) A Wᵀ
comes in the run's compute dtype (bf16 under autocast), everything after it in fp32: n carries bf16's rounding
only in the cross term, the update's share of n² (peft under autocast rounds W + s·B A and its norm to bf16).

LORA_DROPOUT: here dropout acts on the low-rank path only, out = (m/n) ⊙ (W x + s·B A drop(x)); peft scales
the base product of the dropped input instead (a second base product). Without dropout the two are the same.

A zero row of W (a fresh RWKV-LM init's att.output and ffn.value are zero) starts with m = 0: its output is 0
whatever A and B are, and so is the gradient of all three (n is clamped away from 0: no 0/0, where peft gives
NaN). Such a weight stays zero (ZERO_STAYS_ZERO, like PiSSA: the trainer refuses a base it cannot learn on).
QUANT: m starts at the norms of the weights as loaded (before quantisation), n is the quantised weight's: the
start is the quantised model with each row rescaled to its original norm, and merge rebuilds exactly that.

Tensors: ``<linear>.lora_A`` [r, in], ``<linear>.lora_B`` [out, r], ``<linear>.dora_magnitude`` [out] (fp32).
Settings: LoRA's. Merge: m ⊙ V / ‖V‖ with V = W + s·B A, in fp32, on the base training saw (dequantised
weights after a QUANT run): the official layout, nothing else.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AdaptedLinear, LinearCounts, need, shape_error
from .lora import LoRA, LoraLinear

MAGNITUDE = "dora_magnitude"
TINY_NORM = 1e-20       # n is at least this: a zero row (m = 0) gives 0, never 0/0


def row_squares(w: Tensor) -> Tensor:
    """‖w_o‖² of every row of ``w`` [out, in], in fp32."""
    w = w.detach().float()
    return (w * w).sum(1)


class DoraLinear(LoraLinear):
    def __init__(self, linear: nn.Linear, r: int, scale: float, dropout: float):
        super().__init__(linear, r, scale, dropout)
        squares = row_squares(self.base_weight())
        # fp32 kept as int32 bits, so that model.to(dtype) (OFFLOAD_BLOCKS, DeepSpeed) can never round it
        self.register_buffer("dora_w2", squares.view(torch.int32), persistent=False)
        self.dora_magnitude = nn.Parameter(squares.sqrt())

    def base_changed(self) -> None:
        self.dora_w2 = row_squares(self.base_weight()).view(torch.int32)

    def row_norm(self, dtype: torch.dtype) -> Tensor:
        """n = ‖W + s·B A‖ per output row (fp32, [out]), detached; ``dtype``: that of the base product's input."""
        a = self.lora_A.detach()
        b = self.lora_B.detach().float()
        aw = self.base_forward(a.to(dtype)).float()                  # A Wᵀ [r, out]
        a = a.float()
        s = self.scale
        with torch.autocast(a.device.type, enabled=False):           # the rest in fp32, whatever the run's
            squares = (self.dora_w2.view(torch.float32) + 2.0 * s * (b * aw.T).sum(1)
                       + s * s * ((b @ (a @ a.T)) * b).sum(1))
        return squares.clamp_min(0.0).sqrt().clamp_min(TINY_NORM)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x) + self.delta_forward(x)             # W x + s·B A dropout(x)
        return (y * (self.dora_magnitude / self.row_norm(x.dtype))).to(y.dtype)


class DoRA(LoRA):
    TITLE = "DoRA"
    name = "dora"
    SUFFIXES = ("lora_A", "lora_B", MAGNITUDE)
    ZERO_STAYS_ZERO = True
    WHY_NO_GRADIENT = ("DoRA starts each row's magnitude at that row's norm, zero in a zero weight, and a zero "
                       "magnitude zeroes the row's output and every gradient through it, its own included; the "
                       "other adapters reach the loss only through those projections")

    def linear_counts(self, out_f: int, in_f: int) -> LinearCounts:
        lora = super().linear_counts(out_f, in_f)
        norm_flops = 2 * self.r * out_f * in_f + 2 * self.r * self.r * (in_f + out_f)    # A Wᵀ, A Aᵀ, B (A Aᵀ)
        return LinearCounts(lora.trained + out_f, lora.pieces + (out_f,), lora.matmul,
                            rebuild_flops=norm_flops, saved=out_f)

    def _linear(self, linear: nn.Linear) -> AdaptedLinear:
        return DoraLinear(linear, self.r, self.scale, self.dropout)

    @staticmethod
    def _merged(module: str, v: Tensor, adapter_sd: dict) -> Tensor:
        m = need(adapter_sd, f"{module}.{MAGNITUDE}")
        if tuple(m.shape) != (v.shape[0],):
            raise shape_error(f"{module}.{MAGNITUDE}", tuple(m.shape), (v.shape[0],))
        n = row_squares(v).sqrt().clamp_min(TINY_NORM)
        return v * (m / n)[:, None]
