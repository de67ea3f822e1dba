"""Fine-tuning methods behind one interface (see base.py): lora, dora, pissa, bone (miss), bat, state, full.

    from trainer.peft import get_method
    method = get_method(cfg.FINETUNE_MODE)(settings)
    method.apply(model, train_parts=cfg.TRAIN_PARTS)
"""
from __future__ import annotations

from ..errors import UserError
from .base import PARTS, AdaptedLinear, Method

from ..choices import METHODS


def get_method(name: str) -> type[Method]:
    """The Method class for FINETUNE_MODE ``name``."""
    if name == "lora":
        from .lora import LoRA
        return LoRA
    if name == "dora":
        from .dora import DoRA
        return DoRA
    if name == "pissa":
        from .pissa import PiSSA
        return PiSSA
    if name == "bone":
        from .disha import Bone
        return Bone
    if name == "miss":
        from .disha import MiSS
        return MiSS
    if name == "bat":
        from .disha import Bat
        return Bat
    if name == "state":
        from .state import StateTuning
        return StateTuning
    if name == "full":
        from .full import Full
        return Full
    raise UserError(f"FINETUNE_MODE={name!r} is not a method; choose one of {' | '.join(METHODS)}.",
                    "set FINETUNE_MODE=lora if unsure")


__all__ = ["get_method", "Method", "AdaptedLinear", "METHODS", "PARTS"]
