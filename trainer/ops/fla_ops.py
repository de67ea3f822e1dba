"""The Triton chunk kernels of flash-linear-attention, CUDA only: ops "fla" (fla-core) and "rwkvfla" (rwkv-fla).

Nothing here imports fla, rwkvfla or triton at module level: a CPU install never needs them. The
check functions tell, without importing the kernels, why an op cannot run (no CUDA, package missing,
fla-core and rwkv-fla both installed, a Triton that rwkv-fla does not support).

Layout conversions (ours -> fla): r, k, v, a, b and the log decay go in as [B, T, H, N] (the same);
fla's states are [B, H, K, V], the transpose of our S[value, key]; the final state comes back fp32 in
our layout. scale=1.0 always (rwkv6's default is 1/sqrt(K)). RWKV-5 uses the RWKV-6 kernel with the
constant decay expanded over T (exact: RWKV-5 is RWKV-6 with a time-independent decay).

APIs used (read from fla-core 0.6.0 and rwkv-fla 0.7.202508221413):
  fla.ops.rwkv7.chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                            cu_seqlens=None, cu_seqlens_cpu=None, safe_gate=False, chunk_size=None, ...,
                            lower_bound=None)          w = log decay
  fla.ops.rwkv6.chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, ...)
  rwkvfla.ops.rwkv7.chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None,
                                output_final_state=True, ...)   w there is the raw -> decay exp(-exp(w))
  rwkvfla.ops.rwkv6.chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, ...)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import warnings

import torch
from torch import Tensor

from ..errors import UserError
from . import register

# fla's own RWKV-7 layer computes w = -exp(-0.5) * sigmoid(...), so every RWKV-7 log decay lies in
# [RWKV7_LOWER_BOUND, 0]. Promising that to chunk_rwkv7 (safe_gate, lower_bound, chunk_size=64) is
# what fla's layer does and selects its faster tensor-core path.
RWKV7_LOWER_BOUND = -0.6065306597126334

_FLA_PIP = "pip install fla-core   (or: pip install flash-linear-attention)"
_RWKVFLA_PIP = "pip install rwkv-fla"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _installed() -> dict[str, bool]:
    fla_core = bool(_dist_version("fla-core") or _dist_version("flash-linear-attention"))
    rwkv_fla = bool(_dist_version("rwkv-fla")) or _has_module("rwkvfla")
    if not fla_core and not rwkv_fla and _has_module("fla"):
        fla_core = True  # a source checkout on the path, without package metadata
    return {"fla-core": fla_core, "rwkv-fla": rwkv_fla}


def _common_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"its Triton kernels need a CUDA GPU, and this run is on '{device.type}' (use OP=chunk on a CPU)"
    inst = _installed()
    if inst["fla-core"] and inst["rwkv-fla"]:
        return ("both fla-core and rwkv-fla are installed; rwkv-fla overwrites fla-core's 'fla' package. "
                "Keep one: pip uninstall -y rwkv-fla   (or: pip uninstall -y fla-core flash-linear-attention)")
    return None


def _triton_reason() -> str | None:
    return None if _has_module("triton") else "Triton is not installed: pip install triton"


def _triton_at_least(major: int, minor: int) -> bool:
    ver = _dist_version("triton") or _dist_version("pytorch-triton") or ""
    try:
        parts = [int(p) for p in ver.split("+")[0].split(".")[:2]]
    except ValueError:
        return False
    return len(parts) == 2 and tuple(parts) >= (major, minor)


def check_fla(device: torch.device) -> str | None:
    reason = _common_reason(torch.device(device))
    if reason:
        return reason
    inst = _installed()
    if not inst["fla-core"]:
        if inst["rwkv-fla"]:
            return "only rwkv-fla is installed: use OP=rwkvfla, or pip uninstall -y rwkv-fla && " + _FLA_PIP
        return "fla-core is not installed: " + _FLA_PIP
    return _triton_reason()


def check_rwkvfla(device: torch.device) -> str | None:
    reason = _common_reason(torch.device(device))
    if reason:
        return reason
    if not _installed()["rwkv-fla"]:
        return "rwkv-fla is not installed: " + _RWKVFLA_PIP + "   (or use OP=fla with fla-core)"
    if _triton_reason():
        return _triton_reason()
    if _triton_at_least(3, 9):
        return ("rwkv-fla uses tl.make_block_ptr, which Triton 3.9 removed: use OP=fla with fla-core, "
                "or pip install 'triton<3.9'")
    return None


@functools.lru_cache(maxsize=None)
def _reason_once(check, device_type: str) -> str | None:
    return check(torch.device(device_type))  # package metadata lookups are slow: once per process


def _load(what: str, check, device: torch.device) -> object:
    """Check that the op can run on ``device``, then import its kernel function lazily."""
    reason = _reason_once(check, device.type)
    if reason:
        op = "fla" if what.startswith("fla.") else "rwkvfla"
        raise UserError(f"OP={op} cannot run here: {reason}", "set OP=auto to pick one that works")
    module, _, name = what.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise UserError(f"cannot import {what}: {err}",
                        _FLA_PIP if what.startswith("fla.") else _RWKVFLA_PIP) from err


def _h0(state: Tensor | None) -> Tensor | None:
    """Our S[value, key] -> fla's [B, H, K, V], fp32, contiguous (gradients flow back through it)."""
    return None if state is None else state.float().transpose(-1, -2).contiguous()


def _ours(o: Tensor, ht: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return o.to(dtype), ht.float().transpose(-1, -2).contiguous()


@contextlib.contextmanager
def _fp32_decay_is_intended():
    """We pass RWKV-7's log decay in fp32 with half-precision inputs, as fla's own tests do (the oracle
    tests pass on an H100); fla then warns on every call that float32 'is not supported on some platforms'.
    Keep that warning off the user's screen."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support float32.*", category=RuntimeWarning)
        yield


def _rwkv7_safe(logw: Tensor) -> bool:
    """True if every log decay is within RWKV-7's range (one device sync)."""
    return bool((logw.detach().amin() >= RWKV7_LOWER_BOUND).item())


def wkv7_fla(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    chunk_rwkv7 = _load("fla.ops.rwkv7.chunk_rwkv7", check_fla, r.device)
    dt = r.dtype
    k, v, a, b = (x.to(dt) for x in (k, v, a, b))
    logw = logw.expand_as(r).contiguous()  # own dtype kept (fla's tests pass fp32 log decays with half inputs)
    extra = {}
    if _rwkv7_safe(logw):
        extra = dict(safe_gate=True, lower_bound=RWKV7_LOWER_BOUND, chunk_size=64)
    with _fp32_decay_is_intended():
        o, ht = chunk_rwkv7(r=r, w=logw, k=k, v=v, a=a, b=b, scale=1.0, initial_state=_h0(state),
                            output_final_state=True, **extra)
    return _ours(o, ht, dt)


def _wkv6(what: str, check, r: Tensor, k: Tensor, v: Tensor, logw: Tensor, u: Tensor,
          state: Tensor | None) -> tuple[Tensor, Tensor]:
    """fla's and rwkv-fla's chunk_rwkv6 take the same arguments: one wrapper for both."""
    chunk_rwkv6 = _load(what, check, r.device)
    dt = r.dtype
    k, v, u, logw = (x.to(dt) for x in (k, v, u, logw))
    logw = logw.expand_as(r).contiguous()  # RWKV-5: the constant decay repeated over T
    o, ht = chunk_rwkv6(r, k, v, logw, u, scale=1.0, initial_state=_h0(state), output_final_state=True)
    return _ours(o, ht, dt)


def wkv6_fla(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, u: Tensor,
             state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _wkv6("fla.ops.rwkv6.chunk_rwkv6", check_fla, r, k, v, logw, u, state)


def wkv7_rwkvfla(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, a: Tensor, b: Tensor,
                 state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    chunk_rwkv7 = _load("rwkvfla.ops.rwkv7.chunk_rwkv7", check_rwkvfla, r.device)
    dt = r.dtype
    k, v, a, b = (x.to(dt) for x in (k, v, a, b))
    logw = logw.expand_as(r).contiguous()
    with _fp32_decay_is_intended():
        o, ht = chunk_rwkv7(r, k, v, a, b, log_w=logw, scale=1.0, initial_state=_h0(state),
                            output_final_state=True)
    return _ours(o, ht, dt)


def wkv6_rwkvfla(r: Tensor, k: Tensor, v: Tensor, logw: Tensor, u: Tensor,
                 state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _wkv6("rwkvfla.ops.rwkv6.chunk_rwkv6", check_rwkvfla, r, k, v, logw, u, state)


register("fla", wkv7_fla, wkv6_fla, check_fla)
register("rwkvfla", wkv7_rwkvfla, wkv6_rwkvfla, check_rwkvfla)
