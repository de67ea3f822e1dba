"""Several machines (NODES), proven on the CPU: two "machines" are two project folders on this computer, each
started as training.sh is on a machine of its own (NODE_RANK, MASTER_ADDR, MASTER_PORT), with GPU_COUNT=2 processes
each over gloo. Their ranks and shares of each step, what is written where, a stop and resume, and the one-line
refusals when a machine is set up wrong."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import checkpoint
from trainer.errors import UserError
from trainer.loop import train
from trainer.plan import DEFAULT_PORT, rendezvous

from test_train import ROOT, config, make_project

ITEMS = [list(range(5 + i, 45 + i)) + [0] for i in range(8)]      # equal lengths: equal token counts per sample
COMMON = dict(EPOCH_STEPS=2, EPOCH_COUNT=2, CTX_LEN=24, ACCELERATOR="cpu", TRAIN_PARTS="ln")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_machines(machines: list[Path], *args: str, **settings) -> list[subprocess.CompletedProcess]:
    """``python -m tools.train`` in each folder at once, as machine NODE_RANK = its index (2 processes each)."""
    port = str(free_port())
    procs = []
    for rank, root in enumerate(machines):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NODE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               **config(**COMMON, MICRO_BSZ=1, GPU_COUNT=2, NODES=len(machines), **settings).to_env()}
        procs.append(subprocess.Popen([sys.executable, "-m", "tools.train", "--no-progress", *args], cwd=root,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def losses(out: Path) -> list[float]:
    with open(out / "loss.csv") as fh:
        return [float(r.split(",")[2]) for r in fh.read().splitlines()[1:]]


def test_rendezvous_is_checked_before_any_process_starts():
    cfg = config(NODES=2)
    assert rendezvous(config(), {}) == {}                                   # one machine: nothing to meet
    assert rendezvous(cfg, {"LOCAL_RANK": "1"}) == {}                       # a process Lightning started
    good = {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    assert rendezvous(cfg, good) == {"MASTER_PORT": DEFAULT_PORT}
    assert rendezvous(cfg, {**good, "MASTER_PORT": "29600"}) == {}
    for env, said in [({}, "NODE_RANK and MASTER_ADDR are not set"), ({"NODE_RANK": "0"}, "MASTER_ADDR is not set"),
                      ({**good, "NODE_RANK": "2"}, "numbered 0 to 1"), ({**good, "NODE_RANK": "-1"}, "numbered"),
                      ({**good, "NODE_RANK": "one"}, "numbered"), ({**good, "MASTER_PORT": "70000"}, "not a port"),
                      ({**good, "MASTER_PORT": "x"}, "not a port")]:
        with pytest.raises(UserError, match=said) as err:
            rendezvous(cfg, env)
        assert err.value.fix


def test_a_second_machine_without_its_number_is_one_line(tmp_path):
    make_project(tmp_path, 7, items=ITEMS)
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), **config(**COMMON, NODES=2).to_env())
    p = subprocess.run([sys.executable, "-m", "tools.train", "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: NODES=2 but NODE_RANK and MASTER_ADDR are not set")
    assert not (tmp_path / "output").exists()


@pytest.mark.slow
def test_two_machines_train_resume_and_refuse_as_one(tmp_path, monkeypatch):
    """2 machines × 2 processes, MICRO_BSZ=1 each, take the steps one process takes with MICRO_BSZ=4 (each rank its
    share: global rank = NODE_RANK × GPU_COUNT + local rank); only the first machine writes files. Stopped, then
    resumed, the curve is the uninterrupted one. A machine without the run's files refuses the resume, on every
    process, with one line per machine, and nothing changes."""
    first, second, alone = (tmp_path / n for n in ("first", "second", "alone"))
    for root in (first, second, alone):
        make_project(root, 7, items=ITEMS)
    monkeypatch.chdir(alone)
    expect = train(config(**COMMON, MICRO_BSZ=4), progress=False, log=lambda *_: None).losses

    runs = start_machines([first, second], "--max-steps", "3")     # stopped after 3 of 4 steps
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert "× 4 processes" in runs[0].stdout + runs[0].stderr
    np.testing.assert_allclose(losses(first / "output"), expect[:3], rtol=2e-5)
    assert (first / "output" / "rwkv-interrupted.pth").is_file()
    assert not (second / "output").exists()                 # written by the first machine only
    before = {p.name: p.read_bytes() for p in (first / "output").iterdir() if p.is_file()}

    runs = start_machines([first, second], RESUME=1)        # the second machine lacks the run's files
    assert [r.returncode for r in runs] == [2, 2]
    for r in runs:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    said = [r.stderr.strip().splitlines()[-1] for r in runs]
    assert said[0].startswith("error: process 2 (on the machine with NODE_RANK=1): RESUME=1 but this machine has "
                              "nothing to resume"), said[0]
    assert said[1].startswith("error: RESUME=1 but this machine has nothing to resume") and "folder the machines share" in said[1]
    assert sum("error:" in r.stderr for r in runs) == 2                    # one line per machine, not per process
    assert {p.name: p.read_bytes() for p in (first / "output").iterdir() if p.is_file()} == before

    shutil.copytree(first / "output", second / "output")    # as the fix says
    runs = start_machines([first, second], RESUME=1)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:]
    np.testing.assert_allclose(losses(first / "output"), expect, rtol=2e-5)
    a, _ = checkpoint.load_adapter(first / "output" / "rwkv-1.pth")
    assert set(a) and all(v.isfinite().all() for v in a.values())
