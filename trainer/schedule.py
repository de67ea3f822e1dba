"""Learning-rate schedules, as a pure function of the optimizer step (so resume needs no scheduler state).

All three start with ``warmup`` steps of linear warm-up from LR_INIT/100 to LR_INIT, then:
  cos    cosine from LR_INIT down to LR_FINAL at the last step
  wsd    warm-up, stable at LR_INIT, then a cosine decay to LR_FINAL over the last 20% of the steps
  const  LR_INIT throughout (LR_FINAL is not used)
"""
from __future__ import annotations

import math

WSD_DECAY_FRACTION = 0.2


def learning_rate(step: int, total: int, lr_init: float, lr_final: float, warmup: int, kind: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        start = lr_init / 100
        return start + (lr_init - start) * step / warmup
    if kind == "const":
        return lr_init
    if kind == "cos":
        span = max(1, total - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
    elif kind == "wsd":
        decay_steps = max(1, round((total - warmup) * WSD_DECAY_FRACTION))
        decay_start = total - decay_steps
        if step < decay_start:
            return lr_init
        progress = min(1.0, (step - decay_start) / max(1, decay_steps - 1))
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return lr_final + (lr_init - lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
