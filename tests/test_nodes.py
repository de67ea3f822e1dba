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


def test_a_machine_without_its_number_is_refused_before_anything(tmp_path, monkeypatch):
    make_project(tmp_path, 7, items=ITEMS)
    monkeypatch.chdir(tmp_path)
    for name in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="NODES=2 but NODE_RANK and MASTER_ADDR are not set") as err:
        train(config(**COMMON, NODES=2), progress=False, log=lambda *_: None)
    assert "NODE_RANK=0 MASTER_ADDR=" in err.value.fix
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
    for r in runs:        # and the process group left before exiting (no C++ "terminate called" after the line)
        assert "Traceback" not in r.stderr and "terminate called" not in r.stderr, r.stderr[-3000:]
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


class _Fabric:
    def __init__(self, world_size, global_rank):
        self.world_size, self.global_rank = world_size, global_rank


def _together_as(rank, world, machines, failing, monkeypatch):
    """``together`` on process ``rank`` of ``world`` when the processes in ``failing`` raise a UserError (each
    naming itself): what that process returns or raises."""
    import torch.distributed as dist
    from trainer.strategy import together

    def gather(out, mine):          # every process's contribution, as all_gather_object would collect them
        for r in range(world):
            out[r] = (f"bad on {r}.", "fix it") if r in failing else None
    monkeypatch.setattr(dist, "all_gather_object", gather)

    def work():
        if rank in failing:
            raise UserError(f"bad on {rank}.", "fix it")
        return "ready"
    try:
        return together(_Fabric(world, rank), work, machines)
    except (UserError, SystemExit) as stop:
        return stop


def test_together_stops_every_process_with_one_line_each_machine(monkeypatch):
    """The logic of strategy.together without processes: a refusal anywhere stops all; the first process shows
    its own line or the first failing one's; another machine's first failing process shows its own; the rest
    leave quietly with exit code 2."""
    def run(rank, world=2, machines=1, failing=()):
        return _together_as(rank, world, machines, set(failing), monkeypatch)

    assert run(0) == "ready" and run(1) == "ready"
    said = run(0, failing={0, 1})
    assert isinstance(said, UserError) and said.message == "bad on 0."                 # its own, once
    assert isinstance(run(1, failing={0, 1}), SystemExit) and run(1, failing={0, 1}).code == 2
    said = run(0, failing={1})                                                          # only another one
    assert isinstance(said, UserError) and said.message == "process 1: bad on 1." and said.fix == "fix it"
    assert isinstance(run(1, failing={1}), SystemExit)                                  # shown by process 0
    # two machines of 2: process 2 is NODE_RANK=1's first
    said = run(0, world=4, machines=2, failing={2, 3})
    assert said.message == "process 2 (on the machine with NODE_RANK=1): bad on 2."
    assert run(2, world=4, machines=2, failing={2, 3}).message == "bad on 2."          # its machine's screen
    assert isinstance(run(3, world=4, machines=2, failing={2, 3}), SystemExit)
    assert isinstance(run(1, world=4, machines=2, failing={2, 3}), SystemExit)
    # one process: the error as it is
    from trainer.strategy import together
    with pytest.raises(UserError, match="alone"):
        together(_Fabric(1, 0), lambda: (_ for _ in ()).throw(UserError("alone.")))
