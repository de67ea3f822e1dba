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

import math
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


# Ops whose kernels choose their launch configuration by timing candidates on first use (fla's Triton
# autotune, results cached on disk afterwards). Some candidates need a large per-thread stack, and the CUDA
# driver then keeps that stack reserved for every thread the GPU can run at once, for the rest of the run:
# 2.7 GiB on an H100 in the first run of RWKV-6 7B (bench/RESULTS.md, session 14).
AUTOTUNED = ("fla", "rwkvfla")


def warm_up(op: str, version: int, B: int, T: int, H: int, N: int, dtype: torch.dtype,
            device: torch.device | str, state: bool = False) -> bool:
    """Run ``op`` forward and backward once on random inputs of the training shapes (B, T, H heads of N) in the
    training dtype, as the model calls it (``state``: with an initial state that takes a gradient, as state
    tuning and infctx pass), so that its kernels compile and autotune now: before the model is on the GPU,
    and before the trainer gives back the driver's thread-stack reserve (memory.trim_thread_stack), which
    the autotune's candidates would otherwise leave grown. Only for the AUTOTUNED ops, on a GPU; returns
    whether it ran. Everything it allocated is given back to the device."""
    device = torch.device(device)
    if op not in AUTOTUNED or device.type != "cuda":
        return False
    _warm_up_once(op, version, B, T, H, N, dtype, device, state)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()                           # its inputs and gradients are gone: give them back
    return True


def _warm_up_once(op: str, version: int, B: int, T: int, H: int, N: int, dtype: torch.dtype,
                  device: torch.device, state: bool) -> None:
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, dt: torch.dtype = dtype, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dt).requires_grad_()

    r, k, v = (rnd(B, T, H, N, scale=0.5) for _ in range(3))
    s0 = rnd(B, H, N, N, dt=torch.float32, scale=0.1) if state else None
    if version == 7:                                   # in RWKV-7's decay range, as TimeMix7 makes it
        logw = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, N, device=device, generator=gen))
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device=device, generator=gen), dim=-1)
        a, b = (-kk).to(dtype).requires_grad_(), (kk * 0.5).to(dtype).requires_grad_()
        y, _ = wkv(r, k, v, logw.requires_grad_(), a=a, b=b, state=s0, op=op)
    else:
        logw = -torch.exp(torch.randn(B, T, H, N, device=device, generator=gen) * 0.5 - 1.0)
        y, _ = wkv(r, k, v, logw.requires_grad_(), u=rnd(H, N, scale=0.5), state=s0, op=op)
    y.float().sum().backward()
