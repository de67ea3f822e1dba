"""merge: every method x every RWKV version, trained for 2 steps on a tiny model, merged in fp32, and checked
against the `rwkv` pip package (one subprocess for RWKV-5/6, one for RWKV-7); the state file and
evaluate --state; every refusal; atomic output, dtype and keys."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import evaluate as evaluate_tool
from tools import merge as merge_tool
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data.binidx import write_binidx
from trainer.errors import UserError, run_cli
from trainer.inference import evaluate_loss
from trainer.loop import train

from rwkv_ref import random_model, start_many

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
METHODS = ("lora", "dora", "pissa", "bone", "bat", "state", "full")
# runs beside one per method: (method, its settings, merge folder); merged and checked in the package as the others
VARIANTS = {"lora-rslora": ("lora", {"LORA_SCALING": "rslora"}, "merge-rslora")}
VERSIONS = (5, 6, 7)
TOKENS = [int(t) for t in np.random.default_rng(3).integers(1, VOCAB, size=12)]


def make_project(root: Path, version: int) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    checkpoint.save_atomic(random_model(version, 2, 128, vocab_size=VOCAB, seed=0).state_dict(),
                           root / "model" / "tiny.pth")
    rng = np.random.default_rng(1)
    items = [list(rng.integers(1, VOCAB, size=rng.integers(12, 30))) + [0] for _ in range(8)]
    write_binidx(root / "data" / "toy", items)


def config(**kw) -> TrainConfig:
    env = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output", FINETUNE_MODE="lora", LORA_R="8", LORA_ALPHA="16",
               PISSA_R="8", DISHA_R="32", CTX_LEN="32", MICRO_BSZ="2", EPOCH_STEPS="2", EPOCH_COUNT="1",
               PRECISION="fp32", LR_INIT="1e-2", LR_FINAL="1e-2", OP="chunk", GRAD_CP="0", SAMPLE_PROMPT="ab")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


def train_run(mode: str, out: str, **kw) -> None:
    lr = "0.5" if mode == "state" else "1e-2"
    train(config(FINETUNE_MODE=mode, OUTPUT=out, LR_INIT=lr, LR_FINAL=lr,
                 TRAIN_PARTS="ln" if mode == "lora" else "", **kw), progress=False, log=lambda *_: None)


@torch.no_grad()
def our_logits(root: Path, adapter: Path | None = None) -> torch.Tensor:
    model = checkpoint.load_model(root / "model" / "tiny.pth", dtype=torch.float32)
    model.op = "chunk"
    if adapter is not None:
        checkpoint.attach_adapter(model, adapter, root / "model" / "tiny.pth")
    return model(torch.tensor([TOKENS]))[0].float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train, merge (fp32) and run the package: {(mode, version): {...}}; {version: project root}."""
    cwd = os.getcwd()
    res, roots = {}, {}
    jobs = {5: [], 6: [], 7: []}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for v in VERSIONS:
            root = tmp_path_factory.mktemp(f"merge_v{v}")
            roots[v] = root
            os.chdir(root)
            make_project(root, v)
            base = our_logits(root)
            for mode in METHODS + tuple(VARIANTS):
                out = f"out-{mode}"
                method, kw, merge_dir = VARIANTS.get(mode, (mode, {}, "merge"))
                train_run(method, out, **kw)
                r = checkpoint.merge_epoch(0, output_dir=out, merge_dir=merge_dir, dtype="fp32", state_model=True)
                entry = {"result": r, "ours": our_logits(root, root / out / "rwkv-0.pth"), "base": base, "jobs": {}}
                if mode == "state":
                    states = checkpoint.load_state_file(r.state)
                    zero = torch.zeros(128)
                    entry["jobs"]["state_file"] = len(jobs[v])
                    jobs[v].append({"model": str(root / "model" / "tiny.pth"), "tokens": TOKENS,
                                    "state": [(zero, s, zero) for s in states]})
                    entry["jobs"]["state_transposed"] = len(jobs[v])       # the other orientation must differ
                    jobs[v].append({"model": str(root / "model" / "tiny.pth"), "tokens": TOKENS,
                                    "state": [(zero, s.transpose(-1, -2), zero) for s in states]})
                entry["jobs"]["model"] = len(jobs[v])
                jobs[v].append({"model": str(root / r.model), "tokens": TOKENS})
                res[(mode, v)] = entry
    finally:
        os.chdir(cwd)
        torch.set_num_threads(n)
    out = start_many({"v56": (5, jobs[5] + jobs[6]), "v7": (7, jobs[7])})
    for (mode, v), entry in res.items():
        got = out["v7"] if v == 7 else out["v56"]
        offset = len(jobs[5]) if v == 6 else 0
        entry["pkg"] = {k: got[offset + i]["logits"] for k, i in entry["jobs"].items()}
    return res, roots


def _close(a, b, atol=1e-4):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", METHODS + tuple(VARIANTS))
def test_merged_model_in_rwkv_package_equals_adapter(runs, mode, version):
    res, _ = runs
    e = res[(mode, version)]
    if mode == "lora-rslora":          # the setting was recorded, and merge used it (else the logits would differ)
        assert e["result"].meta["settings"]["scaling"] == "rslora"
    assert (e["ours"] - e["base"]).abs().max() > 1e-3, "training changed nothing: the test would prove nothing"
    if mode == "state" and version == 7:
        # the package ignores time_state keys of an RWKV-7 model: it gives the base model's logits (as merge says)
        _close(e["pkg"]["model"], e["base"])
        assert any("ignores" in n for n in e["result"].notes)
    else:
        # v5/v6 state: the package reads the model's time_state keys itself (with its own transpose(1, 2))
        _close(e["pkg"]["model"], e["ours"])


@pytest.mark.parametrize("version", VERSIONS)
def test_state_file_as_initial_state_in_rwkv_package(runs, version):
    res, roots = runs
    e = res[("state", version)]
    r = e["result"]
    # the state file put into state[3i+1] (v5/v6 transposed to the package's [key, value], v7 as it is)
    _close(e["pkg"]["state_file"], e["ours"])
    assert (e["pkg"]["state_transposed"] - e["ours"]).abs().max() > 1e-3
    sd = checkpoint.load_checkpoint(roots[version] / r.state)
    assert sorted(sd) == [f"blocks.{i}.att.time_state" for i in range(2)]
    assert all(t.shape == (2, 64, 64) and t.dtype == torch.float32 for t in sd.values())
    tensors, _ = checkpoint.load_adapter(roots[version] / "out-state" / "rwkv-0.pth")
    for k, t in sd.items():          # the file keeps our layout S[value, key] (= RWKV-LM's) unchanged
        assert torch.equal(t, tensors[k].float())


def test_evaluate_with_state_file_equals_attached_state(runs, capsys):
    res, roots = runs
    root = roots[6]
    r = res[("state", 6)]["result"]
    model = checkpoint.load_model(root / "model" / "tiny.pth", dtype=torch.float32)
    model.op = "chunk"
    checkpoint.attach_adapter(model, root / "out-state" / "rwkv-0.pth", root / "model" / "tiny.pth")
    from trainer.data.binidx import BinIdx
    data = BinIdx(root / "data" / "toy")
    want = evaluate_loss(model, (data[i] for i in range(len(data))))
    argv = ["--model", str(root / "model" / "tiny.pth"), "--data", str(root / "data" / "toy"), "--op", "chunk",
            "--device", "cpu", "--state", str(root / r.state)]
    assert evaluate_tool.main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    plain = evaluate_loss(checkpoint.load_model(root / "model" / "tiny.pth", dtype=torch.float32),
                          (data[i] for i in range(len(data))))
    assert abs(plain["loss"] - got["loss"]) > 1e-3
    # a state file of another model, a checkpoint, --state with --adapter: one line, exit 2
    other = root / "wrong-state.pth"
    checkpoint.save_atomic({f"blocks.{i}.att.time_state": torch.zeros(2, 64, 64) for i in range(3)}, other)
    for extra, msg in ((["--state", str(other)], "3 states"),
                       (["--state", str(root / "out-state" / "rwkv-0.pth")], "training checkpoint"),
                       (["--state", str(root / r.state), "--adapter", str(root / "out-state" / "rwkv-0.pth")],
                        "together")):
        with pytest.raises(SystemExit) as exc:
            run_cli(evaluate_tool.main, argv[:-2] + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_output_dtype_keys_and_usage(runs, capsys):
    res, roots = runs
    root = roots[7]
    base = checkpoint.load_checkpoint(root / "model" / "tiny.pth")
    merge_dir = root / "merge-bf16"
    for mode, dtype in (("lora", "bf16"), ("bat", "fp16"), ("full", "bf16")):
        r = checkpoint.merge_epoch(0, output_dir=root / f"out-{mode}", model_dir=root / "model", merge_dir=merge_dir,
                                   dtype=dtype)
        sd = checkpoint.load_checkpoint(r.model)
        assert r.model.name == f"tiny-{mode}-0.pth"
        assert list(sd) == list(base)                              # the official keys, in order, nothing else
        assert all(t.dtype == checkpoint.DTYPES[dtype] for t in sd.values())
        fp32 = checkpoint.load_checkpoint(root / res[(mode, 7)]["result"].model)
        for k in sd:
            torch.testing.assert_close(sd[k], fp32[k].to(sd[k].dtype), rtol=0, atol=0)
    r = checkpoint.merge_epoch(0, output_dir=root / "out-state", model_dir=root / "model", merge_dir=merge_dir)
    assert r.model is None and r.state.name == "tiny-state-0.pth"
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.load_checkpoint(r.state).values())
    assert sorted(p.name for p in merge_dir.iterdir()) == [checkpoint.MERGED_FROM, "tiny-bat-0.pth", "tiny-full-0.pth", "tiny-lora-0.pth",
                                                            "tiny-state-0.pth"]
    text = merge_tool.usage_text(r)              # RWKV-7: the state goes into the package's state as it is
    assert "RWKV_V7_ON" in text and "RWKV-Runner" in text and "Ai00" in text and "transpose" not in text


def test_interrupted_and_lora_with_train_parts_and_state_parts(runs, tmp_path, monkeypatch):
    _, roots = runs
    root = roots[5]
    monkeypatch.chdir(root)
    train(config(FINETUNE_MODE="lora", OUTPUT="out-int", EPOCH_STEPS=4), progress=False, log=lambda *_: None,
          max_steps=1)
    assert checkpoint.list_epochs("out-int") == ["interrupted"]
    r = checkpoint.merge_epoch("interrupted", output_dir="out-int", merge_dir=tmp_path, dtype="fp32")
    assert r.model == tmp_path / "tiny-lora-interrupted.pth" and r.meta["complete"] is False
    # state tuning that also trained TRAIN_PARTS: the state alone is not the model, so both are written
    train(config(FINETUNE_MODE="state", OUTPUT="out-sp", TRAIN_PARTS="ln", LR_INIT="0.1", LR_FINAL="0.1"),
          progress=False, log=lambda *_: None)
    r = checkpoint.merge_epoch(0, output_dir="out-sp", merge_dir=tmp_path, dtype="fp32")
    assert r.state.is_file() and r.model.is_file() and r.notes
    sd = checkpoint.load_checkpoint(r.model)
    tensors, _ = checkpoint.load_adapter("out-sp/rwkv-0.pth")
    assert torch.equal(sd["ln_out.weight"], tensors["ln_out.weight"])
    assert torch.equal(sd["blocks.1.att.time_state"], tensors["blocks.1.att.time_state"])


def test_a_merge_never_replaces_another_checkpoints_file_unless_told(runs, tmp_path, capsys, monkeypatch):
    """Two runs (out-lora, out-other) merged into one MERGE_DIR would both write tiny-lora-0.pth: the second is
    refused; merging the same checkpoint again (another DTYPE) replaces its own file; --overwrite replaces."""
    import shutil
    _, roots = runs
    monkeypatch.chdir(roots[7])
    shutil.copytree("out-lora", tmp_path / "out-other")
    md = tmp_path / "merge"
    common = ["--model-dir", "model", "--merge-dir", str(md)]
    run_cli_ok = lambda argv: pytest.raises(SystemExit, run_cli, merge_tool.main, argv)   # noqa: E731
    assert run_cli_ok(["0", "--output", "out-lora", "--dtype", "fp32"] + common).value.code == 0
    first = (md / "tiny-lora-0.pth").read_bytes()
    capsys.readouterr()
    _refused(capsys, ["0", "--output", str(tmp_path / "out-other")] + common, "tiny-lora-0.pth exists already, "
             f"merged from {roots[7] / 'out-lora' / 'rwkv-0.pth'}", "OVERWRITE=1")
    assert (md / "tiny-lora-0.pth").read_bytes() == first
    assert run_cli_ok(["0", "--output", "out-lora", "--dtype", "bf16"] + common).value.code == 0   # its own: fine
    assert (md / "tiny-lora-0.pth").stat().st_size < len(first)
    assert run_cli_ok(["0", "--output", str(tmp_path / "out-other"), "--overwrite"] + common).value.code == 0
    assert json.loads((md / checkpoint.MERGED_FROM).read_text()) == {
        "tiny-lora-0.pth": str(tmp_path / "out-other" / "rwkv-0.pth")}


def _refused(capsys, argv, *expect):
    with pytest.raises(SystemExit) as exc:
        run_cli(merge_tool.main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    return err


def test_errors_are_one_line_and_nothing_is_written(runs, tmp_path, capsys, monkeypatch):
    _, roots = runs
    root = roots[6]
    monkeypatch.chdir(root)
    md = tmp_path / "merge"
    common = ["--model-dir", "model", "--merge-dir", str(md), "--dtype", "fp32"]
    # a missing epoch lists the epochs that exist
    shutil_copy(root / "out-lora" / "rwkv-0.pth", root / "out-lora" / "rwkv-3.pth")
    _refused(capsys, ["7", "--output", "out-lora"] + common, "out-lora/rwkv-7.pth", "epochs 0, 3")
    _refused(capsys, ["x", "--output", "out-lora"] + common, "'x'")
    _refused(capsys, ["0", "--output", "nowhere"] + common, "nowhere does not exist")
    # the base model: missing from model/, other weights of the same size, another size
    (root / "model" / "other").mkdir(exist_ok=True)
    checkpoint.save_atomic(random_model(6, 2, 128, vocab_size=VOCAB, seed=5).state_dict(), "model/same-size.pth")
    checkpoint.save_atomic(random_model(6, 3, 128, vocab_size=VOCAB, seed=5).state_dict(), "model/deeper.pth")
    checkpoint.save_atomic(random_model(6, 2, 128, vocab_size=512, seed=5).state_dict(), "model/vocab.pth")
    _refused(capsys, ["0", "--output", "out-lora", "--base", "same-size.pth"] + common,
             "model/same-size.pth", "out-lora/rwkv-0.pth", "fingerprint")
    _refused(capsys, ["0", "--output", "out-lora", "--base", "model/deeper.pth"] + common,
             "model/deeper.pth", "out-lora/rwkv-0.pth", "3x128")
    _refused(capsys, ["0", "--output", "out-bone", "--base", "vocab.pth"] + common,
             "model/vocab.pth", "out-bone/rwkv-0.pth", "vocab size 256")
    _refused(capsys, ["0", "--output", "out-lora", "--base", "nope.pth"] + common, "nope.pth does not exist")
    _refused(capsys, ["0", "--output", "out-lora"] + ["--model-dir", "model/other"] + common[2:],
             "tiny.pth, which is not in model/other")
    tensors, meta = checkpoint.load_adapter("out-lora/rwkv-0.pth")
    # a checkpoint whose tensors do not fit the base (edited metadata: sizes match, shapes do not)
    bad = dict(tensors)
    bad["blocks.0.att.key.lora_A"] = torch.zeros(8, 64)
    os.makedirs("out-bad", exist_ok=True)
    checkpoint.save_adapter("out-bad/rwkv-0.pth", bad, meta)
    _refused(capsys, ["0", "--output", "out-bad"] + common, "out-bad/rwkv-0.pth", "model/tiny.pth", "does not fit")
    # files from other tools
    os.makedirs("foreign", exist_ok=True)
    lora = {k: v for k, v in tensors.items()}
    torch.save(lora, "foreign/rwkv-0.pth")
    _refused(capsys, ["0", "--output", "foreign"] + common, "plain RWKV-PEFT LoRA", "LORA_ALPHA", "rank 8")
    torch.save(checkpoint.load_checkpoint("model/tiny.pth"), "foreign/rwkv-1.pth")
    _refused(capsys, ["1", "--output", "foreign"] + common, "complete RWKV model")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, "foreign/rwkv-2.pth")
    _refused(capsys, ["2", "--output", "foreign"] + common, "another tool")
    torch.save({"weights": torch.zeros(3)}, "foreign/rwkv-3.pth")
    _refused(capsys, ["3", "--output", "foreign"] + common, "not written by this toolkit")
    (root / "foreign" / "rwkv-4.pth").write_bytes(b"not a torch file")
    _refused(capsys, ["4", "--output", "foreign"] + common, "foreign/rwkv-4.pth")
    # a plain state file (RWKV-PEFT / RWKV-LM): needs BASE, then it is converted
    st, _ = checkpoint.load_adapter("out-state/rwkv-0.pth")
    torch.save({k: v.to(torch.bfloat16) for k, v in st.items()}, "foreign/rwkv-5.pth")
    _refused(capsys, ["5", "--output", "foreign"] + common, "does not record its base model", "BASE")
    _refused(capsys, ["5", "--output", "foreign", "--base", "deeper.pth"] + common, "foreign/rwkv-5.pth",
             "model/deeper.pth")
    assert not md.exists() or not any(md.iterdir()), list(md.iterdir())       # nothing written by any refusal
    assert merge_tool.main(["5", "--output", "foreign", "--base", "tiny.pth"] + common) == 0
    out = capsys.readouterr().out
    assert "converted from a plain" in out
    sd = checkpoint.load_checkpoint(md / "tiny-state-5.pth")
    assert all(torch.equal(sd[k], st[k].to(torch.bfloat16).float()) for k in st)
    assert sorted(p.name for p in md.iterdir()) == [checkpoint.MERGED_FROM, "tiny-state-5.pth"]   # no temp files


def shutil_copy(a: Path, b: Path) -> None:
    b.write_bytes(a.read_bytes())


def test_merge_sh_end_to_end(runs):
    _, roots = runs
    root = roots[7]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUTPUT": str(root / "out-lora"), "MERGE_DIR": str(root / "m-sh"),
           "DTYPE": "fp16"}
    # merge.sh looks for model/ next to itself: run a copy of the scripts inside the project
    for name in ("merge.sh",):
        (root / name).write_bytes((ROOT / name).read_bytes())
        (root / name).chmod(0o755)
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(["bash", str(root / "merge.sh"), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "RWKV_V7_ON" in p.stdout
    sd = checkpoint.load_checkpoint(root / "m-sh" / "tiny-lora-0.pth")
    assert all(t.dtype == torch.float16 for t in sd.values())
    p = subprocess.run(["bash", str(root / "merge.sh"), "9"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "epoch 0" in p.stderr, p.stderr


def test_merge_sh_takes_the_output_that_training_sh_sets(tmp_path, monkeypatch, capsys):
    """No OUTPUT given: ./merge.sh 0 takes the checkpoints from training.sh's OUTPUT (its line is read, the
    script is not run) and merges what merging that folder by name gives; a training.sh OUTPUT without
    checkpoints while output/ has some is refused with the command that merges those; OUTPUT given wins; no
    EPOCH lists the checkpoints; an OUTPUT the shell would expand is refused."""
    from trainer.envfile import merge_output_dir
    from trainer.errors import UserError
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    train_run("lora", "runs/a")
    script = (ROOT / "training.sh").read_text()

    def training_sh(output: str) -> None:
        text, n = re.subn(r"^OUTPUT=\S*", f"OUTPUT={output}", script, flags=re.M)
        assert n == 1
        (tmp_path / "training.sh").write_text(text)

    training_sh('"runs/a"')
    (tmp_path / "merge.sh").write_bytes((ROOT / "merge.sh").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "OUTPUT"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DTYPE="fp32", MERGE_DIR="m-sh")
    p = subprocess.run(["bash", str(tmp_path / "merge.sh"), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "checkpoints from runs/a/ (OUTPUT in training.sh)" in p.stdout
    got = checkpoint.load_checkpoint(tmp_path / "m-sh" / "tiny-lora-0.pth")
    want = checkpoint.merge_epoch(0, output_dir="runs/a", merge_dir="m-ref", dtype="fp32").model
    want = checkpoint.load_checkpoint(want)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    with pytest.raises(UserError) as e:                               # no EPOCH: what there is, and where
        merge_tool.main([])
    assert str(e.value) == ("give one EPOCH: the checkpoints in runs/a/ (OUTPUT in training.sh) are rwkv-0.pth. "
                            "Fix: ./merge.sh EPOCH, e.g. ./merge.sh 0")
    training_sh('"runs/b"  # trained before OUTPUT was changed: the checkpoints are in output/')
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "rwkv-0.pth").write_bytes((tmp_path / "runs" / "a" / "rwkv-0.pth").read_bytes())
    with pytest.raises(SystemExit) as e:
        run_cli(merge_tool.main, ["0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert ("error: training.sh has OUTPUT='runs/b', and runs/b holds no checkpoint (rwkv-N.pth), but output/ does "
            "(epoch 0). Fix: to merge those: OUTPUT=output ./merge.sh 0") in err
    assert merge_output_dir("runs/a") == (Path("runs/a"), "OUTPUT")   # given on the command line: as given
    assert merge_tool.main(["0", "--output", "runs/a", "--merge-dir", "m-given", "--dtype", "fp32"]) == 0
    training_sh('"runs/$NAME"')
    with pytest.raises(UserError, match=r"OUTPUT='runs/\$NAME', which the shell expands"):
        merge_output_dir()
    (tmp_path / "training.sh").unlink()
    assert merge_output_dir() == (Path("output"), "the default")


def _snippets(text: str) -> list[str]:
    """The rwkv-package code blocks merge prints (indented 4 spaces under a 'the rwkv package' line)."""
    lines, out, cur = text.splitlines(), [], None
    for line in lines + [""]:
        if cur is not None and line.startswith("    "):
            cur.append(line[4:])
            continue
        if cur:
            out.append("\n".join(cur))
        cur = [] if "the rwkv package" in line else None
    return out


def test_printed_rwkv_package_snippets_run_and_match(runs):
    """What merge prints for the rwkv package, run as printed: same last-token logits as our model."""
    res, roots = runs
    procs = []
    for mode, v in (("state", 6), ("lora", 7), ("state", 7)):
        e = res[(mode, v)]
        for code in _snippets(merge_tool.usage_text(e["result"])):
            code = code.replace("[token ids]", str(TOKENS)).replace('"cuda fp16"', '"cpu fp32"')
            code += "\nimport json; print('LOGITS', json.dumps([float(x) for x in logits]))"
            env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "OMP_NUM_THREADS": "1"}
            env.pop("RWKV_V7_ON", None)
            want = e["base"] if (mode, v) == ("state", 7) and "forward([" in code and ", None)" in code else e["ours"]
            procs.append((subprocess.Popen([sys.executable, "-c", code], cwd=roots[v], env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT), want[-1], code))
    assert len(procs) == 5           # v6 state: model + state file; v7 lora: model; v7 state: model + state file
    for p, want, code in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, code + "\n" + out[-2000:]
        got = torch.tensor(json.loads(out.split("LOGITS ")[-1]))
        _close(got, want)


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_qlora_checkpoint_merges_into_the_dequantised_base(tmp_path, monkeypatch, mode):
    """A QUANT=nf4 run trained on dequantise(quantise(W)): its merge equals our quantised model with the
    adapter (attach_adapter quantises as training did; DoRA's row norms are then the quantised weights'), not
    the plain base plus the update."""
    from trainer.quant import quantize_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    base = random_model(7, 2, 128, vocab_size=256, seed=3)
    checkpoint.save_atomic(base.state_dict(), "model/tiny.pth")
    from trainer.peft import get_method
    model = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
    method = get_method(mode)({"r": 8, "alpha": 16})
    method.apply(model)
    quantize_model(model, "nf4")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
            if n.endswith("dora_magnitude"):
                p.mul_(1.1)
    meta = {"method": mode, "settings": method.metadata(), "train_parts": [], "quant": "nf4", "epoch": 0,
            "complete": True, "base": checkpoint.base_metadata("model/tiny.pth")}
    checkpoint.save_adapter("output/rwkv-0.pth", method.adapter_state_dict(model), meta)
    res = checkpoint.merge_epoch(0, output_dir="output", model_dir="model", merge_dir="merge", dtype="fp32")
    merged = checkpoint.load_model(res.model, dtype=torch.float32)
    tuned = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
    checkpoint.attach_adapter(tuned, "output/rwkv-0.pth", "model/tiny.pth")
    idx = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = tuned(idx), merged(idx)
        plain = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
        method2 = get_method(mode)(method.metadata())
        method2.apply(plain)
        method2.load_adapter(plain, method.adapter_state_dict(model))
        unquantised = plain(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (unquantised - want).abs().max() > 1e-3       # the quantisation really mattered
