"""State tuning: train only the initial WKV state of every layer; the weights stay untouched.

Each attention module gets ``time_state`` = zeros [H, N, N] (fp32, laid out S[value, key] for every RWKV
version, as in RWKV-LM's state files), which the model uses as the starting state of the recurrence. A
zero state is what the base model starts from, so the adapted model equals the base at the start.

Tensors: ``blocks.N.att.time_state``. Settings: none (``{}``). State tuning wants a high learning rate
(e.g. LR_INIT=1, LR_FINAL=0.01): the state is few numbers and starts at zero.
Merge: the base state dict plus these keys (a model that starts from the tuned state).

A zero base weight stays zero (ZERO_STAYS_ZERO): no weight trains. The state reaches the loss only through
its layer's attention output, ``att.output`` (RWKV-7's state feeds the WKV output, never v_first), so on a
layer whose att.output is zero, as in a freshly initialised model, its gradient is exactly zero at every
step; loop.prepare refuses such a base (Method.check_base).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UserError
from .base import Method, merge_rest

ATT_RE = re.compile(r"^blocks\.\d+\.att$")


def heads_of(att: nn.Module) -> tuple[int, int]:
    """(H, N) of an attention module, read from its tensors rather than assumed."""
    if hasattr(att, "n_head") and hasattr(att, "head_size"):
        return int(att.n_head), int(att.head_size)
    for name in ("r_k", "time_faaaa"):                      # [H, N] in RWKV-7 / RWKV-5 and 6
        p = getattr(att, name, None)
        if isinstance(p, torch.Tensor) and p.dim() == 2:
            return int(p.shape[0]), int(p.shape[1])
    ln_x = getattr(att, "ln_x", None)
    if isinstance(ln_x, nn.GroupNorm):
        return ln_x.num_groups, ln_x.num_channels // ln_x.num_groups
    raise ValueError(f"cannot tell the number of heads of {type(att).__name__}")


class StateTuning(Method):
    TITLE = "state tuning"
    name = "state"
    SUFFIXES = ("time_state",)
    ZERO_STAYS_ZERO = True
    WHY_NO_GRADIENT = ("the state reaches the loss only through its layer's att.output, which state tuning never "
                       "changes")

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.settings = {}

    def extra_trained(self, sizes) -> list[int]:
        return [sizes.n_head * sizes.head_size ** 2] * sizes.n_layer      # one [H, N, N] state per layer

    def _wrap(self, model: nn.Module) -> None:
        atts = [m for n, m in model.named_modules() if ATT_RE.match(n)]
        if not atts:
            raise ValueError("no attention modules (blocks.N.att) found: is this an RWKV model?")
        for att in atts:
            if "time_state" in dict(att.named_parameters(recurse=False)):
                raise ValueError("this model already has time_state parameters: apply() called twice?")
            h, n = heads_of(att)
            device = next(att.parameters()).device
            att.time_state = nn.Parameter(torch.zeros(h, n, n, device=device, dtype=torch.float32))

    @staticmethod
    def merge(base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        states = [k for k in adapter_sd if k.endswith(".time_state")]
        out = merge_rest(base_sd, adapter_sd, set(states))
        for k in states:
            s = adapter_sd[k]
            prefix = k[: -len("time_state")]                         # "blocks.N.att."
            ref = base_sd.get(prefix + "receptance.weight")
            if ref is None:
                raise UserError(f"the adapter has {k} but the base model has no layer {prefix[:-5]}: it was "
                                "trained on a model with more layers.",
                                "merge with the base model the state was trained on")
            if s.dim() != 3 or s.shape[1] != s.shape[2] or s.shape[0] * s.shape[1] != ref.shape[0]:
                raise UserError(f"the adapter's {k} has shape {list(s.shape)}, which does not fit the base "
                                f"model's width {ref.shape[0]} (expected [H, N, N] with H·N = {ref.shape[0]}).",
                                "merge with the base model the state was trained on")
            out[k] = s.float()
        return out
