"""What the machine has, and the calls into the CUDA driver and PyTorch's allocator that the trainer makes
(no decisions: trainer/plan.py decides from what these report).

    gpu_free_before(device)        the GPU's free memory as nvidia-smi would show it before this process
    host_available()               CPU memory available without swapping (Linux MemAvailable; WSL2: its VM's)
    configure_allocator(device)    expandable segments on, where may_grow_segments says they work
    trim_thread_stack(device)      give back the CUDA driver's idle per-thread stack reserve
    trim_grown_stack(device, n)    the same after a step, where an autotune grew it again
    keep_compiled()                torch.compile's cache in the user's cache folder, kept across reboots
"""
from __future__ import annotations

import functools
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

GiB = 2 ** 30
CONTEXT_AT_PREFLIGHT = int(0.25 * GiB)   # the bare CUDA context when the plan asks for free memory, its stack
                                         # reserve given back (H100, bench/RESULTS.md)


def keep_compiled(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Point torch.compile's cache (inductor's graphs and kernels, the Triton kernels it generates) at the user's
    cache folder, $XDG_CACHE_HOME or ~/.cache, under rwkv-peft-simple/torchinductor, unless
    TORCHINDUCTOR_CACHE_DIR is set already. Inductor's own default is /tmp/torchinductor_<user>, which Ubuntu (also
    under WSL2 with systemd) empties at every boot, so the first run after a restart compiled everything again.
    The folder it uses, or None where the cache folder cannot be made (the default then stays)."""
    if environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return environ["TORCHINDUCTOR_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    folder = Path(base) / "rwkv-peft-simple" / "torchinductor"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return None
    environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return str(folder)


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The CPU memory available to new allocations without swapping, in bytes (Linux's MemAvailable; inside
    WSL2 that of its VM, whose size .wslconfig sets); None where it cannot be read."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None



def gpu_free_before(device: Any) -> float:
    """The GPU's free memory as nvidia-smi would show it before this process: what is free + what this
    process holds (the bare context mem_get_info makes; cuBLAS and the kernels that CUDA_CONTEXT counts are
    not loaded yet)."""
    import torch
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) + CONTEXT_AT_PREFLIGHT


def may_grow_segments(wsl: bool | None = None) -> bool:
    """Whether PyTorch's allocator may grow segments in place here (what Machine.probe records, and where
    configure_allocator turns them on): not under WSL2 (it can fail at the first
    allocation there, pytorch#192330), and not when the user set the allocator's variables."""
    import os
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    if wsl is None:
        from .strategy import running_on_wsl
        wsl = running_on_wsl()
    return not wsl


def configure_allocator(device, wsl: bool | None = None) -> str | None:
    """Let PyTorch's CUDA allocator grow its blocks in place (expandable segments): the memory the GPU shows
    in use then stays close to what tensors take, instead of keeping a reserve of partly used blocks
    (measured: bench/RESULTS.md). Only where may_grow_segments. Returns what was set, or None."""
    import torch
    if getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return None
    if not may_grow_segments(wsl):
        return None
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except Exception:            # an older or differently built torch: keep its default
        return None
    return "expandable_segments:True"


CU_LIMIT_STACK_SIZE = 0                  # cuCtxSetLimit's limit for each GPU thread's stack (cuda.h)
DEFAULT_THREAD_STACK = 1024              # bytes per thread the CUDA driver reserves by default


def thread_stack_bytes(device: Any, per_thread: int = DEFAULT_THREAD_STACK) -> int:
    """What a per-thread stack limit reserves on this GPU: one stack for every thread the GPU can hold at
    once (SMs × threads per SM). The default 1 KiB is 264 MiB on an H100 (132 × 2048 threads), 192 MiB on
    an RTX 4090 (128 × 1536), memory nvidia-smi shows in use and PyTorch's allocator never sees."""
    import torch
    p = torch.cuda.get_device_properties(torch.device(device))
    return p.multi_processor_count * p.max_threads_per_multi_processor * per_thread


@functools.lru_cache(maxsize=1)
def _libcuda():
    """The CUDA driver library already loaded by PyTorch (Linux, WSL2, Windows), or None. Looked up once: the
    trainer reads the stack limit after every optimizer step (trim_grown_stack)."""
    import ctypes
    import sys
    for name in (("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def thread_stack_limit(lib=None) -> int | None:
    """The current CUDA context's per-thread stack limit in bytes (cuCtxGetLimit), or None where the driver
    library is missing or the call fails (no current context)."""
    import ctypes
    lib = lib if lib is not None else _libcuda()
    if lib is None:
        return None
    value = ctypes.c_size_t(0)
    try:
        return value.value if lib.cuCtxGetLimit(ctypes.byref(value), CU_LIMIT_STACK_SIZE) == 0 else None
    except AttributeError:                        # not the CUDA driver after all
        return None


def trim_thread_stack(device: Any) -> int:
    """Give back the GPU threads' stack reserve this process's CUDA context holds (measured on an H100:
    264 MiB less in use, bench/RESULTS.md session 12). The driver reserves 1 KiB for every thread the GPU
    can run at once; PyTorch's, cuBLAS's and our Triton kernels need far less, and the driver grows the
    reserve again before any kernel that needs more (its documented behaviour for CU_LIMIT_STACK_SIZE), so
    setting it to 0 changes no result. Makes the device's context current first. Returns the bytes given
    back (0 where there is nothing to do: no CUDA, no driver library, or the call refused)."""
    import ctypes

    import torch
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return 0
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    lib = _libcuda()
    if lib is None:
        return 0
    torch.cuda.set_device(dev)
    torch.cuda.synchronize(dev)                    # creates the device's primary context, current in this thread
    before = thread_stack_limit(lib)
    if not before or lib.cuCtxSetLimit(CU_LIMIT_STACK_SIZE, ctypes.c_size_t(0)) != 0:
        return 0
    return thread_stack_bytes(dev, before)


GROWN_STACK_TRIMS = 3                    # a run gives a grown stack reserve back at most this many times


def trim_grown_stack(device: Any, trims_left: int) -> int:
    """Called after each optimizer step: where the driver's per-thread stack limit has grown past its 1 KiB
    default since the last trim, give it back (trim_thread_stack) and return trims_left - 1; else return
    trims_left unchanged. The growth comes from kernels an autotune only tries: fla's first run on a machine
    (its results are cached on disk afterwards) ends step 1 with 10,640 bytes per thread, 2.68 GiB held on
    an H100 for the rest of the run (bench/RESULTS.md sessions 14 and 15); the kernels kept need 192 bytes
    at most. A kernel that does need more has the driver grow it again, so the trims are counted: a run
    whose kept kernels need more than the default stops trimming after GROWN_STACK_TRIMS, instead of
    paying a synchronisation and a re-reservation every step. Reading the limit is one driver call."""
    import torch
    if trims_left <= 0 or torch.device(device).type != "cuda":
        return trims_left
    limit = thread_stack_limit()
    if limit is None or limit <= DEFAULT_THREAD_STACK:
        return trims_left
    trim_thread_stack(device)
    return trims_left - 1

