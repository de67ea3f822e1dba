"""The training loop end to end on tiny models (CPU, fp32): every method x every RWKV version, saving,
exact resume, Ctrl+C."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data.binidx import write_binidx
from trainer.loop import train
from trainer.peft import get_method

from rwkv_ref import random_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
METHOD_KEYS = {   # a key every saved adapter of the method must contain, and the suffixes allowed
    "lora": ("blocks.0.att.key.lora_A", (".lora_A", ".lora_B")),
    "dora": ("blocks.0.att.key.dora_magnitude", (".lora_A", ".lora_B", ".dora_magnitude")),
    "pissa": ("blocks.0.att.key.lora_B", (".lora_A", ".lora_B", ".pissa_init_A", ".pissa_init_B")),
    "bone": ("blocks.0.ffn.key.disha", (".disha",)),
    "miss": ("blocks.0.ffn.key.disha", (".disha",)),
    "bat": ("blocks.1.att.value.disha", (".disha",)),
    "state": ("blocks.1.att.time_state", (".time_state",)),
}


def make_project(root: Path, version: int, items=None, seed=0) -> None:
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    # like a pretrained base, no tensor is zero (a fresh init's zero output projections would give
    # PiSSA nothing to start from)
    model = random_model(version, 2, 128, vocab_size=VOCAB, seed=seed)
    checkpoint.save_atomic(model.state_dict(), root / "model" / "tiny.pth")
    if items is None:   # 8 short "memorisable" documents of small ids, each ending with 0
        rng = np.random.default_rng(1)
        items = [list(rng.integers(1, VOCAB, size=rng.integers(12, 30))) + [0] for _ in range(8)]
    write_binidx(root / "data" / "toy", items)


def config(**kw) -> TrainConfig:
    env = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output", FINETUNE_MODE="lora", LORA_R="8",
               LORA_ALPHA="16", PISSA_R="8", DISHA_R="32", CTX_LEN="32", MICRO_BSZ="2", EPOCH_STEPS="4",
               EPOCH_COUNT="1", PRECISION="fp32", LR_INIT="1e-2", LR_FINAL="1e-2", OP="chunk",
               GRAD_CP="0", SAMPLE_PROMPT="ab")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("mode", ["lora", "dora", "pissa", "bone", "miss", "bat", "state", "full"])
def test_every_method_every_version(tmp_path, monkeypatch, mode, version):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, version)
    lr = "0.5" if mode == "state" else ("2e-3" if mode == "full" else "1e-2")
    cfg = config(FINETUNE_MODE=mode, LR_INIT=lr, LR_FINAL=lr, EPOCH_STEPS=4, EPOCH_COUNT=3,
                 TRAIN_PARTS="ln" if mode == "lora" else "", GRAD_CP=int(mode == "state"))
    res = train(cfg, progress=False, log=lambda *_: None)
    assert len(res.losses) == 12 and not res.interrupted
    # the same 8 items every epoch: the loss on them must fall clearly
    assert np.mean(res.losses[-4:]) < np.mean(res.losses[:4]) - 0.05, res.losses
    saved = sorted(p.name for p in (tmp_path / "output").glob("rwkv-*.pth"))
    assert saved == ["rwkv-0.pth", "rwkv-1.pth", "rwkv-2.pth"]
    for name in ("loss.csv", "loss.png", "samples.txt", "train_state.pth"):
        assert (tmp_path / "output" / name).is_file()
    tensors, meta = checkpoint.load_adapter(tmp_path / "output" / "rwkv-2.pth")
    # the file holds exactly the method's tensors (plus TRAIN_PARTS), and the metadata merge needs
    base_keys = set(checkpoint.load_checkpoint(tmp_path / "model" / "tiny.pth"))
    if mode == "full":
        assert set(tensors) == base_keys
    else:
        must, suffixes = METHOD_KEYS[mode]
        assert must in tensors
        extra = {k for k in tensors if not k.endswith(suffixes)}
        if mode == "lora":
            assert extra and all(".ln" in k or k.startswith("ln_out") for k in extra)
        else:
            assert not extra
    assert meta["method"] == mode and meta["epoch"] == 2 and meta["complete"] is True
    assert meta["base"]["name"] == "tiny.pth" and meta["base"]["version"] == version
    assert meta["base"]["fingerprint"] == checkpoint.fingerprint(checkpoint.load_checkpoint("model/tiny.pth"))
    assert meta["settings"] == get_method(mode)(meta["settings"]).metadata()
    # the adapter reproduces the trained model: its loss on the data is the loss the loop reached
    model = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
    model.op = "chunk"
    checkpoint.attach_adapter(model, "output/rwkv-2.pth", "model/tiny.pth")
    assert all(not p.requires_grad for p in model.parameters())


def test_miss_trains_as_bone_and_keeps_its_name(tmp_path, monkeypatch):
    """FINETUNE_MODE=miss (Bone's current name): the same losses and tensors as bone, bit for bit; the run says
    what it is, the checkpoint records "miss" and the merged file is named after it."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 6)
    lines = []
    bone = train(config(FINETUNE_MODE="bone", OUTPUT="b"), progress=False, log=lambda *_: None)
    miss = train(config(FINETUNE_MODE="miss", OUTPUT="m"), progress=False, log=lines.append)
    assert miss.losses == bone.losses
    assert any("MiSS is RWKV-PEFT's current name for Bone" in line for line in lines)
    a, meta_b = checkpoint.load_adapter("b/rwkv-0.pth")
    b, meta_m = checkpoint.load_adapter("m/rwkv-0.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (meta_b["method"], meta_m["method"]) == ("bone", "miss") and meta_b["settings"] == meta_m["settings"]
    merged = checkpoint.merge_epoch(0, output_dir="m", merge_dir="merge", dtype="fp32")
    assert merged.model.name == "tiny-miss-0.pth"
    other = checkpoint.merge_epoch(0, output_dir="b", merge_dir="merge", dtype="fp32")
    sd, sd_b = checkpoint.load_checkpoint(merged.model), checkpoint.load_checkpoint(other.model)
    assert all(torch.equal(sd[k], sd_b[k]) for k in sd_b)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=3, MINI_BSZ=2, LORA_DROPOUT="0.1", LR_FINAL="1e-3",
              WARMUP_STEPS=1, TRAIN_PARTS="time")
    full = train(config(OUTPUT="a", **kw), progress=False, log=lambda *_: None)
    first = train(config(OUTPUT="b", **kw), progress=False, log=lambda *_: None, max_steps=7)
    assert first.interrupted and (tmp_path / "b" / "rwkv-interrupted.pth").is_file()
    rest = train(config(OUTPUT="b", RESUME=1, **kw), progress=False, log=lambda *_: None)
    assert len(full.losses) == 6 and len(first.losses) == 3 and len(rest.losses) == 3
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)
    a, _ = checkpoint.load_adapter(tmp_path / "a" / "rwkv-2.pth")
    b, _ = checkpoint.load_adapter(tmp_path / "b" / "rwkv-2.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_changed_settings_and_missing_state(tmp_path, monkeypatch):
    from trainer.errors import UserError
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 6)
    with pytest.raises(UserError, match="nothing to resume"):
        train(config(RESUME=1), progress=False, log=lambda *_: None)
    train(config(), progress=False, log=lambda *_: None, max_steps=1)
    with pytest.raises(UserError, match="LORA_R 8 → 4 changed"):
        train(config(RESUME=1, LORA_R=4), progress=False, log=lambda *_: None)
    state_path = tmp_path / "output" / "train_state.pth"     # a run saved with the 8-bit optimizer (GPU only)
    state = checkpoint.load_train_state(state_path)
    state["config"]["OPTIMIZER"] = "adamw8bit"
    checkpoint.save_atomic(state, state_path)        # not over the file the loader has mapped
    with pytest.raises(UserError, match="OPTIMIZER adamw8bit → adamw changed") as e:
        train(config(RESUME=1), progress=False, log=lambda *_: None)
    assert "OPTIMIZER=adamw8bit" in e.value.fix


def test_nan_loss_stops_with_a_message(tmp_path, monkeypatch):
    from trainer.errors import UserError
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    with pytest.raises(UserError, match=r"loss became nan at epoch 0, step \d"):
        train(config(FINETUNE_MODE="full", LR_INIT="1e30", LR_FINAL="1e30", EPOCH_STEPS=4),
              progress=False, log=lambda *_: None)


def test_ctrl_c_saves_a_loadable_checkpoint(tmp_path):
    make_project(tmp_path, 7)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           **{k: v for k, v in config(EPOCH_STEPS=4, EPOCH_COUNT=10_000).to_env().items()}}
    env["MICRO_BSZ"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "tools.train", "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:       # wait until it is really training (its first optimizer step logged)
        lines.append(line)
        if "optimizer step" in line:
            break
        assert time.time() < deadline, "".join(lines)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    assert "stopped: saved" in out and "RESUME=1" in out
    tensors, meta = checkpoint.load_adapter(tmp_path / "output" / "rwkv-interrupted.pth")
    assert meta["complete"] is False and "blocks.0.att.key.lora_A" in tensors
    state = checkpoint.load_train_state(tmp_path / "output" / "train_state.pth")
    assert state["adapter"] == "rwkv-interrupted.pth" and state["opt_step"] >= 1


def test_ctrl_c_during_an_epochs_save_finishes_it_then_saves_and_resumes(tmp_path, monkeypatch):
    """Ctrl+C while the epoch's checkpoint is written: that file is finished, the run stops as on any
    Ctrl+C (rwkv-interrupted.pth), and resuming from there takes the uninterrupted run's steps."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 6)
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=2, LR_FINAL="1e-3")
    full = train(config(OUTPUT="a", **kw), progress=False, log=lambda *_: None)
    real = checkpoint.save_adapter
    sent = []

    def ctrl_c_in_the_middle(path, tensors, meta):
        if meta["complete"] and not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)     # lands in the middle of this save
        return real(path, tensors, meta)

    monkeypatch.setattr(checkpoint, "save_adapter", ctrl_c_in_the_middle)
    said = []
    first = train(config(OUTPUT="b", **kw), progress=False, log=said.append)
    assert sent and first.interrupted and len(first.losses) == 4
    assert [p.name for p in first.saved] == ["rwkv-0.pth", "rwkv-interrupted.pth"]
    assert any("stopped: saved" in line for line in said)
    _, meta = checkpoint.load_adapter(tmp_path / "b" / "rwkv-0.pth")
    assert meta["complete"] is True
    state = checkpoint.load_train_state(tmp_path / "b" / "train_state.pth")
    assert state["adapter"] == "rwkv-interrupted.pth" and state["opt_step"] == 4
    monkeypatch.setattr(checkpoint, "save_adapter", real)
    rest = train(config(OUTPUT="b", RESUME=1, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)


def test_ctrl_c_right_after_an_optimizer_step_saves_that_step(tmp_path, monkeypatch, capfd):
    """Ctrl+C as the optimizer finishes a step (before the loop has counted it): the step is counted and its
    position saved with its weights, so resuming takes the uninterrupted run's steps (not that one twice)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=2, LR_FINAL="1e-3")
    full = train(config(OUTPUT="a", **kw), progress=False, log=lambda *_: None)
    steps = []

    def ctrl_c_after_the_third(opt, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(ctrl_c_after_the_third)
    try:
        first = train(config(OUTPUT="b", **kw), progress=False, log=lambda *_: None)
    finally:
        handle.remove()
    assert first.interrupted and len(first.losses) == 3
    assert "Ctrl+C: finishing the optimizer step first" in capfd.readouterr().err
    assert checkpoint.load_train_state(tmp_path / "b" / "train_state.pth")["opt_step"] == 3
    rest = train(config(OUTPUT="b", RESUME=1, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_infctx_training_equals_normal_training(tmp_path, monkeypatch, mode):
    """The loop with TRAIN_TYPE=infctx (chunks of 7 tokens, not dividing CTX_LEN=32) takes the same steps."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7, items=[list(range(1, 60)) + [0]] * 4 + [list(range(3, 40)) + [0]] * 4)
    lr = "0.2" if mode == "state" else "1e-2"
    kw = dict(FINETUNE_MODE=mode, LR_INIT=lr, LR_FINAL=lr, EPOCH_STEPS=4, EPOCH_COUNT=2, GRAD_CP=1)
    normal = train(config(OUTPUT="n", **kw), progress=False, log=lambda *_: None)
    chunked = train(config(OUTPUT="i", TRAIN_TYPE="infctx", CHUNK_CTX=7, **kw), progress=False,
                    log=lambda *_: None)
    np.testing.assert_allclose(chunked.losses, normal.losses, rtol=1e-5)


def test_ctx_warmup_grows_the_training_length(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 6, items=[list(range(1, 60)) + [0]] * 16)
    seen = []
    from trainer.model import RWKV
    real = RWKV.forward

    def spy(self, idx, state=None, targets=None, mask=None):
        seen.append(targets.shape[1])
        return real(self, idx, state, targets, mask)

    monkeypatch.setattr(RWKV, "forward", spy)
    train(config(CTX_LEN=48, INITIAL_CTX_LEN=16, CTX_WARMUP_STEPS=4, EPOCH_STEPS=8), progress=False,
          log=lambda *_: None)
    assert seen[0] == 16 and seen[-1] == 48 and seen == sorted(seen)


def test_dry_run_shows_config_count_and_masked_samples(tmp_path, monkeypatch):
    from trainer.data.tokenizer import get_tokenizer
    from trainer.loop import count_trainable, dry_run
    monkeypatch.chdir(tmp_path)
    tok = get_tokenizer()
    items = [tok.encode("User: hi there\n\nAssistant: hello, friend") + [0]] * 4
    make_project(tmp_path, 7, items=items)
    # the World tokenizer's ids need the full vocabulary
    checkpoint.save_atomic(random_model(7, 2, 128, vocab_size=65536).state_dict(), "model/tiny.pth")
    lines = []
    prep = dry_run(config(LOSS_MASK="qa", EPOCH_STEPS=2, SAMPLE_PROMPT="User: a\n\nAssistant:"),
                   log=lines.append)
    text = "\n".join(lines)
    train_n, _ = count_trainable(prep.model)
    # LoRA r=8 on RWKV-7, width 128: att receptance/key/value/output 8·(128+128) each, ffn key and value
    # 8·(128+512) each, two layers
    assert train_n == 2 * (4 * 8 * 256 + 2 * 8 * 640) == 36_864
    assert "Trainable: 36,864 parameters" in text
    assert "FINETUNE_MODE     = lora" in text and "SAMPLE_PROMPT     = 'User: a\\n\\nAssistant:'" in text
    assert text.count("--- sample") == 2
    assert "⟦User: hi there\n\nAssistant:⟧ hello, friend" in text      # the qa mask: the question is not trained
    assert "Dry run only" in text and not (tmp_path / "output").exists()


def test_a_method_that_cannot_learn_on_the_base_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """State tuning, PiSSA and DoRA on a fresh RWKV-LM init (zero att.output and ffn.value): the dry run (and so
    training) stops with one line and the fix; LoRA on it is fine; a base with one silent layer trains with
    a warning that names what cannot learn (the check itself: test_peft)."""
    from tools import train as train_tool
    from trainer.errors import UserError, run_cli
    from trainer.loop import dry_run
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    fresh = checkpoint.init_model(checkpoint.config_from_sizes(7, 2, 128, VOCAB))
    checkpoint.save_atomic(fresh.state_dict(), "model/fresh.pth")
    for mode in ("state", "pissa", "dora"):
        with pytest.raises(UserError, match=f"FINETUNE_MODE={mode} cannot learn on fresh.pth: att.output.weight is "
                                            "zero in every layer; ffn.value.weight is zero in every layer"):
            dry_run(config(MODEL="fresh.pth", FINETUNE_MODE=mode), log=lambda *_: None)
    for k, v in config(MODEL="fresh.pth", FINETUNE_MODE="state").to_env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        run_cli(train_tool.main, ["--dry-run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and err.startswith("error: FINETUNE_MODE=state cannot learn")
    assert "Fix: fine-tune a trained base model" in err
    lines = []
    dry_run(config(MODEL="fresh.pth", FINETUNE_MODE="lora"), log=lines.append)
    assert not any("cannot learn" in line or line.startswith("warning") for line in lines)
    sd = dict(checkpoint.load_checkpoint("model/tiny.pth"))
    sd["blocks.1.att.output.weight"] = torch.zeros_like(sd["blocks.1.att.output.weight"])
    checkpoint.save_atomic(sd, "model/half.pth")
    lines = []
    dry_run(config(MODEL="half.pth", FINETUNE_MODE="state"), log=lines.append)
    assert ("warning: 1 of the 2 tensors FINETUNE_MODE=state trains get an exactly zero gradient at every step on "
            "half.pth (att.output.weight is zero in layer 1): blocks.1.att.time_state will stay as they start") in lines


def test_evaluate_with_adapter_gives_the_trained_models_loss(tmp_path, monkeypatch, capsys):
    import json

    from tools.evaluate import main as evaluate_main
    from trainer.data.binidx import BinIdx
    from trainer.inference import evaluate_loss
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 6)
    train(config(EPOCH_STEPS=4, EPOCH_COUNT=2), progress=False, log=lambda *_: None)
    evaluate_main(["--model", "model/tiny.pth", "--data", "data/toy", "--op", "chunk"])
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evaluate_main(["--model", "model/tiny.pth", "--data", "data/toy", "--op", "chunk",
                   "--adapter", "output/rwkv-1.pth"])
    tuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
    model.op = "chunk"
    checkpoint.attach_adapter(model, "output/rwkv-1.pth", "model/tiny.pth")
    data = BinIdx("data/toy")
    expect = evaluate_loss(model, [data[i] for i in range(len(data))])
    assert tuned["loss"] == pytest.approx(expect["loss"], rel=1e-6)
    assert tuned["loss"] < base["loss"] - 0.1


def train_in_processes(root: Path, **settings) -> str:
    """``python -m tools.train`` in ``root`` with ``config(**settings)`` (GPU_COUNT=2 on the CPU: two DDP processes
    over gloo); its output. Fails the test if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **config(**settings).to_env()}
    p = subprocess.run([sys.executable, "-m", "tools.train", "--no-progress"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_two_processes_ddp_equal_one_process_with_the_doubled_batch(tmp_path):
    """Several GPUs, proven on the CPU: 2 DDP processes (gloo) with MICRO_BSZ=1 take the same steps as one
    process with MICRO_BSZ=2 (each step sees the same items), and write the same checkpoint."""
    items = [list(range(5 + i, 45 + i)) + [0] for i in range(8)]       # equal lengths: equal token counts
    make_project(tmp_path, 7, items=items)
    common = dict(EPOCH_STEPS=2, EPOCH_COUNT=2, CTX_LEN=24, ACCELERATOR="cpu", TRAIN_PARTS="ln")

    def run(out, **kw):
        text = train_in_processes(tmp_path, OUTPUT=out, **common, **kw)
        with open(tmp_path / out / "loss.csv") as fh:
            return [float(r.split(",")[2]) for r in fh.read().splitlines()[1:]], text

    one, _ = run("one", MICRO_BSZ=4)
    two, log = run("two", MICRO_BSZ=2, GPU_COUNT=2)
    assert "× 2 processes" in log
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=2e-5)
    a, _ = checkpoint.load_adapter(tmp_path / "one" / "rwkv-1.pth")
    b, _ = checkpoint.load_adapter(tmp_path / "two" / "rwkv-1.pth")
    # Summation order differs between one process and an all-reduce over two. Adam divides each gradient
    # by its own running size, so entries whose gradient is ~0 (LoRA's A before B has grown) move by
    # rounding noise: compare each tensor as a whole, by the relative size of the difference.
    for k in a:
        assert (b[k] - a[k]).norm() <= 1e-3 * a[k].norm() + 1e-6, k


def test_wandb_gets_every_step_when_set(tmp_path, monkeypatch):
    """WANDB is accepted, so it must work: the run is created with the project and the config, every
    optimizer step is logged, and the run is finished. (A stand-in module records the calls.)"""
    import types
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda project, config: calls["init"].append((project, config)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    res = train(config(WANDB="my-project", EPOCH_STEPS=4), progress=False, log=lambda *_: None)
    assert calls["init"][0][0] == "my-project" and calls["init"][0][1]["FINETUNE_MODE"] == "lora"
    assert [s for s, _ in calls["log"]] == [1, 2, 3, 4]
    assert [d["loss"] for _, d in calls["log"]] == pytest.approx(res.losses)
    assert calls["finish"] == 1


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    from trainer.errors import UserError
    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb -> ImportError
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    with pytest.raises(UserError, match="pip install wandb"):
        train(config(WANDB="p"), progress=False, log=lambda *_: None)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    from trainer.errors import UserError
    from trainer.plan import Machine
    from trainer.plan import precision_of as resolve_precision
    t4 = Machine(device="cuda", name="Tesla T4", capability=(7, 5), bf16=False, native_bf16=False)
    cpu = Machine(device="cpu", name="cpu", capability=(0, 0), bf16=False, native_bf16=False, probed=True)
    with pytest.raises(UserError, match=r"PRECISION=bf16 but this GPU \(Tesla T4\) has no bf16 support.*fp16"):
        resolve_precision(config(PRECISION="bf16"), t4)
    assert resolve_precision(config(PRECISION="fp16"), t4) == ("16-mixed", torch.float16)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision(config(PRECISION="fp16"), cpu)


def test_precision_auto_is_bf16_on_a_gpu_with_it_fp16_on_one_without_fp32_on_the_cpu(monkeypatch):
    from trainer.config import PRECISIONS
    from trainer.plan import Machine, _native_bf16, precision_name
    from trainer.plan import precision_of as resolve_precision
    assert TrainConfig.from_env(dict(MODEL="m", DATA="d")).PRECISION == "auto" and "auto" in PRECISIONS
    auto = config(PRECISION="auto")
    cpu = Machine(device="cpu", name="cpu", capability=(0, 0), bf16=False, native_bf16=False, probed=True)
    assert resolve_precision(auto, cpu) == ("32-true", torch.float32)

    def cuda():          # the GPU as Machine.probe reads its bf16 support
        return Machine(device="cuda", bf16=torch.cuda.is_bf16_supported(), native_bf16=_native_bf16())
    native = [True]      # is_bf16_supported(including_emulation=True), torch's default, also says yes on a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native[0])
    assert precision_name(auto, cuda()) == "bf16" and resolve_precision(auto, cuda()) == ("bf16-mixed", torch.bfloat16)
    native[0] = False    # a T4: bf16 only emulated -> what PRECISION=fp16 gives (fp16 autocast, fp32 stream)
    assert precision_name(auto, cuda()) == "fp16"
    assert resolve_precision(auto, cuda()) == resolve_precision(config(PRECISION="fp16"), cuda()) == ("16-mixed", torch.float16)
    for p in ("bf16", "fp16", "fp32"):    # set by hand: kept as set
        assert precision_name(config(PRECISION=p), cuda()) == p


def test_resume_with_precision_auto_continues_a_run_saved_in_what_it_resolves_to(tmp_path, monkeypatch):
    """A run saved with PRECISION=fp32 (or auto) on the CPU resumes with PRECISION=auto (fp32 there): not
    refused, and the same losses as the uninterrupted run; the log says what auto resolved to."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(EPOCH_STEPS=4, EPOCH_COUNT=2)
    full = train(config(OUTPUT="a", **kw), progress=False, log=lambda *_: None)
    first = train(config(OUTPUT="b", **kw), progress=False, log=lambda *_: None, max_steps=3)
    lines = []
    rest = train(config(OUTPUT="b", RESUME=1, PRECISION="auto", **kw), progress=False, log=lines.append)
    assert any(line.startswith("PRECISION=auto: fp32 (") for line in lines)
    assert len(first.losses) == 3 and len(rest.losses) == 5
    np.testing.assert_allclose(first.losses + rest.losses, full.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("oom_at", [0, 3])
def test_grad_cp_auto_falls_back_to_checkpointing_every_block_when_memory_runs_out(tmp_path, monkeypatch, oom_at):
    """GRAD_CP=auto planned too many blocks without checkpointing: the first out-of-memory error switches to
    checkpointing every block and redoes the optimizer step's micro-batches (gradient accumulation: 2), and
    the run's losses are those of GRAD_CP=1 (dropout off: both deterministic)."""
    from trainer import plan as planning
    from trainer.model import RWKV
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    ref = train(config(GRAD_CP="1", MINI_BSZ="2", OUTPUT="ref"), progress=False, log=lambda *_: None).losses
    top = [1]            # GRAD_CP=auto's plan: the top block not checkpointed
    planned = planning.resolve
    monkeypatch.setattr(planning, "resolve", lambda *a, **k: planned(*a, **k).but(plain_top=top[0]))
    calls, seen = [0], []
    real = RWKV.forward

    def forward(self, *a, **k):       # the oom_at-th forward (counting from 0) runs out of memory
        seen.append(self.plain_top)
        calls[0] += 1
        if calls[0] - 1 == oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *a, **k)
    monkeypatch.setattr(RWKV, "forward", forward)
    logs = []
    res = train(config(GRAD_CP="auto", MINI_BSZ="2"), progress=False, log=logs.append)
    assert res.losses == pytest.approx(ref, rel=1e-6)
    assert sum("GRAD_CP=auto: out of GPU memory with the top 1 blocks" in ln for ln in logs) == 1
    # before the error the plan (1 block without checkpointing), after it none; oom_at 3: micro step 2 (the
    # first of the second optimizer step) is redone with micro step 3
    assert seen == [1] * (oom_at + 1) + [0] * (len(seen) - oom_at - 1)
    assert len(seen) == 4 + 1 + (oom_at % 2)
    # without the plan (GRAD_CP=1) the same error stops the run (saved, and told: the test below)
    from trainer.errors import UserError
    top[0], calls[0] = 0, oom_at
    with pytest.raises(UserError, match="out of GPU memory"):
        train(config(GRAD_CP="auto", MINI_BSZ="2", OUTPUT="o2"), progress=False, log=lambda *_: None)


def test_out_of_gpu_memory_saves_and_says_what_would_fit(tmp_path, monkeypatch):
    """Running out of GPU memory (simulated on the CPU) is the settings' fault: the run saves like Ctrl+C (the
    last optimizer step) and stops with a UserError naming the step, the file, and changes of settings
    that the estimate fits in 85 % of what it had estimated; RESUME=1 then continues from there."""
    from trainer import loop
    from trainer.errors import UserError
    from trainer.model import RWKV
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    calls = [0]
    real = RWKV.forward
    planned, prepare = {}, loop.prepare

    def recording(*args, **kwargs):   # the run's plan, whose estimate the error's suggestions keep under
        prep = prepare(*args, **kwargs)
        planned["plan"] = prep.plan
        return prep
    monkeypatch.setattr(loop, "prepare", recording)

    def forward(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *a, **k)
    monkeypatch.setattr(RWKV, "forward", forward)
    cfg = config(GRAD_CP="0", MICRO_BSZ="2", EPOCH_STEPS="4")
    with pytest.raises(UserError) as err:
        train(cfg, progress=False, log=lambda *_: None)
    e = err.value
    assert "out of GPU memory at epoch 0, step 3" in e.message and "rwkv-interrupted.pth" in e.message
    assert "(epoch 0, step 2)" in e.message and "RESUME=1" in e.message
    assert e.fix.startswith("one of: ") and ("GRAD_CP=auto" in e.fix or "MICRO_BSZ=1" in e.fix), e.fix
    budget = 0.85 * planned["plan"].estimate.total / 2**30      # what the run had estimated, less 15 %
    for line in e.fix.removeprefix("one of: ").split("; or "):
        assert float(re.search(r"~([0-9.]+) GiB", line).group(1)) <= budget + 0.05, (line, budget)
    tensors, meta = checkpoint.load_adapter(tmp_path / "output" / "rwkv-interrupted.pth")
    assert meta["optimizer_steps"] == 2 and not meta["complete"]
    res = train(config(GRAD_CP="0", MICRO_BSZ="2", EPOCH_STEPS="4", RESUME="1"), progress=False,
                log=lambda *_: None)
    assert res.global_step == 4 and not res.interrupted


def _losses_with_ffn_pieces(tmp_path, monkeypatch, piece, **kw):
    from trainer import loop
    from trainer import plan as planning
    seen = {}
    prepare = loop.prepare

    def recording(*args, **kwargs):
        prep = prepare(*args, **kwargs)
        seen["piece"] = prep.model.ffn_piece_tokens
        return prep
    with monkeypatch.context() as m:
        m.setattr(loop, "prepare", recording)
        m.setattr(planning, "FFN_PIECE_TOKENS", piece)
        cfg = config(EPOCH_STEPS="4", OUTPUT=f"out{piece}", OVERWRITE="1", **kw)
        losses = train(cfg, log=lambda *_: None, progress=False).losses
    return losses, seen["piece"]


def test_trainer_runs_the_ffn_in_pieces_under_checkpointing(tmp_path, monkeypatch):
    """loop.prepare sets model.ffn_piece_tokens = FFN_PIECE_TOKENS under gradient checkpointing (0 without);
    with pieces (64 tokens a step, pieces of 16) the losses are the whole FFN's, step by step."""
    from trainer.plan import FFN_PIECE_TOKENS, nominal
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    whole, p0 = _losses_with_ffn_pieces(tmp_path, monkeypatch, 0, GRAD_CP="1")
    pieces, p1 = _losses_with_ffn_pieces(tmp_path, monkeypatch, 16, GRAD_CP="1")
    assert (p0, p1) == (0, 16) and len(whole) == 4
    assert pieces == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert _losses_with_ffn_pieces(tmp_path, monkeypatch, 16, GRAD_CP="0")[1] == 0
    # the constant patched above is the one the trainer's plan hands the model (plan.FFN_PIECE_TOKENS)
    sizes = checkpoint.detect_config(checkpoint.load_checkpoint(tmp_path / "model" / "tiny.pth"))
    assert nominal(config(GRAD_CP="1"), sizes).execution.ffn_piece_tokens == FFN_PIECE_TOKENS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gpu_ffn_in_pieces_changes_no_step(tmp_path, monkeypatch, mode):
    """The same on a GPU, compiled (inductor) in bf16: the FFN in 4 pieces gives the whole FFN's losses."""
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", FINETUNE_MODE=mode, GRAD_CP="1",
              LR_INIT="1e-3", LR_FINAL="1e-3")
    whole, _ = _losses_with_ffn_pieces(tmp_path, monkeypatch, 0, **kw)
    pieces, p = _losses_with_ffn_pieces(tmp_path, monkeypatch, 16, **kw)
    assert p == 16 and len(whole) == 4
    assert pieces == pytest.approx(whole, rel=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,quant", [("lora", "none"), ("state", "none"), ("lora", "nf4")])
def test_gpu_memory_savings_change_no_step(tmp_path, monkeypatch, mode, quant):
    """On a GPU the trainer keeps the frozen embedding in CPU memory and gives the CUDA driver's thread-stack
    reserve back (plan.embedding_on_cpu, device.trim_thread_stack): the same losses, step by step, as with
    the embedding on the GPU and the driver's default stack; after set-up the stack limit is below the
    default (the driver grows it from 0 only as far as a kernel needs) and the embedding is on the CPU."""
    if quant != "none":
        pytest.importorskip("bitsandbytes", reason="QUANT on a GPU needs bitsandbytes")
    import ctypes

    from trainer import device as gpu
    from trainer import loop
    from trainer import plan as planning
    lib = gpu._libcuda()
    assert lib is not None
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    seen = {}
    prepare = loop.prepare

    def recording(*args, **kwargs):
        prep = prepare(*args, **kwargs)
        seen["emb"] = prep.model.emb.weight.device.type
        seen["stack"] = gpu.thread_stack_limit(lib)
        return prep
    monkeypatch.setattr(loop, "prepare", recording)
    results = []
    for saving in (False, True):
        torch.cuda.synchronize()
        assert lib.cuCtxSetLimit(gpu.CU_LIMIT_STACK_SIZE, ctypes.c_size_t(gpu.DEFAULT_THREAD_STACK)) == 0
        with monkeypatch.context() as m:
            if not saving:
                m.setattr(planning, "embedding_on_cpu", lambda cfg, method: False)
                m.setattr(gpu, "trim_thread_stack", lambda device: 0)
            cfg = config(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", FINETUNE_MODE=mode, QUANT=quant,
                         GRAD_CP="1", EPOCH_STEPS="4", OUTPUT=f"out{int(saving)}")
            results.append(train(cfg, log=lambda *_: None, progress=False).losses)
        assert seen["emb"] == ("cpu" if saving else "cuda")
        assert (seen["stack"] < gpu.DEFAULT_THREAD_STACK) == saving
    assert len(results[0]) == 4
    assert results[1] == pytest.approx(results[0], rel=1e-6, abs=1e-6)


def test_trainer_looks_for_a_grown_thread_stack_after_every_optimizer_step(tmp_path, monkeypatch):
    """loop.train calls device.trim_grown_stack once per optimizer step (2 micro-batches of 1 a step here),
    with the count of trims left that the previous call returned."""
    from trainer import device as gpu
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    calls = []

    def recording(device, trims_left):
        calls.append(trims_left)
        return trims_left - 1
    monkeypatch.setattr(gpu, "trim_grown_stack", recording)
    train(config(EPOCH_STEPS="6", MICRO_BSZ="1", MINI_BSZ="2"), log=lambda *_: None, progress=False)
    assert calls == [gpu.GROWN_STACK_TRIMS - i for i in range(3)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_stack_grown_during_a_step_is_given_back_after_it(tmp_path, monkeypatch):
    """A kernel that needs a big stack (as an autotune's tried configuration does) grows the driver's limit
    during step 1; after that step the trainer sets it back, and training goes on unchanged (the same
    losses as a run where nothing grew it)."""
    import ctypes

    from trainer import device as gpu
    from trainer import loop
    lib = gpu._libcuda()
    assert lib is not None
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    lr_of_step = loop.learning_rate
    seen = []

    def growing(opt_step, *args, **kwargs):        # just before the optimizer step: "a kernel grew it"
        seen.append(gpu.thread_stack_limit(lib))
        if opt_step == 0 and grow:
            torch.cuda.synchronize()
            assert lib.cuCtxSetLimit(gpu.CU_LIMIT_STACK_SIZE, ctypes.c_size_t(10640)) == 0
        return lr_of_step(opt_step, *args, **kwargs)
    monkeypatch.setattr(loop, "learning_rate", growing)
    results = []
    for grow in (False, True):
        seen.clear()
        cfg = config(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", FINETUNE_MODE="lora", GRAD_CP="1",
                     EPOCH_STEPS="3", OUTPUT=f"out{int(grow)}")
        results.append(train(cfg, log=lambda *_: None, progress=False).losses)
        assert len(seen) == 3 and all(v < gpu.DEFAULT_THREAD_STACK for v in seen[1:])
    assert gpu.thread_stack_limit(lib) < gpu.DEFAULT_THREAD_STACK
    assert results[1] == pytest.approx(results[0], rel=1e-6, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_adamw8bit_trains_saves_and_resumes(tmp_path, monkeypatch):
    """OPTIMIZER=adamw8bit on a GPU (the size limit for 1-byte states lowered so that the tiny model's
    adapters get them): losses within 3 % of AdamW's, step by step, and falling; train_state.pth keeps the
    1-byte states; an interrupted run resumes to the same losses; resuming with the other optimizer is
    refused."""
    pytest.importorskip("bitsandbytes")
    from trainer import strategy
    from trainer.errors import UserError
    monkeypatch.setattr(strategy, "BNB_MIN_8BIT", 256)
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", GRAD_CP="1", LR_INIT="1e-3", LR_FINAL="1e-3",
              EPOCH_STEPS="4", EPOCH_COUNT="2")
    quiet = dict(log=lambda *_: None, progress=False)
    exact = train(config(OUTPUT="a", **kw), **quiet).losses
    eight = train(config(OUTPUT="b", OPTIMIZER="adamw8bit", **kw), **quiet).losses
    assert len(eight) == 8 and eight == pytest.approx(exact, rel=3e-2) and eight[-1] < eight[0]
    saved = checkpoint.load_train_state(tmp_path / "b" / "train_state.pth")["optimizer"]
    kinds = {{**st, **st.get("__bnb_optimizer_quant_state__", {})}["state1"].dtype     # its wrapping for FSDP
             for st in saved["state"].values()}
    assert torch.uint8 in kinds
    first = train(config(OUTPUT="c", OPTIMIZER="adamw8bit", **kw), max_steps=5, **quiet)
    rest = train(config(OUTPUT="c", OPTIMIZER="adamw8bit", RESUME=1, **kw), **quiet)
    assert first.interrupted and first.losses + rest.losses == pytest.approx(eight, rel=2e-3)
    with pytest.raises(UserError, match="OPTIMIZER adamw8bit → adamw changed"):
        train(config(OUTPUT="c", RESUME=1, **kw), **quiet)
