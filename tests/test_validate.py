"""The validation set (VALID_DATA / VALID_FRACTION / VALID_EVERY / EARLY_STOP): its loss in loss.csv equals what
tools.evaluate --adapter reports for the saved checkpoint, the best is kept, early stopping stops and saves, no
validation item is trained on, every wrong setting is one line."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.data.binidx import BinIdx, write_binidx
from trainer.errors import UserError
from trainer.loop import train

from rwkv_ref import random_model
from test_train import VOCAB, config, make_project


def _items(n, seed):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, VOCAB, size=rng.integers(12, 40))) + [0] for _ in range(n)]


def _rows(out):
    with open(out / "loss.csv") as fh:
        return list(csv.DictReader(fh))


def _evaluate(capsys, *args):
    from tools.evaluate import main
    assert main(["--model", "model/tiny.pth", "--op", "chunk", "--device", "cpu", "--dtype", "fp32", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_valid_data_loss_equals_evaluate_of_the_saved_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(5, 7) + [[5, 0]])   # long and short items, CTX_LEN cuts some
    lines = []
    res = train(config(VALID_DATA="held", EPOCH_COUNT=2, EPOCH_STEPS=4, CTX_LEN=24), progress=False,
                log=lines.append)
    rows = _rows(tmp_path / "output")
    assert list(rows[0]) == ["optimizer_step", "epoch", "loss", "lr", "tokens_per_s", "valid_loss"]
    valid = {int(r["optimizer_step"]): float(r["valid_loss"]) for r in rows if r["valid_loss"]}
    assert sorted(valid) == [4, 8]                  # at every save (the end of each epoch)
    assert [s for s, _ in res.valid_losses] == [4, 8]
    for epoch, step in ((0, 4), (1, 8)):
        got = _evaluate(capsys, "--data", "data/held", "--adapter", f"output/rwkv-{epoch}.pth")
        assert got["loss"] == pytest.approx(valid[step], abs=2e-6)
        # the items cut to CTX_LEN + 1 = 25 tokens: the targets counted
        assert got["tokens"] == sum(min(len(i), 25) - 1 for i in _items(5, 7)) + 1
    best = min(valid, key=valid.get)
    _, meta = checkpoint.load_adapter(tmp_path / "output" / "rwkv-best.pth")
    assert meta["optimizer_steps"] == best and meta["valid_loss"] == pytest.approx(valid[best])
    text = "\n".join(lines)
    assert "validation: 6 items of held, 113 targets at CTX_LEN 24, at every save" in text
    assert f"validation after optimizer step 4: loss {valid[4]:.4f}" in text


def test_qa_mask_validation_equals_evaluate(tmp_path, monkeypatch, capsys):
    from trainer.data.tokenizer import get_tokenizer
    monkeypatch.chdir(tmp_path)
    tok = get_tokenizer()
    qa = [tok.encode(f"User: question {i}\n\nAssistant: the answer is {i * 7}") + [0] for i in range(6)]
    make_project(tmp_path, 6, items=qa[:4])
    checkpoint.save_atomic(random_model(6, 2, 64, vocab_size=65536).state_dict(), "model/tiny.pth")
    write_binidx(tmp_path / "data" / "held", qa[4:] + [tok.encode("no markers") + [0]])
    train(config(VALID_DATA="held", LOSS_MASK="qa", EPOCH_STEPS=2, VALID_EVERY=1), progress=False,
          log=lambda *_: None)
    rows = _rows(tmp_path / "output")
    assert all(r["valid_loss"] for r in rows)       # every optimizer step
    got = _evaluate(capsys, "--data", "data/held", "--adapter", "output/rwkv-0.pth")
    assert got["loss"] == pytest.approx(float(rows[-1]["valid_loss"]), abs=2e-6)
    plain = _evaluate(capsys, "--data", "data/held", "--adapter", "output/rwkv-0.pth", "--loss-mask", "none")
    assert plain["tokens"] > got["tokens"]           # the questions do not count under qa


def test_valid_fraction_holds_items_out_of_training(tmp_path, monkeypatch, capsys):
    from trainer.validate import split_data
    monkeypatch.chdir(tmp_path)
    items = _items(10, 3)
    make_project(tmp_path, 5, items=items + items)             # as if tokenized with REPEAT=2
    cfg = config(VALID_FRACTION=0.2, EPOCH_STEPS=8, MICRO_BSZ=2, VALID_EVERY=3)
    train_data, valid = split_data(cfg)
    assert len(valid) == 4 and len(train_data) == 16           # 2 of 10 contents, both copies of each
    held = {tuple(np.asarray(valid[i]).tolist()) for i in range(len(valid))}
    assert len(held) == 2
    assert not held & {tuple(np.asarray(train_data[i]).tolist()) for i in range(len(train_data))}
    res = train(cfg, progress=False, log=lambda *_: None)
    assert [s for s, _ in res.valid_losses] == [3, 6, 8]       # every 3 steps and after the last
    got = _evaluate(capsys, "--data", "data/toy", "--adapter", "output/rwkv-0.pth", "--held-out")
    assert got["loss"] == pytest.approx(res.valid_losses[-1][1], abs=2e-6)
    # the same SEED holds the same items out; another seed others
    assert np.array_equal(split_data(cfg)[1].indices, valid.indices)


def test_early_stop_stops_saves_and_resume_goes_on_counting(tmp_path, monkeypatch):
    from trainer import validate
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    losses = iter([3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 5.0, 5.0])
    monkeypatch.setattr(validate.Validation, "loss", lambda self, *a: (next(losses), 10))
    lines = []
    res = train(config(VALID_DATA="held", VALID_EVERY=1, EARLY_STOP=3, EPOCH_STEPS=4, EPOCH_COUNT=3),
                progress=False, log=lines.append)
    # 3.0, 2.0 (best, step 2), then 2.5, 2.1, 2.2: three without a better loss
    assert res.stopped_early and res.interrupted and [s for s, _ in res.valid_losses] == [1, 2, 3, 4, 5]
    out = tmp_path / "output"
    _, meta = checkpoint.load_adapter(out / "rwkv-best.pth")
    assert meta["optimizer_steps"] == 2 and meta["valid_loss"] == 2.0
    assert (out / "rwkv-interrupted.pth").is_file()
    text = "\n".join(lines)
    assert "EARLY_STOP=3: the validation loss has not improved on 2.0000 (optimizer step 2) for 3" in text
    assert "2 of EARLY_STOP=3" in text
    state = checkpoint.load_train_state(out / "train_state.pth")
    assert state["valid"] == {"best": 2.0, "best_step": 2, "since": 3} and state["opt_step"] == 5
    # RESUME=1 (EARLY_STOP may change): the record goes on (1.0 is a new best at step 6, then 5.0 twice)
    res = train(config(VALID_DATA="held", VALID_EVERY=1, EARLY_STOP=2, EPOCH_STEPS=4, EPOCH_COUNT=3, RESUME=1),
                progress=False, log=lines.append)
    assert [s for s, _ in res.valid_losses] == [6, 7, 8] and res.stopped_early
    _, meta = checkpoint.load_adapter(out / "rwkv-best.pth")
    assert meta["optimizer_steps"] == 6 and meta["valid_loss"] == 1.0
    rows = _rows(out)
    assert [r["optimizer_step"] for r in rows] == [str(i) for i in range(1, 9)]
    assert [r["valid_loss"] for r in rows] == ["3.000000", "2.000000", "2.500000", "2.100000", "2.200000",
                                              "1.000000", "5.000000", "5.000000"]


def test_early_stop_due_after_the_last_step_ends_the_run_as_usual(tmp_path, monkeypatch):
    from trainer import validate
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    losses = iter([2.0, 3.0])
    monkeypatch.setattr(validate.Validation, "loss", lambda self, *a: (next(losses), 10))
    res = train(config(VALID_DATA="held", VALID_EVERY=1, EARLY_STOP=1, EPOCH_STEPS=2), progress=False,
                log=lambda *_: None)
    assert not res.interrupted and not res.stopped_early
    assert sorted(p.name for p in (tmp_path / "output").glob("rwkv-*.pth")) == ["rwkv-0.pth", "rwkv-best.pth"]


def test_tools_train_exits_0_after_early_stop(tmp_path, monkeypatch):
    from tools.train import main
    from trainer import validate
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    monkeypatch.setattr(validate.Validation, "loss", lambda self, *a: (1.0, 10))
    env = config(VALID_DATA="held", VALID_EVERY=1, EARLY_STOP=1, EPOCH_STEPS=4).to_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["--no-progress"]) == 0
    assert (tmp_path / "output" / "rwkv-interrupted.pth").is_file()      # it did stop early, at step 2 of 4
    assert not (tmp_path / "output" / "rwkv-0.pth").exists()


@pytest.mark.parametrize("settings, words", [
    (dict(VALID_FRACTION=1), "VALID_FRACTION=1.0 must be at least 0 and less than 1"),
    (dict(VALID_FRACTION=-0.1), "VALID_FRACTION=-0.1 must be at least 0"),
    (dict(VALID_FRACTION="x"), "VALID_FRACTION='x' is not a number"),
    (dict(VALID_FRACTION=0.1, VALID_DATA="held"), "both give a validation set"),
    (dict(VALID_DATA="toy"), "VALID_DATA=toy is the training data"),
    (dict(VALID_EVERY=5), "VALID_EVERY=5 needs a validation set"),
    (dict(EARLY_STOP=2), "EARLY_STOP=2 needs a validation set"),
    (dict(EARLY_STOP=-1, VALID_DATA="held"), "EARLY_STOP=-1 must be 0 or more"),
    (dict(VALID_EVERY=-1, VALID_DATA="held"), "VALID_EVERY=-1 must be 0 or more"),
])
def test_wrong_settings_are_one_line(settings, words):
    with pytest.raises(UserError) as err:
        config(**settings)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_wrong_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    with pytest.raises(UserError, match="VALID_DATA: data/nope.bin/.idx not found. Data in data/: toy"):
        config(VALID_DATA="nope").check_files()
    write_binidx(tmp_path / "data" / "empty", [[0], [3]])
    with pytest.raises(UserError, match="none with 2 tokens or more: there is nothing to validate on"):
        config(VALID_DATA="empty").check_files()
    with pytest.raises(UserError, match="is more than the 7 items in data/toy left for training"):
        config(VALID_FRACTION=0.1, EPOCH_STEPS=4, MICRO_BSZ=2).check_files()
    write_binidx(tmp_path / "data" / "same", [[5, 6, 0]] * 4)
    with pytest.raises(UserError, match="only 1 distinct item") as err:
        config(DATA="same", VALID_FRACTION=0.5, EPOCH_STEPS=1).check_files()
    assert err.value.fix == "add more items to the data, or set VALID_FRACTION=0"
    write_binidx(tmp_path / "data" / "big", [[7, 300, 0]])
    with pytest.raises(UserError, match="data/big.bin holds token id 300, but tiny.pth has a vocabulary of 256"):
        train(config(VALID_DATA="big"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "output").exists()


def test_resume_of_a_run_without_valid_loss_column(tmp_path, monkeypatch):
    """A loss.csv written before the valid_loss column: RESUME=1 gives it the column, its rows an empty cell."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    train(config(EPOCH_STEPS=4), progress=False, log=lambda *_: None, max_steps=2)
    out = tmp_path / "output"
    old = [",".join(line.split(",")[:5]) for line in (out / "loss.csv").read_text().splitlines()]
    (out / "loss.csv").write_text("\n".join(old) + "\n")
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    train(config(EPOCH_STEPS=4, RESUME=1, VALID_DATA="held"), progress=False, log=lambda *_: None)
    rows = _rows(out)
    assert [r["valid_loss"] == "" for r in rows] == [True, True, True, False]
    assert math.isfinite(float(rows[-1]["valid_loss"]))


def test_validation_leaves_training_unchanged(tmp_path, monkeypatch):
    """Validating (dropout on, VALID_EVERY=1) changes neither the training losses nor the saved weights."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    a = train(config(LORA_DROPOUT=0.2, OUTPUT="a"), progress=False, log=lambda *_: None)
    b = train(config(LORA_DROPOUT=0.2, OUTPUT="b", VALID_DATA="held", VALID_EVERY=1), progress=False,
              log=lambda *_: None)
    assert a.losses == b.losses
    ta, _ = checkpoint.load_adapter(tmp_path / "a" / "rwkv-0.pth")
    tb, _ = checkpoint.load_adapter(tmp_path / "b" / "rwkv-0.pth")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_batches_cover_every_item_once_over_processes():
    from trainer.validate import Validation
    data = [np.arange(1, n + 1, dtype=np.uint16) for n in (3, 9, 5, 2, 7)]

    class Items(list):
        sizes = np.array([len(d) for d in data])

    for fixed in (True, False):
        seen = []
        for rank in range(2):
            v = Validation(Items(data), 6, "pad", 2, fixed_len=fixed, rank=rank, world=2)
            n = 0
            for x, y, m in v.batches():
                n += 1
                assert x.shape == (2, 6) if fixed else (x.shape[0] <= 2 and x.shape[1] <= 6)
                seen += [tuple([int(r[0])] + t[:int(k.sum())].tolist()) for r, t, k in zip(x, y, m) if k.sum()]
            assert n == v.batches_per_process == 2
        assert sorted(seen) == sorted(tuple(d[:7].tolist()) for d in data)
    assert BinIdx  # (imported for the reader: the real data is a BinIdx or an ItemView)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_validation_equals_evaluate(tmp_path, monkeypatch, capsys):
    """On a GPU, compiled with CUDA graphs in bf16: validating between steps keeps training going (the graphs
    replay after the pass without gradients), and the loss agrees with tools.evaluate on the saved checkpoint
    (bf16 weights there: to 2 %)."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(5, 7))
    lines = []
    res = train(config(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", COMPILE="1", GRAD_CP="auto",
                       VALID_DATA="held", VALID_EVERY=2, EPOCH_STEPS=4, EPOCH_COUNT=2), progress=False,
                log=lines.append)
    assert [s for s, _ in res.valid_losses] == [2, 4, 6, 8] and all(math.isfinite(v) for v in res.losses)
    from tools.evaluate import main
    assert main(["--model", "model/tiny.pth", "--data", "data/held", "--adapter", "output/rwkv-1.pth"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["loss"] == pytest.approx(res.valid_losses[-1][1], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_validation_with_streamed_blocks(tmp_path, monkeypatch):
    """OFFLOAD_BLOCKS: the pass without gradients streams the blocks' weights as training does; the same
    validation losses as with every block on the GPU."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(5, 7))
    got = {}
    for n in (0, 1):
        res = train(config(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", COMPILE="0", GRAD_CP="1",
                           OFFLOAD_BLOCKS=n, OUTPUT=f"out{n}", VALID_DATA="held", VALID_EVERY=2),
                    progress=False, log=lambda *_: None)
        got[n] = [v for _, v in res.valid_losses]
    assert len(got[0]) == 2 and got[1] == pytest.approx(got[0], rel=1e-3)


def test_two_processes_validate_as_one(tmp_path):
    """DDP (2 processes, gloo, on the CPU): each validates its share of the items (5: one process gets a blank
    row) and the all-reduce gives the one-process loss."""
    from test_train import train_in_processes
    items = [list(range(5 + i, 45 + i)) + [0] for i in range(8)]
    make_project(tmp_path, 7, items=items)
    write_binidx(tmp_path / "data" / "held", _items(5, 7))
    common = dict(EPOCH_STEPS=2, EPOCH_COUNT=2, CTX_LEN=24, ACCELERATOR="cpu", VALID_DATA="held")

    def run(out, **kw):
        train_in_processes(tmp_path, OUTPUT=out, **common, **kw)
        return [float(r["valid_loss"]) for r in _rows(tmp_path / out) if r["valid_loss"]]

    one = run("one", MICRO_BSZ=4)
    two = run("two", MICRO_BSZ=2, GPU_COUNT=2)
    assert len(one) == len(two) == 2
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_wandb_gets_the_validation_loss(tmp_path, monkeypatch):
    import sys
    import types
    logged = []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda project, config: Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    write_binidx(tmp_path / "data" / "held", _items(3, 9))
    res = train(config(VALID_DATA="held", VALID_EVERY=2, WANDB="proj"), progress=False, log=lambda *_: None)
    assert [(s, d["valid_loss"]) for s, d in logged if "valid_loss" in d] == res.valid_losses
    assert [s for s, _ in res.valid_losses] == [2, 4]
