"""A training run killed (kill -9, power cut) at each of its writes, then resumed as a user would: the result is
the uninterrupted run's, to the last digit of every trained tensor and loss, and nothing is left half-written.

The kill comes from tests/crash_helper.py (os._exit at the chosen write, in a real trainer process)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.loop import train

from test_train import config, make_project

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(EPOCH_STEPS=3, EPOCH_COUNT=2, OUTPUT="out", TRAIN_PARTS="ln", LORA_DROPOUT="0.1")
# The writes of that run, in order (CRASH_AT=count lists them):
#   append loss.csv, replace rwkv-0.pth, replace train_state.pth, replace loss.png, append samples.txt,
#   append loss.csv, replace rwkv-1.pth, replace train_state.pth, replace loss.png, append samples.txt
POINTS = [
    "replace:1:before",   # the first adapter's temporary written, not yet renamed: nothing committed
    "replace:1:after",    # rwkv-0.pth there, no train_state.pth yet
    "replace:2:after",    # epoch 0 committed
    "append:3",           # half of epoch 1's loss.csv rows written
    "replace:4:before",   # rwkv-1.pth's temporary written
    "replace:4:after",    # rwkv-1.pth of epoch 1 beside epoch 0's train_state.pth: two moments
    "replace:5:before",   # epoch 1's train_state.pth temporary written, not renamed
    "replace:5:after",    # all committed, loss.png not redrawn
]


def run(tmp_path: Path, crash: str | None = None, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           **config(**SETTINGS).to_env(), **{k: str(v) for k, v in extra.items()}}
    cmd = [sys.executable, str(ROOT / "tests" / "crash_helper.py")] if crash else [sys.executable, "-m", "tools.train"]
    if crash:
        env["CRASH_AT"] = crash
    return subprocess.run(cmd + ["--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its trained tensors and its loss.csv."""
    root = tmp_path_factory.mktemp("reference")
    make_project(root, 7)
    old = os.getcwd()
    os.chdir(root)
    try:
        train(config(**SETTINGS), progress=False, log=lambda *_: None)
    finally:
        os.chdir(old)
    tensors, _ = checkpoint.load_adapter(root / "out" / "rwkv-1.pth")
    return tensors, losses(root / "out")


def losses(out: Path) -> list[tuple[int, float]]:
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("optimizer_step,")
    return [(int(r.split(",")[0]), float(r.split(",")[2])) for r in rows[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_killed_at_a_write_then_resumed_gives_the_uninterrupted_run(tmp_path, reference, point):
    make_project(tmp_path, 7)
    killed = run(tmp_path, crash=point)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    out = tmp_path / "out"
    again = run(tmp_path, RESUME=1)
    if not (out / "train_state.pth").exists():         # nothing was committed: start afresh, as told
        assert again.returncode == 2 and "nothing to resume" in again.stderr, again.stderr
        again = run(tmp_path)
        assert again.returncode == 2 and "OVERWRITE=1" in again.stderr and "already holds" in again.stderr
        again = run(tmp_path, OVERWRITE=1)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    want_tensors, want_losses = reference
    got, meta = checkpoint.load_adapter(out / "rwkv-1.pth")
    assert meta["complete"] and meta["epoch"] == 1 and set(got) == set(want_tensors)
    for k in want_tensors:
        torch.testing.assert_close(got[k], want_tensors[k], rtol=1e-5, atol=1e-6)
    # every optimizer step once, in order, with the uninterrupted run's loss
    steps = losses(out)
    assert [s for s, _ in steps] == [s for s, _ in want_losses]
    np.testing.assert_allclose([v for _, v in steps], [v for _, v in want_losses], rtol=1e-5)
    # the unit matches the adapter it names; no temporary of the killed process is left
    state = checkpoint.load_train_state(out / "train_state.pth")
    assert state["adapter"] == "rwkv-1.pth" and state["save_id"] == meta["save_id"] and state["opt_step"] == 6
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if point.endswith(":before"):
        assert "a temporary file left by a run that was killed" in again.stdout
