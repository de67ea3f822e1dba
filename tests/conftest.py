"""Shared test set-up."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny models: extra threads only add overhead, and on a 2-core machine shared with
    other jobs they thrash (the same tests ran 5-10x slower with the default threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def one_compile_cache():
    """One inductor cache for the whole run, in-process and subprocess compiles alike: the trainer's keep_compiled
    would otherwise move it to the user's cache folder partway through (the first trainer test that compiles),
    and the graphs compiled before and after would not be shared (a cold machine compiled some twice)."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    set_here = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if set_here:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = default_cache_dir()
    yield
    if set_here:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


@pytest.fixture(autouse=True)
def cpu_memory_not_read(monkeypatch):
    """What OFFLOAD_BLOCKS may keep in CPU memory depends on the machine's free memory (device.host_available):
    unknown in the tests, so that plans and suggestions are the same everywhere (test_offload sets it)."""
    from trainer import device
    monkeypatch.setattr(device, "host_available", lambda *a, **k: None)


@pytest.fixture
def failing_import(monkeypatch):
    """failing_import(name, exc): from now on in this test, ``import name`` raises ``exc``."""
    import builtins
    real = builtins.__import__

    def install(name, exc):
        def fake(mod, *args, **kw):
            if mod == name:
                raise exc
            return real(mod, *args, **kw)
        monkeypatch.setattr(builtins, "__import__", fake)
    return install


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib): a folder on a file system of that size (a tmpfs), to fill up for real; skipped where
    mounting is not allowed (needs root)."""
    import subprocess
    mounted = []

    def make(kib: int):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(d)
        return d
    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def tables_elsewhere(monkeypatch):
    """On a one-GPU run the frozen tables held in CPU memory (trainer/tables.py) are on another device than the
    tokens: their rows are gathered there and copied. On a CPU-only machine every table is on the tokens' device,
    so this makes tables.lookup treat the held ones as elsewhere; the list it returns grows by one per such
    lookup."""
    from trainer import tables
    seen = []

    def elsewhere(w, device):
        if tables.held(w):
            seen.append(w)
        return tables.held(w)
    monkeypatch.setattr(tables, "_elsewhere", elsewhere)
    return seen
