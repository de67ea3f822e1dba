"""Full fine-tuning: every parameter trains; the adapter is the whole state dict; merge returns it.

Settings: none (``{}``). TRAIN_PARTS changes nothing (everything already trains).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import UserError
from .base import Method, merge_rest


class Full(Method):
    TITLE = "full fine-tuning"
    name = "full"

    def __init__(self, settings: dict | None = None):
        super().__init__(settings)
        self.settings = {}

    ACT_FAMILY = "full"
    TRAINS_BASE = True
    LEANER = "lora"

    def trainable_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_parameters()]

    def adapter_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}

    @staticmethod
    def merge(base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        missing = [k for k in base_sd if k not in adapter_sd]
        if missing:
            raise UserError(f"the full fine-tuning checkpoint lacks {len(missing)} tensors of the base model "
                            f"(e.g. {missing[0]}): it was trained on another kind of model.",
                            "merge with the base model it was trained from")
        out = merge_rest(base_sd, adapter_sd, set())
        return {k: out[k] for k in adapter_sd}
