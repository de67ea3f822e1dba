"""OUTPUT and RESUME: a new run never overwrites an earlier one unless told (OVERWRITE=1); a resume continues
only the run it belongs to (same base weights, same data, settings it can honour, a unit that is whole) and says
what it honoured; --dry-run refuses what the run would."""
import numpy as np
import pytest
import torch

from trainer import checkpoint, resume
from trainer.config import RESUME_MAY_CHANGE, TrainConfig, resume_changes
from trainer.data.binidx import write_binidx
from trainer.errors import UserError
from trainer.loop import dry_run, train

from rwkv_ref import random_model
from test_train import config, make_project

quiet = dict(progress=False, log=lambda *_: None)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    return tmp_path


def test_a_second_run_into_the_same_output_is_refused_unless_overwrite(project):
    first = train(config(EPOCH_STEPS=2), **quiet)
    (project / "output" / "mine.env").write_text("LORA_R=8\n")          # the web page's saved config
    before = {p.name: p.read_bytes() for p in (project / "output").iterdir()}
    for run in (lambda: train(config(EPOCH_STEPS=2), **quiet), lambda: dry_run(config(EPOCH_STEPS=2), log=lambda *_: None)):
        with pytest.raises(UserError) as e:
            run()
        assert "already holds a training run (rwkv-0.pth" in e.value.message
        assert all(s in e.value.fix for s in ("RESUME=1", "OUTPUT", "OVERWRITE=1"))
    assert {p.name: p.read_bytes() for p in (project / "output").iterdir()} == before      # nothing touched
    said = []
    again = train(config(EPOCH_STEPS=2, OVERWRITE=1, LR_INIT="5e-3", LR_FINAL="5e-3"), progress=False,
                  log=said.append)
    assert any("OVERWRITE=1: removed the earlier run's rwkv-0.pth" in s for s in said)
    rows = (project / "output" / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + len(again.losses) == 1 + len(first.losses)           # the new run's rows only
    assert (project / "output" / "mine.env").read_text() == "LORA_R=8\n"        # not a run file: kept
    with pytest.raises(UserError, match="RESUME=1 and OVERWRITE=1 contradict"):
        config(RESUME=1, OVERWRITE=1)


def test_output_that_is_a_file_and_resume_with_nothing_there(project):
    (project / "taken").write_text("x")
    with pytest.raises(UserError, match="taken is a file, not a folder"):
        dry_run(config(OUTPUT="taken/run"), log=lambda *_: None)
    with pytest.raises(UserError, match="nothing to resume in empty/"):
        dry_run(config(OUTPUT="empty", RESUME=1), log=lambda *_: None)
    assert not (project / "empty").exists()


def test_resume_names_every_refused_change_and_honours_the_others(project):
    train(config(EPOCH_STEPS=4), **quiet, max_steps=2)
    for run in (train, dry_run):
        with pytest.raises(UserError) as e:
            run(config(EPOCH_STEPS=4, RESUME=1, LORA_R=4, CTX_LEN=64, LR_INIT="5e-3", LR_FINAL="5e-3"),
                log=lambda *_: None, **({"progress": False} if run is train else {}))
        assert "LORA_R 8 → 4" in e.value.message and "CTX_LEN 32 → 64" in e.value.message
        assert "LR_INIT" not in e.value.message and e.value.fix.startswith("set LORA_R=8 CTX_LEN=32 to resume")
    said = []
    res = train(config(EPOCH_STEPS=4, RESUME=1, LR_INIT="5e-3", LR_FINAL="5e-3", EPOCH_COUNT=2), progress=False,
                log=said.append)
    honoured = [s for s in said if s.startswith("resuming with a changed setting")]
    assert len(honoured) == 3 and any("EPOCH_COUNT 1 → 2 (more or fewer epochs" in s for s in honoured)
    assert len(res.losses) == 6          # steps 2..3 of epoch 0 and the 4 of epoch 1


def test_resume_refuses_other_base_weights_and_retokenized_data(project):
    train(config(EPOCH_STEPS=4), **quiet, max_steps=2)
    write_binidx(project / "data" / "toy", [[5, 6, 7, 0]] * 8)           # same name, other data
    with pytest.raises(UserError, match=r"the data data/toy \(tokenized again since"):
        dry_run(config(EPOCH_STEPS=4, RESUME=1), log=lambda *_: None)
    make_project(project, 7)                                           # the data back as it was
    other = random_model(7, 2, 128, vocab_size=256, seed=5)             # same file name, other weights
    checkpoint.save_atomic(other.state_dict(), project / "model" / "tiny.pth")
    with pytest.raises(UserError, match=r"MODEL tiny.pth → tiny.pth \(other weights\)"):
        train(config(EPOCH_STEPS=4, RESUME=1), **quiet)


def test_a_damaged_or_mismatched_unit_is_one_line(project):
    train(config(EPOCH_STEPS=4), **quiet, max_steps=2)
    path = project / "output" / "train_state.pth"
    good = checkpoint.load_train_state(path)
    for damage, match in ((lambda s: s.update(opt_step="2"), "opt_step is missing or not a int"),
                          (lambda s: s.pop("tensors"), "its trained tensors are missing"),
                          (lambda s: s.update(format=9), "newer version"),
                          (lambda s: s.update(tensors={"blocks.0.att.key.lora_A": torch.zeros(3)}),
                           "the adapter does not fit this lora set-up"),
                          (lambda s: s.update(optimizer={"state": {}, "param_groups": []}),
                           "optimizer state .* does not fit")):
        state = dict(good)
        damage(state)
        checkpoint.save_atomic(state, path)
        with pytest.raises(UserError, match=match):
            train(config(EPOCH_STEPS=4, RESUME=1), **quiet)
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="truncated or corrupt"):
        dry_run(config(EPOCH_STEPS=4, RESUME=1), log=lambda *_: None)


def test_an_older_versions_unit_resumes_only_with_the_adapter_of_its_moment(project):
    """train_state.pth from before the unit held the tensors: the adapter it names must be of its step."""
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=2)
    full = train(config(OUTPUT="a", **kw), **quiet)
    first = train(config(**kw), **quiet, max_steps=2)
    path = project / "output" / "train_state.pth"
    state = checkpoint.load_train_state(path)
    old = {k: v for k, v in state.items() if k not in ("tensors", "meta", "save_id", "format", "data")}
    checkpoint.save_atomic(old, path)
    rest = train(config(RESUME=1, **kw), **quiet)
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)
    old["opt_step"] = 1                                                 # the adapter is of another moment
    checkpoint.save_atomic(old, path)
    with pytest.raises(UserError, match="are from two different moments"):
        train(config(RESUME=1, **kw), **quiet)


def test_resume_with_weight_decay_is_exact_and_an_older_run_takes_the_new_settings(project):
    """WEIGHT_DECAY > 0 (two optimizer groups): interrupted and resumed, the losses of the uninterrupted run. A run
    saved before AdamW's settings and L2WRAP existed (its config lacks them, its optimizer state is one group)
    resumes with WEIGHT_DECAY=0.1 and L2WRAP=1, and says that they changed."""
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=2, WEIGHT_DECAY="0.1", TRAIN_PARTS="ln", BETA2="0.95")
    full = train(config(OUTPUT="a", **kw), **quiet)
    first = train(config(**kw), **quiet, max_steps=2)
    rest = train(config(RESUME=1, **kw), **quiet)
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)
    train(config(OUTPUT="old", EPOCH_STEPS=4, EPOCH_COUNT=2, TRAIN_PARTS="ln", L2WRAP=0), **quiet, max_steps=2)
    path = project / "old" / "train_state.pth"
    state = checkpoint.load_train_state(path)
    assert len(state["optimizer"]["param_groups"]) == 1
    state["config"] = {k: v for k, v in state["config"].items() if k not in resume.BEFORE_THEY_EXISTED}
    checkpoint.save_atomic(state, path)
    said = []
    rest = train(config(OUTPUT="old", RESUME=1, **kw), progress=False, log=said.append)
    honoured = [s for s in said if s.startswith("resuming with a changed setting")]
    assert [h.split(": ", 1)[1].split(" (")[0] for h in honoured] == [
        "WEIGHT_DECAY 0 → 0.1", "BETA2 0.99 → 0.95", "L2WRAP 0 → 1"], honoured
    assert len(rest.losses) == 6 and np.isfinite(rest.losses).all()     # steps 2..3 of epoch 0, the 4 of epoch 1


def test_every_setting_is_either_checked_or_honoured_on_resume():
    """A new setting has to be placed: resume_changes compares it unless it is named as free or checked by content."""
    names = set(TrainConfig.names())
    assert set(RESUME_MAY_CHANGE) <= names
    base = config().to_env()
    refused, honoured = resume_changes({**base, "LORA_ALPHA": "32", "SEED": "1", "OP": "torch"}, config())
    assert refused == ["LORA_ALPHA 32 → 16.0", "SEED 1 → 42"] and honoured[0].startswith("OP torch → chunk")
    assert resume_changes({**base, "LR_INIT": "0.01"}, config()) == ([], [])      # 1e-2 written another way
    assert resume.UNIT_FORMAT == 2
