"""WKV ops: one interface for RWKV-5, 6 and 7, several implementations.

    y, final_state = wkv(r, k, v, logw, u=..., state=..., op="torch")          # RWKV-5 / RWKV-6
    y, final_state = wkv(r, k, v, logw, a=..., b=..., state=..., op="torch")   # RWKV-7

Shapes: r, k, v, logw, a, b are [B, T, H, N] (N = head size); u is [H, N]; ``state`` (optional,
default zero) and ``final_state`` are [B, H, N, N] in fp32, laid out S[value, key] for every version
(the layout of ``blocks.i.att.time_state`` in a checkpoint). ``logw`` is log(decay) <= 0.
``y`` has r's dtype. Every op gives gradients to every input, the initial state included.

Ops (``OP`` in training.sh):
  torch    the fp32 per-token recurrence in reference.py: the oracle, any device, slow
  chunk    the same maths in chunks of matrix products, pure PyTorch: the CPU training op
  fla      the Triton chunk kernels of flash-linear-attention (fla-core), CUDA only
  rwkvfla  the same kernels from rwkv-fla, for users who installed that package instead
  triton   our own sequential Triton kernel (triton_wkv7.py), RWKV-7 only, CUDA only
  auto     the fastest op that works here
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError
from .reference import wkv6_reference, wkv7_reference

OP_NAMES = ("auto", "torch", "chunk", "fla", "rwkvfla", "triton")

# name -> (wkv7 function, wkv6 function, availability check(device) -> reason or None)
_REGISTRY: dict[str, tuple[Callable, Callable, Callable[[torch.device], str | None]]] = {
    "torch": (wkv7_reference, wkv6_reference, lambda device: None),
}


# Ops that torch.compile (COMPILE) may trace into: torch.library custom ops, opaque to the compiler. Every
# other op runs as it is between two compiled graphs (the reference and chunk ops are Python loops over T
# that the compiler would unroll; fla's kernels are its own autograd Functions).
_TRACEABLE: set[str] = set()


def register(name: str, fn7: Callable, fn6: Callable, check: Callable[[torch.device], str | None],
             traceable: bool = False) -> None:
    _REGISTRY[name] = (fn7, fn6, check)
    if traceable:
        _TRACEABLE.add(name)


def is_traceable(name: str) -> bool:
    """Whether torch.compile traces op ``name`` inside a graph (see _TRACEABLE)."""
    _load_builtin()
    return name in _TRACEABLE


def _load_builtin() -> None:
    # Imported lazily so that a failing optional op never breaks ``import trainer.ops``.
    from . import chunk  # noqa: F401  (registers "chunk")
    from . import fla_ops  # noqa: F401  (registers "fla" and "rwkvfla"; imports fla only when called)
    from . import triton_wkv7  # noqa: F401  (registers "triton"; imports triton only when called)


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """None if op ``name`` runs on ``device``, else the reason and what to install."""
    _load_builtin()
    device = torch.device(device)
    if name not in _REGISTRY:
        return f"unknown OP '{name}'; choose one of {', '.join(OP_NAMES)}"
    return _REGISTRY[name][2](device)


# OP=auto on a GPU, fastest first (bench/RESULTS.md): our Triton kernel for RWKV-7 (faster than fla's chunk
# kernel at training shapes, and it compiles in seconds instead of minutes), fla's for RWKV-5/6.
AUTO_ORDER_CUDA = {7: ("triton", "fla", "rwkvfla", "chunk"), 6: ("fla", "rwkvfla", "chunk"),
                   5: ("fla", "rwkvfla", "chunk")}
ONLY_VERSIONS = {"triton": (7,)}          # ops written for some RWKV versions only


def resolve(name: str, device: torch.device | str, version: int | None = None) -> str:
    """Turn ``auto`` into a concrete op for this device and RWKV ``version`` (7 when not given) and check
    that the chosen op can run there."""
    device = torch.device(device)
    version = 7 if version is None else version
    if name == "auto":
        order = AUTO_ORDER_CUDA[version] if device.type == "cuda" else ("chunk",)
        for cand in order:
            if why_unavailable(cand, device) is None:
                return cand
        return "torch"
    if name in ONLY_VERSIONS and version not in ONLY_VERSIONS[name]:
        raise UserError(f"OP={name} has only an RWKV-{'/'.join(map(str, ONLY_VERSIONS[name]))} kernel, and this "
                        f"model is RWKV-{version}.", "set OP=auto (or OP=fla) for this model")
    reason = why_unavailable(name, device)
    if reason:
        raise UserError(f"OP={name} cannot run here: {reason}", "set OP=auto to pick one that works")
    return name


def wkv(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, *, u: Tensor | None = None,
        a: Tensor | None = None, b: Tensor | None = None, state: Tensor | None = None,
        op: str = "torch") -> tuple[Tensor, Tensor]:
    if op not in _REGISTRY:
        _load_builtin()
    if op not in _TRACEABLE and torch.compiler.is_compiling():
        return _wkv_eager(r, k, v, logw, u=u, a=a, b=b, state=state, op=op)
    return _wkv(r, k, v, logw, u=u, a=a, b=b, state=state, op=op)


def _wkv(r, k, v, logw, *, u, a, b, state, op):
    fn7, fn6, _ = _REGISTRY[op]
    # Each op computes in the precision it was written for (fp32 inside torch/chunk, the kernels' own for
    # fla): an enclosing autocast (bf16 training) must not downcast its internal products.
    with torch.autocast(r.device.type, enabled=False):
        if a is not None:
            return fn7(r, k, v, logw, a, b, state)
        return fn6(r, k, v, logw, u, state)


_wkv_eager = torch.compiler.disable(_wkv)
