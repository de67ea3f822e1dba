"""trainer/files.py and what uses it: every write is all or nothing, a full disk is one line that names the folder
and the size needed, the previous files stay intact, no temporary is left, a killed writer's temporaries are
swept, one run per OUTPUT. The full-disk cases fill a real (tmpfs) file system where mounting is allowed."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, files
from trainer.errors import UserError
from trainer.loop import train

from test_train import config, make_project

ROOT = Path(__file__).resolve().parents[1]


def temps(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


def one_line(err: UserError) -> str:
    text = str(err)
    assert "\n" not in text and "Fix:" in text, text
    return text


# ------------------------------------------------------------------------------------------ the parts
def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(UserError) as e:
        with files.atomic_write(p, need=5_000_000) as f:
            f.write(b"new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    text = one_line(e.value)
    assert "f.bin" in text and str(tmp_path) in text and "disk is full" in text and "5.0 MB" in text
    assert p.read_bytes() == b"old" and temps(tmp_path) == []
    with pytest.raises(ZeroDivisionError):         # not a write error: raised as it is, nothing left either
        with files.atomic_write(p) as f:
            f.write(b"x")
            1 / 0
    assert p.read_bytes() == b"old" and temps(tmp_path) == []


def test_save_atomic_turns_torch_saves_wrapped_error_into_one_line(tmp_path, monkeypatch):
    """torch.save raises RuntimeError('... unexpected pos') over the file's OSError: still the full-disk line."""
    p = tmp_path / "m.pth"
    checkpoint.save_atomic({"a": torch.ones(3)}, p)

    def full(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="disk is full, which needs about"):
        checkpoint.save_atomic({"a": torch.zeros(1000)}, p)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_checkpoint(p)["a"], torch.ones(3)) and temps(tmp_path) == []


def test_append_text_is_whole_or_cut_back(tmp_path, monkeypatch):
    p = tmp_path / "loss.csv"
    files.append_text(p, "a,1\n")
    real = os.write
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:3]))          # a part reaches the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match="loss.csv"):
        files.append_text(p, "b,2\nc,3\n")
    monkeypatch.undo()
    assert p.read_text() == "a,1\n"


def test_sweep_removes_only_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone = tmp_path / f".rwkv-0.pth.{dead}.0123abcd.tmp"
    mine = tmp_path / f".rwkv-1.pth.{os.getpid()}.0123abcd.tmp"
    init = tmp_path / ".train_state.pth.1.0123abcd.tmp"          # pid 1 is alive
    other = tmp_path / "notes.tmp"                               # not ours
    for p in (gone, mine, init, other):
        p.write_bytes(b"x")
    assert files.sweep_temps(tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, init, other))


def test_one_run_per_output_folder(tmp_path):
    lock = files.hold_folder(tmp_path / "out")
    with pytest.raises(UserError, match=r"in use by another training run \(process \d+\)"):
        files.hold_folder(tmp_path / "out")
    lock.release()
    files.hold_folder(tmp_path / "out").release()


def test_a_file_in_the_way_of_a_folder_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        files.make_folder(tmp_path / "taken" / "sub", "OUTPUT")
    with pytest.raises(UserError, match="is a file, not a folder"):
        checkpoint.save_atomic({"a": torch.ones(1)}, tmp_path / "taken" / "m.pth")


# ------------------------------------------------------------------------------------------ a real full disk
def test_training_on_a_full_disk_stops_with_one_line_and_the_last_save_intact(tmp_path, monkeypatch, small_disk):
    """OUTPUT on a small file system: epoch 0's save fits, epoch 1's train_state.pth does not. One line naming
    the folder, epoch 0's unit intact and resumable once there is room, no temporary left."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(EPOCH_STEPS=3, EPOCH_COUNT=2)
    train(config(OUTPUT="probe", **kw), progress=False, log=lambda *_: None)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "probe").iterdir()}
    first = sum(v for k, v in sizes.items() if k not in ("rwkv-1.pth",))
    disk = small_disk((first + sizes["rwkv-1.pth"] + sizes["train_state.pth"] // 2) // 1024)
    out = disk / "out"
    with pytest.raises(UserError) as e:
        train(config(OUTPUT=str(out), **kw), progress=False, log=lambda *_: None)
    text = one_line(e.value)
    assert "train_state.pth" in text and str(out) in text and "disk is full" in text and "free there" in text
    assert temps(out) == []
    state = checkpoint.load_train_state(out / "train_state.pth")           # epoch 0's unit, whole
    assert state["opt_step"] == 3 and state["adapter"] == "rwkv-0.pth"
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)   # room again: resume finishes
    res = train(config(OUTPUT=str(out), RESUME=1, **kw), progress=False, log=lambda *_: None)
    assert len(res.losses) == 3


def test_tokenize_and_merge_on_a_full_disk(tmp_path, small_disk):
    disk = small_disk(64)
    data = disk / "data"
    data.mkdir()
    src = ROOT / "data" / "sample.jsonl"
    (data / "sample.jsonl").write_bytes(src.read_bytes())
    small = subprocess.run([sys.executable, "-m", "tools.make_tokenize", "sample.jsonl", "--data-dir", str(data)],
                           cwd=ROOT, capture_output=True, text=True)
    assert small.returncode == 0, small.stderr
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    big = subprocess.run([sys.executable, "-m", "tools.make_tokenize", "sample.jsonl", "40", "--data-dir", str(data)],
                         cwd=ROOT, capture_output=True, text=True)
    assert big.returncode == 2 and "Traceback" not in big.stderr, big.stderr
    lines = big.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0] and str(data) in lines[0]
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before        # the earlier files intact, no temp

    # merge into a full disk: one line, nothing left in MERGE_DIR
    make_project(tmp_path, 7)
    os.chdir(tmp_path)
    try:
        train(config(FINETUNE_MODE="full", LR_INIT="1e-3", LR_FINAL="1e-3", EPOCH_STEPS=1), progress=False,
              log=lambda *_: None)
    finally:
        os.chdir(ROOT)
    tiny = small_disk(32)
    r = subprocess.run([sys.executable, "-m", "tools.merge", "0", "--output", str(tmp_path / "output"),
                        "--model-dir", str(tmp_path / "model"), "--merge-dir", str(tiny / "merge"), "--dtype", "fp32"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "disk is full" in r.stderr and str(tiny / "merge") in r.stderr
    assert list((tiny / "merge").iterdir()) == []


def test_tokenize_sweeps_a_killed_writers_temporaries(tmp_path):
    from trainer.data.prepare import tokenize_data
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "sample.jsonl").write_bytes((ROOT / "data" / "sample.jsonl").read_bytes())
    left = tmp_path / f".sample.bin.{dead}.0123abcd.tmp"
    left.write_bytes(b"\0" * 1000)
    said = []
    tokenize_data(tmp_path / "sample.jsonl", log=said.append)
    assert not left.exists() and any(left.name in s and "killed" in s for s in said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.bin", "sample.idx", "sample.jsonl"]
