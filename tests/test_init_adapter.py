"""INIT_ADAPTER (a new run from an adapter file's trained tensors) and RWKV-PEFT's adapter files (merge.sh and
INIT_ADAPTER): the first step's loss of a run started from a file is the loss the inference path gives with that
file on the same batch; RWKV-PEFT's layout (built here from our own trained adapters) merges to the same tensors and
starts the same run as ours; every wrong value is one line with its fix, before anything is written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import merge as merge_tool
from tools import train as train_tool
from trainer import checkpoint
from trainer.config import TrainConfig, resume_changes
from trainer.errors import UserError, run_cli
from trainer.loop import dry_run, prepare, train

from rwkv_ref import random_model
from test_train import make_project

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "pissa", "bone", "bat", "state", "full")
QUIET = dict(progress=False, log=lambda *_: None)


def config(mode: str = "lora", **kw) -> TrainConfig:
    lr = {"state": "0.5", "full": "2e-3"}.get(mode, "1e-2")
    env = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output", FINETUNE_MODE=mode, LORA_R="8", LORA_ALPHA="16",
               PISSA_R="8", DISHA_R="32", CTX_LEN="32", MICRO_BSZ="2", EPOCH_STEPS="2", EPOCH_COUNT="1",
               PRECISION="fp32", LR_INIT=lr, LR_FINAL=lr, OP="chunk", GRAD_CP="0", SAMPLE_PROMPT="ab",
               TRAIN_PARTS="ln" if mode == "lora" else "")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny RWKV-7 project and one trained run (1 epoch, 2 steps) per method in out-<mode>/; their losses."""
    root = tmp_path_factory.mktemp("init")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        make_project(root, 7)
        losses = {m: train(config(m, OUTPUT=f"out-{m}"), **QUIET).losses for m in METHODS}
    finally:
        os.chdir(cwd)
    return root, losses


@pytest.fixture
def project(runs, monkeypatch):
    monkeypatch.chdir(runs[0])
    return runs[0]


def first_batch(cfg: TrainConfig) -> dict:
    """The first micro-batch a run of ``cfg`` trains on (the same SEED and data give the same one)."""
    prep = prepare(TrainConfig.from_env({**cfg.to_env(), "INIT_ADAPTER": "", "PISSA_INIT": "",
                                         "OUTPUT": "unused"}), log=lambda *_: None)
    prep.dataset.set_epoch(0)
    return prep.dataset.collate([prep.dataset[j] for j in range(cfg.MICRO_BSZ)])


@torch.no_grad()
def inference_loss(batch: dict, adapter=None, state_file=None) -> float:
    """The loss on ``batch`` of the base model with a checkpoint (attach_adapter: what tools.evaluate --adapter and
    the chat use) or a state file (attach_state_file: evaluate --state), fp32, CPU."""
    model = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
    model.op = "chunk"
    if adapter is not None:
        checkpoint.attach_adapter(model, adapter, "model/tiny.pth")
    if state_file is not None:
        checkpoint.attach_state_file(model, state_file)
    return model(batch["input_ids"], targets=batch["targets"], mask=batch["mask"]).item()


def first_loss(cfg: TrainConfig, log=None) -> float:
    res = train(cfg, max_steps=1, progress=False, log=log or (lambda *_: None))
    assert len(res.losses) == 1
    return res.losses[0]


# ------------------------------------------------------------------------------------------ INIT_ADAPTER, ours
@pytest.mark.parametrize("mode", METHODS)
def test_a_new_run_starts_where_the_adapter_ended(project, runs, mode):
    """Its first step's loss is the saved adapter's loss on that batch (not the base model's), and it is a new run:
    optimizer step 1 of a fresh schedule, in its own OUTPUT, the earlier run untouched."""
    before = (project / f"out-{mode}" / "rwkv-0.pth").read_bytes()
    cfg = config(mode, OUTPUT=f"init-{mode}", INIT_ADAPTER=f"out-{mode}/rwkv-0.pth")
    said = []
    got = first_loss(cfg, said.append)
    want = inference_loss(first_batch(cfg), adapter=f"out-{mode}/rwkv-0.pth")
    assert abs(got - want) <= 1e-5, (got, want)
    assert abs(got - runs[1][mode][0]) > 1e-3, "the adapter changed nothing: the test would prove nothing"
    assert any(s.startswith(f"INIT_ADAPTER=out-{mode}/rwkv-0.pth: starting from its trained {mode}") for s in said)
    _, meta = checkpoint.load_adapter(project / f"init-{mode}" / "rwkv-interrupted.pth")
    assert meta["optimizer_steps"] == 1 and meta["config"]["INIT_ADAPTER"] == f"out-{mode}/rwkv-0.pth"
    assert (project / f"out-{mode}" / "rwkv-0.pth").read_bytes() == before


def test_a_state_file_from_merge_starts_a_state_run(project):
    res = checkpoint.merge_epoch(0, output_dir="out-state", merge_dir="merge-fp32", dtype="fp32")
    cfg = config("state", OUTPUT="init-state-file", INIT_ADAPTER=str(res.state))
    said = []
    got = first_loss(cfg, said.append)
    batch = first_batch(cfg)
    assert abs(got - inference_loss(batch, state_file=res.state)) <= 1e-5
    assert abs(got - inference_loss(batch, adapter="out-state/rwkv-0.pth")) <= 1e-5
    assert any("records no base model" in s and "MODEL=tiny.pth" in s for s in said)


def test_parts_the_file_did_not_train_start_from_the_base(project):
    """TRAIN_PARTS this run trains beyond the file's start from the base (said so): the same first loss."""
    cfg = config("lora", OUTPUT="init-more-parts", INIT_ADAPTER="out-lora/rwkv-0.pth", TRAIN_PARTS="time ln")
    said = []
    got = first_loss(cfg, said.append)
    assert abs(got - inference_loss(first_batch(cfg), adapter="out-lora/rwkv-0.pth")) <= 1e-5
    assert any("TRAIN_PARTS time start from the base model's values" in s for s in said)


def test_a_run_started_from_a_file_resumes_exactly(project):
    """RESUME=1 continues it from its own unit; INIT_ADAPTER (empty now, as RESUME=1 requires) is not compared."""
    kw = dict(INIT_ADAPTER="out-bone/rwkv-0.pth", EPOCH_STEPS=4)
    whole = train(config("bone", OUTPUT="init-whole", **kw), **QUIET).losses
    part = train(config("bone", OUTPUT="init-part", **kw), max_steps=2, **QUIET).losses
    said = []
    rest = train(config("bone", OUTPUT="init-part", RESUME=1, EPOCH_STEPS=4), progress=False, log=said.append).losses
    torch.testing.assert_close(torch.tensor(part + rest), torch.tensor(whole), rtol=1e-5, atol=1e-6)
    assert not any("INIT_ADAPTER" in s for s in said)
    saved = config("bone", **kw).to_env()
    assert resume_changes(saved, config("bone", EPOCH_STEPS=4)) == ([], [])


# ------------------------------------------------------------------------------------------ refusals
def _refused(cfg_or_env: dict, *words: str, fix: tuple = ()) -> UserError:
    """Refused by the config, check_files (the web page's Check) and the dry run alike; nothing written."""
    out = Path(cfg_or_env.get("OUTPUT", "refused"))
    for check in (lambda c: c.check_files(), lambda c: dry_run(c, log=lambda *_: None)):
        with pytest.raises(UserError) as e:
            check(config(**{"OUTPUT": "refused", **cfg_or_env}))
        for w in words:
            assert w in e.value.message, e.value.message
        for w in fix:
            assert w in (e.value.fix or ""), e.value.fix
        if out.name == "refused":
            assert not out.exists()
    return e.value


def test_wrong_files_and_values_are_one_line_with_the_fix(project):
    lora = dict(mode="lora", INIT_ADAPTER="out-lora/rwkv-0.pth")
    _refused({**lora, "INIT_ADAPTER": "out-lora/rwkv-9.pth"}, "out-lora/rwkv-9.pth does not exist", "rwkv-0.pth",
             fix=("output/rwkv-0.pth", "leave INIT_ADAPTER empty"))
    _refused({**lora, "INIT_ADAPTER": "out-lora"}, "is a folder")
    _refused({**lora, "mode": "bone"}, "holds a lora adapter, but FINETUNE_MODE=bone", fix=("FINETUNE_MODE=lora",))
    _refused({**lora, "LORA_R": "4"}, "was trained with LORA_R=8, but training.sh has LORA_R=4",
             fix=("set LORA_R=8 to match", "leave INIT_ADAPTER empty"))
    _refused({**lora, "LORA_ALPHA": "32"}, "LORA_ALPHA=16", "LORA_ALPHA=32", fix=("set LORA_ALPHA=16",))
    _refused({**lora, "TRAIN_PARTS": ""}, "also trained TRAIN_PARTS ln", "would be lost", fix=('TRAIN_PARTS="ln"',))
    _refused({"mode": "bone", "INIT_ADAPTER": "out-bone/rwkv-0.pth", "DISHA_R": "64"}, "DISHA_R=32")
    checkpoint.save_atomic(random_model(7, 2, 128, vocab_size=256, seed=9).state_dict(), "model/other.pth")
    _refused({**lora, "MODEL": "other.pth"}, "fingerprint", fix=("MODEL=tiny.pth",))
    _refused({**lora, "INIT_ADAPTER": "model/tiny.pth"}, "complete RWKV model", fix=("set MODEL to it",))
    _refused({**lora, "INIT_ADAPTER": "out-lora/train_state.pth"}, "training state", fix=("rwkv-N.pth",))
    _refused({**lora, "OUTPUT": "out-lora", "OVERWRITE": "1"}, "OVERWRITE=1 removes", fix=("new folder",))
    assert (project / "out-lora" / "rwkv-0.pth").is_file()
    for env, words in (({**lora, "RESUME": "1", "OUTPUT": "out-lora"}, "RESUME=1 and INIT_ADAPTER"),
                       ({"mode": "pissa", "PISSA_INIT": "x/init_pissa.pth"}, "INIT_ADAPTER is empty"),
                       ({**lora, "PISSA_INIT": "x/init_pissa.pth"}, "is for FINETUNE_MODE=pissa")):
        with pytest.raises(UserError, match=words):
            config(**env)


def test_a_file_of_another_size_is_refused_by_the_dry_run(project):
    """Another tool's file records no base: its shapes are checked where the model is built (the dry run too)."""
    rwkv_peft_files("lora")
    checkpoint.save_atomic(random_model(7, 2, 256, vocab_size=256, seed=3).state_dict(), "model/wide.pth")
    with pytest.raises(UserError) as e:
        dry_run(config("lora", MODEL="wide.pth", OUTPUT="refused", INIT_ADAPTER="peft-lora/rwkv-0.pth"),
                log=lambda *_: None)
    assert "INIT_ADAPTER=peft-lora/rwkv-0.pth does not fit MODEL" in e.value.message and "shape" in e.value.message
    assert not Path("refused").exists()


def test_the_command_line_says_one_line_and_exits_2(project, monkeypatch, capsys):
    env = config("bone", OUTPUT="refused-cli", INIT_ADAPTER="out-lora/rwkv-0.pth").to_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        run_cli(train_tool.main, ["--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: INIT_ADAPTER=out-lora/rwkv-0.pth holds a lora adapter")
    assert len(err.strip().splitlines()) == 1 and " Fix: set FINETUNE_MODE=lora" in err
    assert not (project / "refused-cli").exists()


# ------------------------------------------------------------------------------------------ RWKV-PEFT's files
def rwkv_peft_files(mode: str) -> dict:
    """Our trained adapter of ``mode`` written in RWKV-PEFT's layout (shared/docs/formats.md) into peft-<mode>/:
    the trained tensors under the model's names, no metadata; PiSSA's initial A and B in its init_pissa.pth
    (X.init_lora_A / X.init_lora_B, with the "model." prefix one of its merge scripts expects)."""
    tensors, _ = checkpoint.load_adapter(f"out-{mode}/rwkv-0.pth")
    folder = Path(f"peft-{mode}")
    folder.mkdir(exist_ok=True)
    init = {k: v for k, v in tensors.items() if k.endswith((".pissa_init_A", ".pissa_init_B"))}
    theirs = {k: v for k, v in tensors.items() if k not in init}
    torch.save(theirs, folder / "rwkv-0.pth")
    out = {"adapter": folder / "rwkv-0.pth", "tensors": theirs}
    if init:
        torch.save({"model." + k.replace(".pissa_init_", ".init_lora_"): v for k, v in init.items()},
                   folder / "init_pissa.pth")
        out["init"] = folder / "init_pissa.pth"
    return out


IMPORTED = ("lora", "pissa", "bone", "bat", "state")


@pytest.mark.parametrize("mode", IMPORTED)
def test_rwkv_peft_files_merge_and_start_runs_as_ours_do(project, mode):
    files = rwkv_peft_files(mode)
    extra = {"lora_alpha": 16.0} if mode == "lora" else {"pissa_init": files.get("init")}
    ours = checkpoint.merge_epoch(0, output_dir=f"out-{mode}", merge_dir=f"m-ours-{mode}", dtype="fp32")
    theirs = checkpoint.merge_epoch(0, output_dir=f"peft-{mode}", merge_dir=f"m-peft-{mode}", dtype="fp32",
                                    base="tiny.pth", **extra)
    assert theirs.meta["method"] == mode and theirs.meta["converted_from"].startswith(
        "a plain" if mode == "state" else "an RWKV-PEFT")
    assert any("records no base model" in n for n in theirs.notes)
    for a, b in ((ours.model, theirs.model), (ours.state, theirs.state)):
        assert (a is None) == (b is None)
        if a is not None:
            sa, sb = checkpoint.load_checkpoint(a), checkpoint.load_checkpoint(b)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), a
    cfg = config(mode, OUTPUT=f"init-peft-{mode}", INIT_ADAPTER=str(files["adapter"]),
                 PISSA_INIT=str(files.get("init") or ""))
    got = first_loss(cfg)
    assert abs(got - inference_loss(first_batch(cfg), adapter=f"out-{mode}/rwkv-0.pth")) <= 1e-5


def test_an_rwkv_peft_lora_file_adapting_fewer_layers_starts_the_rest_fresh(project):
    """RWKV-PEFT can adapt the attention alone: the FFN's LoRA starts fresh (B = 0), so the model is the file's."""
    tensors = rwkv_peft_files("lora")["tensors"]
    att = {k: v for k, v in tensors.items() if ".ffn." not in k or not k.endswith((".lora_A", ".lora_B"))}
    assert len(att) < len(tensors)
    Path("peft-att").mkdir(exist_ok=True)
    torch.save(att, "peft-att/rwkv-0.pth")
    said = []
    cfg = config("lora", OUTPUT="init-peft-att", INIT_ADAPTER="peft-att/rwkv-0.pth")
    got = first_loss(cfg, said.append)
    merged = checkpoint.merge_epoch(0, output_dir="peft-att", merge_dir="m-att", dtype="fp32", base="tiny.pth",
                                    lora_alpha=16)
    model = checkpoint.load_model(merged.model, dtype=torch.float32)
    model.op = "chunk"
    batch = first_batch(cfg)
    with torch.no_grad():
        want = model(batch["input_ids"], targets=batch["targets"], mask=batch["mask"]).item()
    assert abs(got - want) <= 1e-5
    assert any("of the" in s and "start as in a new run" in s and ".ffn." in s for s in said)


def _merge_refused(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        run_cli(merge_tool.main, argv + ["--model-dir", "model", "--merge-dir", "m-refused", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not Path("m-refused").exists()


def test_what_rwkv_peft_files_lack_is_asked_for_never_guessed(project, capsys):
    for mode in ("lora", "pissa", "bone"):
        rwkv_peft_files(mode)
    base = ["--base", "tiny.pth"]
    _merge_refused(capsys, ["0", "--output", "peft-lora"] + base, "plain RWKV-PEFT LoRA file (rank 8",
                   "LORA_ALPHA=32 ./merge.sh", "PISSA_INIT=")
    _merge_refused(capsys, ["0", "--output", "peft-pissa"] + base, "LORA_ALPHA", "there is one beside it: "
                   "peft-pissa/init_pissa.pth")
    _merge_refused(capsys, ["0", "--output", "peft-lora", "--lora-alpha", "abc"] + base, "LORA_ALPHA='abc'")
    _merge_refused(capsys, ["0", "--output", "peft-pissa", "--lora-alpha", "16", "--pissa-init",
                            "peft-pissa/init_pissa.pth"] + base, "PiSSA has no alpha")
    _merge_refused(capsys, ["0", "--output", "peft-bone", "--lora-alpha", "16"] + base, "DiSHA file",
                   "LORA_ALPHA")
    _merge_refused(capsys, ["0", "--output", "out-lora", "--lora-alpha", "32"], "records the alpha", "16")
    _merge_refused(capsys, ["0", "--output", "out-pissa", "--pissa-init", "peft-pissa/init_pissa.pth"],
                   "holds PiSSA's initial A and B itself")
    init = torch.load("peft-pissa/init_pissa.pth")
    torch.save({k: v[:4] if k.endswith("init_lora_A") else v[:, :4] for k, v in init.items()}, "other_init.pth")
    _merge_refused(capsys, ["0", "--output", "peft-pissa", "--pissa-init", "other_init.pth"] + base,
                   "another run's init file")
    torch.save({k: v for k, v in init.items() if ".ffn." not in k}, "part_init.pth")
    _merge_refused(capsys, ["0", "--output", "peft-pissa", "--pissa-init", "part_init.pth"] + base,
                   "is not the init file of")
    # the same for INIT_ADAPTER: PiSSA without its init file; the check before the run names the file beside it
    _refused({"mode": "pissa", "INIT_ADAPTER": "peft-pissa/rwkv-0.pth"}, "PiSSA", "init_pissa.pth",
             fix=("PISSA_INIT in training.sh", "peft-pissa/init_pissa.pth"))
    _refused({"mode": "pissa", "INIT_ADAPTER": "peft-pissa/rwkv-0.pth", "PISSA_INIT": "other_init.pth"},
             "another run's init file")
    _refused({"mode": "lora", "INIT_ADAPTER": "peft-pissa/rwkv-0.pth", "LORA_R": "4"}, "LORA_R=8")


def test_merge_sh_passes_lora_alpha_and_pissa_init(project):
    rwkv_peft_files("pissa")
    (project / "merge.sh").write_bytes((ROOT / "merge.sh").read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "OUTPUT": "peft-pissa", "BASE": "tiny.pth",
           "PISSA_INIT": "peft-pissa/init_pissa.pth", "MERGE_DIR": "m-sh", "DTYPE": "fp32", "PYTHON": sys.executable}
    p = subprocess.run(["bash", "merge.sh", "0"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "converted from an RWKV-PEFT PiSSA file (rank 8)" in p.stdout and "records no base model" in p.stdout
    ours = checkpoint.merge_epoch(0, output_dir="out-pissa", merge_dir="m-sh-ours", dtype="fp32")
    a, b = checkpoint.load_checkpoint(ours.model), checkpoint.load_checkpoint(project / "m-sh" / "tiny-pissa-0.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    env.update(PISSA_INIT="", LORA_ALPHA="")
    p = subprocess.run(["bash", "merge.sh", "0"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "LORA_ALPHA=32 ./merge.sh" in p.stderr
