"""Full fine-tuning: every parameter trains; the adapter is the whole state dict; merge returns it.

Settings: none (``{}``). TRAIN_PARTS changes nothing (everything already trains), but for RWKV-7a's DeepEmbed
tensors, which stay frozen unless TRAIN_PARTS has ``deepembed`` (trainer/deepembed.py).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..deepembed import is_deep_embed
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
        de = "deepembed" in self.train_parts
        return [n for n, _ in model.named_parameters() if de or not is_deep_embed(n)]

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
