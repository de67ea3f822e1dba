"""Every mistake gets one line: a table of bad inputs across make_tokenize.sh, training.sh (its --dry-run and a real
run), merge.sh and the web page's actions.

Each case builds a small project (a tiny RWKV-7 model, tokenized data, a LoRA and a state-tuning checkpoint,
data/sample.jsonl), makes one thing wrong, runs one entry point and checks:
  - the entry point exits with 2 and prints exactly one line on stderr, ``error: ... Fix: ...``, no traceback
    (a web action raises UserError with a fix);
  - the line says what the case is about (a few words of it);
  - nothing in the project folder changed: names, sizes, modification times and contents of every file and folder.
The command-line cases run the tools' main() in this process (wrapped by run_cli, as the scripts run them); the
SHELL cases run the shell scripts themselves (copied into the project, as a user has them) in subprocesses.
A control test runs each entry point once on the unchanged project, so every refusal below is caused by its one
change and not by the project.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tools import make_tokenize as tokenize_tool
from tools import merge as merge_tool
from tools import train as train_tool
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data.binidx import write_binidx
from trainer.envfile import write_env_file
from trainer.errors import UserError, run_cli
from trainer.peft import get_method
from webui import actions

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
META = checkpoint.META_KEY
# a dry run that passes on the template project (tiny model, 8 items of small token ids)
TRAIN_ENV = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output/run", FINETUNE_MODE="lora", LORA_R="8",
                 LORA_ALPHA="16", CTX_LEN="32", MICRO_BSZ="2", EPOCH_STEPS="2", EPOCH_COUNT="1", PRECISION="fp32",
                 LR_INIT="1e-2", LR_FINAL="1e-2", OP="chunk", GRAD_CP="0", COMPILE="0", ACCELERATOR="cpu",
                 SAMPLE_PROMPT="ab", WANDB="", RESUME="0")


# ------------------------------------------------------------------------------------------ the project
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """data/sample.jsonl, data/toy.bin+.idx, model/tiny.pth, output/rwkv-0.pth (lora), output-state/rwkv-0.pth
    (state tuning), merge/, and the three shell scripts, as a user has them."""
    root = tmp_path_factory.mktemp("battery-template")
    for d in ("data", "model", "output", "output-state", "merge"):
        (root / d).mkdir()
    shutil.copy(REPO / "data" / "sample.jsonl", root / "data" / "sample.jsonl")
    for script in ("make_tokenize.sh", "training.sh", "merge.sh"):
        shutil.copy(REPO / script, root / script)
        (root / script).chmod(0o755)
    base = root / "model" / "tiny.pth"
    checkpoint.save_atomic(checkpoint.init_model(checkpoint.config_from_sizes(7, 2, 64, vocab_size=VOCAB),
                                                 seed=0).state_dict(), base)
    rng = np.random.default_rng(1)
    write_binidx(root / "data" / "toy", [list(rng.integers(1, VOCAB, size=rng.integers(12, 30))) + [0]
                                         for _ in range(8)])
    for method_name, settings, out in (("lora", {"r": 8, "alpha": 16, "dropout": 0.0}, "output"),
                                       ("state", {}, "output-state")):
        model = checkpoint.load_model(base, dtype=torch.float32)
        method = get_method(method_name)(settings)
        method.apply(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.01)
        meta = {"method": method_name, "settings": method.metadata(), "train_parts": [], "quant": "none",
                "base": checkpoint.base_metadata(base), "epoch": 0, "complete": True}
        checkpoint.save_adapter(root / out / "rwkv-0.pth", method.adapter_state_dict(model), meta)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setitem(sys.modules, "wandb", None)     # as where wandb is not installed, on every machine
    saved = dict(os.environ)
    yield root
    os.environ.clear()                                   # --config puts its values into os.environ
    os.environ.update(saved)
    for p in root.rglob("*"):                            # chmod cases: let pytest remove the folder
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


def snapshot(root: Path) -> dict:
    """Every file, folder and link below ``root``: kind, size, mtime, mode and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
            else:
                try:
                    digest = hashlib.sha1(p.read_bytes()).hexdigest()
                except OSError:
                    digest = None
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


# ------------------------------------------------------------------------------------------ set-ups
def write(rel: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return setup


def jsonl(rel: str, *objs) -> Callable[[Path], None]:
    return write(rel, "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def folder(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        p = root / rel
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        p.mkdir(parents=True)
    return setup


def file_instead_of_folder(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        shutil.rmtree(root / rel)
        (root / rel).write_text("not a folder\n")
    return setup


def link(rel: str, target: str = "/nonexistent/elsewhere") -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        os.symlink(target, root / rel)
    return setup


def remove(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).unlink()
    return setup


def toy_data(items) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        write_binidx(root / "data" / "toy", items)
    return setup


def chmod(rel: str, mode: int) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).chmod(mode)
    return setup


def truncate(rel: str, size: int) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        p = root / rel
        p.write_bytes(p.read_bytes()[:size])
    return setup


def meta_edit(change: Callable[[dict], object] | None = None, raw=None, ckpt: str = "output/rwkv-0.pth",
              tensors: Callable[[dict], None] | None = None) -> Callable[[Path], None]:
    """Edit the metadata of a checkpoint by hand (``change`` edits the dict in place; ``raw`` replaces the JSON)."""
    def setup(root: Path) -> None:
        p = root / ckpt
        obj = torch.load(p, weights_only=True)
        if raw is not None:
            obj[META] = raw
        if change is not None:
            meta = json.loads(obj[META])
            change(meta)
            obj[META] = json.dumps(meta)
        if tensors is not None:
            tensors(obj)
        torch.save(obj, p)
    return setup


def setting(key, value):
    return lambda m: m["settings"].__setitem__(key, value)


def base_key(key, value):
    return lambda m: m["base"].__setitem__(key, value)


def fake_disk(free: int):
    def patch(monkeypatch) -> None:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))
    return patch


def fake_memory(available: int):
    def patch(monkeypatch) -> None:
        from trainer import device
        monkeypatch.setattr(device, "host_available", lambda *a, **k: available)
    return patch


def nothing(root: Path) -> None:
    pass


# ------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    id: str
    tool: str                     # tokenize | train | train-real | merge | web | sh-tokenize | sh-train | sh-merge
    args: object = ()             # argv for the tools; env dict for train; a callable for web
    setup: Callable[[Path], None] = nothing
    says: tuple[str, ...] = ()    # words the one line must hold
    env: dict = field(default_factory=dict)
    patch: Callable | None = None
    chmod: bool = False           # permissions-based: meaningless as root (root reads and writes anything)


def tok(id, args, setup=nothing, says=(), **kw):
    return Case(id, "tokenize", list(args), setup, tuple(says), **kw)


def dry(id, env, setup=nothing, says=(), **kw):
    return Case(id, "train", env, setup, tuple(says), **kw)


def real(id, env, setup=nothing, says=(), **kw):
    return Case(id, "train-real", env, setup, tuple(says), **kw)


def mrg(id, args, setup=nothing, says=(), **kw):
    return Case(id, "merge", list(args), setup, tuple(says), **kw)


def web(id, fn, setup=nothing, says=(), **kw):
    return Case(id, "web", fn, setup, tuple(says), **kw)


def uploaded():
    """The web server's upload folder (uploads/) holding s.jsonl, as a browser upload leaves it."""
    def setup(r):
        (r / "uploads").mkdir(exist_ok=True)
        shutil.copy(r / "data" / "sample.jsonl", r / "uploads" / "s.jsonl")
    return setup


DAMAGED = "damaged or not a checkpoint of this toolkit"
LONG = "x" * 300

CASES = [
    # ---------------------------------------------------------------- make_tokenize.sh: files and folders
    tok("jsonl-is-a-folder", ["dir.jsonl"], folder("data/dir.jsonl"), ["a folder"]),
    tok("data-dir-is-a-file", ["sample.jsonl", "--data-dir", "dd"], write("dd", "x"), ["dd is a file, not a folder"]),
    tok("path-below-a-file", ["data/sample.jsonl/x.jsonl"], says=["data/sample.jsonl is a file, not a folder"]),
    tok("dangling-symlink", ["ln.jsonl"], link("data/ln.jsonl"), ["ln.jsonl not found", "are: sample.jsonl)"]),
    tok("missing-lists-files", ["nothere.jsonl"], says=["nothere.jsonl not found", "sample.jsonl"]),
    tok("not-a-data-file", ["data/notes.docx"], write("data/notes.docx", '{"text": "x"}\n'),
        ["not a kind of file that make_tokenize reads", "'.docx'"]),
    tok("empty-name", [""], says=["not a file name"]),
    tok("dot-name", ["."], says=["not a file name"]),
    tok("name-too-long", [LONG + ".jsonl"], says=["at most 255 bytes"]),
    tok("bin-is-a-folder", ["sample.jsonl"], folder("data/sample.bin"), ["data/sample.bin is a folder"]),
    tok("idx-is-a-folder", ["sample.jsonl"], folder("data/sample.idx"), ["data/sample.idx is a folder"]),
    tok("jsonl-unreadable", ["sample.jsonl"], chmod("data/sample.jsonl", 0), ["cannot be read"], chmod=True),
    tok("data-folder-read-only", ["sample.jsonl"], chmod("data", 0o555), ["cannot write"], chmod=True),
    # ---------------------------------------------------------------- make_tokenize.sh: contents
    tok("invalid-utf8", ["b.jsonl"], write("data/b.jsonl", b'{"text": "caf\xe9"}\n'), ["invalid UTF-8", "line 1"]),
    tok("utf16-file", ["b.jsonl"], write("data/b.jsonl", '{"text": "hi"}\n'.encode("utf-16")), ["UTF-8"]),
    tok("binary-file", ["b.jsonl"], write("data/b.jsonl", bytes(range(256)) * 4), ["line 1"]),
    tok("invalid-json", ["b.jsonl"], jsonl("data/b.jsonl", {"text": "ok"}, '{"text": "a",}'), ["line 2", "JSON"]),
    tok("bom-then-list", ["b.jsonl"], write("data/b.jsonl", b'\xef\xbb\xbf[1, 2]\n'), ["JSON list, not an object"]),
    tok("line-is-a-string", ["b.jsonl"], jsonl("data/b.jsonl", '"just text"'), ["not an object"]),
    tok("wrong-shape", ["b.jsonl"], jsonl("data/b.jsonl", {"prompt": "a", "completion": "b"}), ['"prompt"']),
    tok("text-not-a-string", ["b.jsonl"], jsonl("data/b.jsonl", {"text": 3}), ['"text" is a JSON number']),
    tok("messages-not-a-list", ["b.jsonl"], jsonl("data/b.jsonl", {"messages": "hi"}), ['"messages" must be']),
    tok("role-unknown", ["b.jsonl"], jsonl("data/b.jsonl", {"messages": [{"role": "bot", "content": "x"}]}),
        ["role 'bot'"]),
    tok("role-a-list", ["b.jsonl"], jsonl("data/b.jsonl", {"messages": [{"role": ["user"], "content": "x"}]}),
        ["role ['user']"]),
    tok("content-an-object", ["b.jsonl"], jsonl("data/b.jsonl", {"messages": [{"role": "user", "content": {}}]}),
        ["not a string"]),
    tok("alpaca-output-number", ["b.jsonl"], jsonl("data/b.jsonl", {"instruction": "x", "output": 3}),
        ['"output" is a JSON number']),
    tok("number-of-5000-digits", ["b.jsonl"], jsonl("data/b.jsonl", '{"text": "x", "n": ' + "9" * 5000 + "}"),
        ["4300 digits"]),
    tok("nested-too-deep", ["b.jsonl"], write("data/b.jsonl", "[" * 100000 + "]" * 100000 + "\n"),
        ["nested too deeply"]),
    tok("empty-file", ["b.jsonl"], write("data/b.jsonl", ""), ["is empty"]),
    # ---------------------------------------------------------------- make_tokenize.sh: other shapes and files
    tok("sharegpt-from-unknown", ["b.jsonl"], jsonl("data/b.jsonl", {"conversations": [{"from": "tool", "value": "x"}]}),
        ["line 1", "message 0 has from 'tool'"]),
    tok("column-not-there", ["b.jsonl", "--column", "body"], jsonl("data/b.jsonl", {"text": "x"}),
        ['line 1', 'no field "body" (COLUMN=body)', '"text"']),
    tok("json-not-a-list", ["b.json"], write("data/b.json", '{"text": "x"}'), ["not a list of objects"]),
    tok("json-bad-item", ["b.json"], write("data/b.json", '[{"text": "x"}, {"prompt": "y"}]'),
        ["b.json, item 2", '"prompt"', "COLUMN"]),
    tok("csv-bad-row", ["b.csv"], write("data/b.csv", 'text\nok\n"a","b"\n'), ["b.csv, line 3", "2 cells"]),
    tok("csv-unknown-shape", ["b.csv"], write("data/b.csv", "question,answer\nq,a\n"), ['"question", "answer"']),
    tok("folder-empty", ["docs"], folder("data/docs"), ["data/docs is a folder with no data files", "empty"]),
    tok("folder-without-data", ["docs"], write("data/docs/a.pdf", "x"), ["no data files", "a.pdf"]),
    tok("folder-bad-file", ["docs"], lambda r: (write("data/docs/a.txt", "ok")(r), write("data/docs/b/c.jsonl", "[")(r)),
        ["data/docs/b/c.jsonl, line 1"]),
    tok("parquet-without-pyarrow", ["b.parquet"], write("data/b.parquet", b"PAR1"), ["pip install pyarrow"],
        patch=lambda mp: mp.setitem(sys.modules, "pyarrow.parquet", None)),
    tok("saved-dataset-without-datasets", ["ds"], lambda r: (write("data/ds/state.json", "{}")(r),
        write("data/ds/dataset_info.json", "{}")(r)), ["pip install datasets"],
        patch=lambda mp: mp.setitem(sys.modules, "datasets", None)),
    tok("only-blank-lines", ["b.jsonl"], write("data/b.jsonl", b"\xef\xbb\xbf\n  \n\n"), ["is empty"]),
    tok("unpaired-surrogate", ["b.jsonl"], jsonl("data/b.jsonl", '{"text": "\\ud800"}'), ["surrogate"]),
    tok("all-empty-no-eof", ["e.jsonl", "--no-eof"], jsonl("data/e.jsonl", {"text": ""}, {"text": ""}),
        ["nothing to train on", "--no-eof"]),
    tok("all-whitespace-no-eof", ["e.jsonl", "--no-eof"], jsonl("data/e.jsonl", {"text": " "}, {"text": "\n"}),
        ["at most 1 token", "nothing to train on"]),
    tok("all-empty-with-eof", ["e.jsonl"], jsonl("data/e.jsonl", {"text": ""}, {"text": ""}),
        ["at most 1 token", "nothing to train on"]),
    # ---------------------------------------------------------------- make_tokenize.sh: numbers
    tok("repeat-zero", ["sample.jsonl", "0"], says=["REPEAT must be a positive whole number"]),
    tok("repeat-word", ["sample.jsonl", "twice"], says=["REPEAT must be"]),
    tok("repeat-fraction", ["sample.jsonl", "1.5"], says=["REPEAT must be"]),
    tok("repeat-unicode-digit", ["sample.jsonl", "²"], says=["REPEAT must be"]),
    tok("repeat-beyond-any-disk", ["sample.jsonl", str(10**15)], says=["REPEAT=1000000000000000 would write", "TB",
                                                                       "lower REPEAT to at most"]),
    tok("repeat-beyond-free-disk", ["sample.jsonl", "1000"], says=["7.92 MB", "0.02 MB free", "lower REPEAT to at most 2"],
        patch=fake_disk(20_000)),
    tok("no-disk-space-at-all", ["sample.jsonl"], says=["free some disk space"], patch=fake_disk(100)),
    tok("repeat-beyond-memory", ["sample.jsonl", "1000"], says=["of memory", "lower REPEAT to at most 2"],
        patch=fake_memory(10_000)),
    tok("max-tokens-zero", ["sample.jsonl", "1", "0"], says=["MAX_TOKENS must be a positive whole number"]),
    tok("max-tokens-word", ["sample.jsonl", "1", "many"], says=["MAX_TOKENS must be"]),
    tok("max-tokens-huge", ["sample.jsonl", "1", str(10**30)], says=["MAX_TOKENS=", "2147483647"]),
    tok("max-tokens-drops-all", ["sample.jsonl", "1", "2"], says=["longer than MAX_TOKENS=2"]),
    tok("seed-negative", ["sample.jsonl", "--seed", "-1"], says=["--seed must be a whole number from 0"]),
    tok("seed-beyond-64-bits", ["sample.jsonl", "--seed", str(2**64)], says=["--seed must be"]),
    tok("seed-word", ["sample.jsonl", "--seed", "x"], says=["--seed must be"]),
    tok("seed-5000-digits", ["sample.jsonl", "--seed", "9" * 5000], says=["--seed must be"]),
    tok("valid-zero", ["sample.jsonl", "--valid", "0"], says=["--valid 0 must be more than 0 and less than 1"]),
    tok("valid-word", ["sample.jsonl", "--valid", "some"], says=["--valid some is not a number"]),
    tok("valid-all", ["sample.jsonl", "--valid", "0.999"], says=["would hold out 44 of the 44 distinct items"]),
    tok("valid-one-item", ["one.jsonl", "--valid", "0.5"], jsonl("data/one.jsonl", {"text": "hi"}),
        ["only 1 distinct item"]),
    tok("valid-bin-is-a-folder", ["sample.jsonl", "--valid", "0.1"], folder("data/sample.valid.bin"),
        ["data/sample.valid.bin is a folder"]),

    # ---------------------------------------------------------------- training.sh --dry-run: numbers
    dry("seed-beyond-64-bits", {"SEED": str(2**64)}, says=["SEED=", "at most 9223372036854775807"]),
    dry("seed-negative", {"SEED": "-1"}, says=["SEED=-1"]),
    dry("seed-word", {"SEED": "abc"}, says=["SEED='abc' is not a whole number"]),
    dry("lora-alpha-inf", {"LORA_ALPHA": "inf"}, says=["LORA_ALPHA=inf"]),
    dry("lora-alpha-nan", {"LORA_ALPHA": "nan"}, says=["LORA_ALPHA=nan"]),
    dry("lora-alpha-negative", {"LORA_ALPHA": "-1"}, says=["LORA_ALPHA=-1"]),
    dry("lora-dropout-nan", {"LORA_DROPOUT": "nan"}, says=["LORA_DROPOUT=nan"]),
    dry("lora-dropout-one", {"LORA_DROPOUT": "1"}, says=["LORA_DROPOUT=1"]),
    dry("lr-init-inf", {"LR_INIT": "inf"}, says=["LR_INIT=inf"]),
    dry("lr-init-overflows-to-inf", {"LR_INIT": "1e400"}, says=["LR_INIT=inf"]),
    dry("lr-init-nan", {"LR_INIT": "nan", "LR_FINAL": "nan"}, says=["LR_INIT=nan"]),
    dry("lr-final-above-init", {"LR_FINAL": "1"}, says=["LR_FINAL=1.0 is larger than LR_INIT"]),
    dry("ctx-len-10e30", {"CTX_LEN": str(10**30)}, says=["CTX_LEN=", "at most 16777216"]),
    dry("ctx-len-2e40", {"CTX_LEN": str(2**40)}, says=["CTX_LEN=1099511627776"]),
    dry("ctx-len-zero", {"CTX_LEN": "0"}, says=["CTX_LEN=0 must be more than 0"]),
    dry("ctx-len-5000-digits", {"CTX_LEN": "9" * 5000}, says=["CTX_LEN=", "not a whole number"]),
    dry("epoch-count-huge", {"EPOCH_COUNT": str(10**30)}, says=["EPOCH_COUNT=", "at most 2147483647"]),
    dry("mini-bsz-huge", {"MINI_BSZ": str(10**30)}, says=["MINI_BSZ="]),
    dry("warmup-huge", {"WARMUP_STEPS": str(10**30)}, says=["WARMUP_STEPS="]),
    dry("svd-niter-huge", {"FINETUNE_MODE": "pissa", "PISSA_R": "8", "SVD_NITER": str(10**30)},
        says=["SVD_NITER=", "at most 64"]),
    dry("lora-r-beyond-width", {"LORA_R": "1000000"}, says=["LORA_R=1000000 is larger than the smallest layer",
                                                            "at most 64"]),
    dry("gpu-count-huge", {"GPU_COUNT": str(10**30)}, says=["GPU_COUNT="]),
    dry("offload-word", {"OFFLOAD_BLOCKS": "some"}, says=["OFFLOAD_BLOCKS='some'"]),
    # ---------------------------------------------------------------- training.sh --dry-run: choices
    dry("mode-unknown", {"FINETUNE_MODE": "qlora"}, says=["FINETUNE_MODE='qlora'"]),
    dry("train-parts-unknown", {"TRAIN_PARTS": "emb,foo"}, says=["TRAIN_PARTS has 'foo'"]),
    dry("resume-word", {"RESUME": "maybe"}, says=["RESUME='maybe'"]),
    dry("precision-unknown", {"PRECISION": "fp8"}, says=["PRECISION='fp8'"]),
    dry("wandb-not-installed", {"WANDB": "my-project"}, says=["WANDB=my-project", "pip install wandb"]),
    # ---------------------------------------------------------------- training.sh --dry-run: files
    dry("model-missing", {"MODEL": "rwkv7-g1.pth"}, says=["model/rwkv7-g1.pth not found", "tiny.pth"]),
    dry("model-is-a-folder", {"MODEL": "d.pth"}, folder("model/d.pth"), ["model/d.pth is a folder"]),
    dry("model-is-a-jsonl", {"MODEL": "data/sample.jsonl"}, says=["is a .jsonl file, not a model"]),
    dry("model-below-a-file", {"MODEL": "model/tiny.pth/x.pth"}, says=["model/tiny.pth is a file"]),
    dry("model-dangling-link", {"MODEL": "l.pth"}, link("model/l.pth"), ["is a link to"]),
    dry("model-garbage", {"MODEL": "g.pth"}, write("model/g.pth", b"garbage" * 10), ["not a PyTorch checkpoint"]),
    dry("model-truncated", {"MODEL": "t.pth"}, lambda r: (shutil.copy(r / "model/tiny.pth", r / "model/t.pth"),
                                                           truncate("model/t.pth", 5000)(r)),
        ["model/t.pth", "truncated or corrupt"]),
    dry("model-dot", {"MODEL": "."}, says=["MODEL='.' names a folder"]),
    dry("model-name-too-long", {"MODEL": LONG}, says=["MODEL", "at most 255 bytes"]),
    dry("data-missing", {"DATA": "chat"}, says=["DATA: data/chat.bin/.idx not found", "toy"]),
    dry("data-bin-without-idx", {}, remove("data/toy.idx"), ["data/toy.idx not found"]),
    dry("data-idx-truncated", {}, truncate("data/toy.idx", 40), ["toy.idx is truncated"]),
    dry("data-idx-garbage", {}, write("data/toy.idx", b"x" * 100), ["not a binidx index"]),
    dry("data-bin-truncated", {}, truncate("data/toy.bin", 10), ["toy.bin is truncated"]),
    dry("data-bin-is-a-folder", {}, folder("data/toy.bin"), ["data/toy.bin is a folder"]),
    dry("data-folder-is-a-file", {}, file_instead_of_folder("data"), ["data is a file, not a folder"]),
    dry("data-slash", {"DATA": "/"}, says=["DATA='/' names a folder"]),
    dry("data-items-all-empty", {}, toy_data([[]] * 8), ["none with 2 tokens or more", "nothing to train on"]),
    dry("data-items-one-token", {}, toy_data([[0]] * 8), ["the longest has 1"]),
    dry("data-no-items", {}, toy_data([]), ["holds 0 items"]),
    dry("data-beyond-vocab", {}, toy_data([[300, 1, 0]] * 8), ["token id 300", "vocabulary of 256"]),
    dry("micro-bsz-above-items", {"MICRO_BSZ": "16", "EPOCH_STEPS": "1"},
        says=["= 16 is more than the 8 items", "lower MICRO_BSZ to at most 8", "EPOCH_STEPS to at most 1"]),
    dry("epoch-steps-above-items", {"EPOCH_STEPS": "5"}, says=["= 10 is more than the 8 items",
                                                               "lower EPOCH_STEPS to at most 4"]),
    dry("get-needs-more-tokens", {"DATALOAD": "get", "CTX_LEN": "4096"}, says=["DATALOAD=get needs"]),
    dry("output-is-a-file", {"OUTPUT": "outf"}, write("outf", "x"), ["OUTPUT=outf is a file"]),
    dry("output-below-a-file", {"OUTPUT": "model/tiny.pth/run"}, says=["model/tiny.pth is a file"]),
    dry("output-dangling-link", {"OUTPUT": "out-link"}, link("out-link"), ["OUTPUT=out-link is a link"]),
    dry("output-read-only", {"OUTPUT": "ro/run"}, lambda r: ((r / "ro").mkdir(), (r / "ro").chmod(0o555)),
        ["cannot be written to"], chmod=True),
    dry("config-missing", ["--config", "nope.env"], says=["--config nope.env: no such file"]),
    dry("config-is-a-folder", ["--config", "c.env"], folder("c.env"), ["--config c.env: a folder"]),
    dry("config-name-too-long", ["--config", LONG], says=["--config", "at most 255 bytes"]),
    dry("config-not-utf8", ["--config", "c.env"], write("c.env", b"\xff\xfe\x00garbled"), ["cannot be read"]),
    dry("config-unclosed-quote", ["--config", "c.env"], write("c.env", "MODEL='tiny.pth\n"), ["cannot be read"]),
    dry("config-unknown-name", ["--config", "c.env"], write("c.env", "LORA_RANK='8'\n"),
        ["LORA_RANK is not a training.sh variable"]),
    dry("config-nul-value", ["--config", "c.env"], write("c.env", "MODEL=a\x00b\n"), ["NUL character"]),
    # ---------------------------------------------------------------- training.sh: the real run refuses at start
    dry("output-holds-a-run", {"OUTPUT": "output"}, says=["OUTPUT=output already holds a training run (rwkv-0.pth)",
                                                         "RESUME=1", "OVERWRITE=1"]),
    dry("resume-with-nothing-there", {"RESUME": "1"}, says=["nothing to resume in output/run/"]),
    dry("resume-and-overwrite", {"RESUME": "1", "OVERWRITE": "1"}, says=["contradict"]),
    dry("overwrite-word", {"OVERWRITE": "maybe"}, says=["OVERWRITE='maybe'"]),
    dry("resume-unit-junk", {"RESUME": "1"}, write("output/run/train_state.pth", b"junk"),
        ["train_state.pth"]),
    dry("resume-unit-a-folder", {"RESUME": "1"}, folder("output/run/train_state.pth"), ["nothing to resume"]),
    real("output-holds-a-run", {"OUTPUT": "output"}, says=["already holds a training run"]),
    real("seed-beyond-64-bits", {"SEED": str(2**64)}, says=["SEED="]),
    real("wandb-not-installed", {"WANDB": "p"}, says=["pip install wandb"]),
    real("output-is-a-file", {"OUTPUT": "outf"}, write("outf", "x"), ["OUTPUT=outf is a file"]),
    real("data-items-all-empty", {}, toy_data([[]] * 8), ["nothing to train on"]),
    real("lora-r-beyond-width", {"LORA_R": "128"}, says=["LORA_R=128"]),
    real("data-beyond-vocab", {}, toy_data([[300, 1, 0]] * 8), ["token id 300"]),

    # ---------------------------------------------------------------- merge.sh: EPOCH
    mrg("over-another-checkpoints-file", ["0"], write("merge/tiny-lora-0.pth", b"mine"),
        ["merge/tiny-lora-0.pth exists already", "OVERWRITE=1"]),
    mrg("epoch-negative", ["-1"], says=["EPOCH must be an epoch number", "'-1'"]),
    mrg("epoch-fraction", ["1.5"], says=["'1.5'"]),
    mrg("epoch-word", ["abc"], says=["'abc'"]),
    mrg("epoch-empty", [""], says=["EPOCH must be"]),
    mrg("epoch-spaces-not-there", [" 3 "], says=["there is no output/rwkv-3.pth", "./merge.sh 0"]),
    mrg("epoch-file-name", ["rwkv-3.pth"], says=["'rwkv-3.pth'"]),
    mrg("epoch-5000-digits", ["9" * 5000], says=["5000 digits", "./merge.sh 0"]),
    mrg("epoch-unicode-digit", ["²"], says=["EPOCH must be"]),
    mrg("epoch-not-there", [str(10**12)], says=["there is no", "epoch 0"]),
    # ---------------------------------------------------------------- merge.sh: files and folders
    mrg("dtype-unknown", ["0", "--dtype", "int8"], says=["DTYPE='int8'"]),
    mrg("merge-dir-is-a-file", ["0", "--merge-dir", "mf"], write("mf", "x"), ["MERGE_DIR=mf", "mf is a file"]),
    mrg("merge-dir-below-a-file", ["0", "--merge-dir", "model/tiny.pth/m"], says=["model/tiny.pth is a file"]),
    mrg("merged-name-is-a-folder", ["0"], folder("merge/tiny-lora-0.pth"), ["merge/tiny-lora-0.pth is a folder"]),
    mrg("state-name-is-a-folder", ["0", "--output", "output-state"], folder("merge/tiny-state-0.pth"),
        ["merge/tiny-state-0.pth is a folder"]),
    mrg("output-is-a-file", ["0", "--output", "outf"], write("outf", "x"), ["OUTPUT=outf is a file"]),
    mrg("output-missing", ["0", "--output", "nowhere"], says=["nowhere does not exist"]),
    mrg("output-empty", ["0", "--output", "merge"], says=["holds no checkpoint"]),
    mrg("checkpoint-is-a-folder", ["5"], folder("output/rwkv-5.pth"), ["output/rwkv-5.pth is a folder",
                                                                        "has epoch 0"]),
    mrg("checkpoint-dangling-link", ["5"], link("output/rwkv-5.pth"), ["is a link to"]),
    mrg("checkpoint-garbage", ["5"], write("output/rwkv-5.pth", b"junk"), ["not a PyTorch checkpoint"]),
    mrg("checkpoint-truncated", ["0"], truncate("output/rwkv-0.pth", 3000), ["truncated or corrupt"]),
    mrg("checkpoint-is-a-model", ["5"], lambda r: shutil.copy(r / "model/tiny.pth", r / "output/rwkv-5.pth"),
        ["complete RWKV model"]),
    mrg("base-is-a-folder", ["0", "--base", "b.pth"], folder("model/b.pth"), ["BASE=b.pth does not exist"]),
    mrg("base-missing", ["0", "--base", "nope.pth"], says=["BASE=nope.pth does not exist"]),
    mrg("base-garbage", ["0", "--base", "g.pth"], write("model/g.pth", b"junk" * 10), ["not a PyTorch checkpoint"]),
    mrg("base-other-weights", ["0", "--base", "o.pth"],
        lambda r: checkpoint.save_atomic(checkpoint.init_model(checkpoint.config_from_sizes(7, 2, 64, vocab_size=VOCAB),
                                                               seed=1).state_dict(), r / "model/o.pth"),
        ["fingerprint", "same size, other weights"]),
    mrg("base-gone", ["0"], remove("model/tiny.pth"), ["trained on tiny.pth, which is not in model/"]),
    mrg("base-name-too-long", ["0", "--base", LONG], says=["BASE", "at most 255 bytes"]),
    # ---------------------------------------------------------------- merge.sh: damaged or hand-edited metadata
    mrg("meta-not-json", ["0"], meta_edit(raw="{not json"), ["metadata is damaged"]),
    mrg("meta-a-list", ["0"], meta_edit(raw="[1, 2]"), [DAMAGED, "JSON array, not an object"]),
    mrg("meta-null", ["0"], meta_edit(raw="null"), [DAMAGED, "JSON null"]),
    mrg("meta-a-tensor", ["0"], meta_edit(tensors=lambda o: o.__setitem__(META, torch.zeros(3))),
        ["metadata is damaged"]),
    mrg("format-a-string", ["0"], meta_edit(lambda m: m.__setitem__("format", "1")), [DAMAGED, "format is '1'"]),
    mrg("format-newer", ["0"], meta_edit(lambda m: m.__setitem__("format", 99)), ["newer version", "format 99"]),
    mrg("method-missing", ["0"], meta_edit(lambda m: m.pop("method")), [DAMAGED, "method None"]),
    mrg("method-unknown", ["0"], meta_edit(lambda m: m.__setitem__("method", "qlora")), [DAMAGED, "'qlora'"]),
    mrg("method-a-list", ["0"], meta_edit(lambda m: m.__setitem__("method", ["lora"])), [DAMAGED, "['lora']"]),
    mrg("settings-a-list", ["0"], meta_edit(lambda m: m.__setitem__("settings", [8])), [DAMAGED, "JSON array"]),
    mrg("settings-missing", ["0"], meta_edit(lambda m: m.pop("settings")), [DAMAGED, "needs LORA_R"]),
    mrg("rank-zero", ["0"], meta_edit(setting("r", 0)), [DAMAGED, "LORA_R=0"]),
    mrg("rank-negative", ["0"], meta_edit(setting("r", -8)), [DAMAGED, "LORA_R=-8"]),
    mrg("rank-a-string", ["0"], meta_edit(setting("r", "8")), [DAMAGED, "LORA_R='8'"]),
    mrg("rank-a-fraction", ["0"], meta_edit(setting("r", 8.5)), [DAMAGED, "LORA_R=8.5"]),
    mrg("rank-a-bool", ["0"], meta_edit(setting("r", True)), [DAMAGED, "LORA_R=True"]),
    mrg("rank-not-the-tensors", ["0"], meta_edit(setting("r", 4)), ["rank 8", "r=4", "damaged or was edited"]),
    mrg("alpha-missing", ["0"], meta_edit(lambda m: m["settings"].pop("alpha")), [DAMAGED, "LORA_ALPHA=None"]),
    mrg("alpha-nan", ["0"], meta_edit(setting("alpha", float("nan"))), [DAMAGED, "LORA_ALPHA=nan"]),
    mrg("alpha-inf", ["0"], meta_edit(setting("alpha", float("inf"))), [DAMAGED, "LORA_ALPHA=inf"]),
    mrg("alpha-a-list", ["0"], meta_edit(setting("alpha", [16])), [DAMAGED, "LORA_ALPHA=[16]"]),
    mrg("dropout-a-string", ["0"], meta_edit(setting("dropout", "0.1")), [DAMAGED, "LORA_DROPOUT='0.1'"]),
    mrg("base-not-an-object", ["0"], meta_edit(lambda m: m.__setitem__("base", "tiny.pth")),
        [DAMAGED, "base model record 'tiny.pth'"]),
    mrg("base-name-a-number", ["0"], meta_edit(base_key("name", 3)), [DAMAGED, "base model name 3"]),
    mrg("base-name-a-path", ["0"], meta_edit(base_key("name", "../../etc/passwd")), [DAMAGED, "not a file name"]),
    mrg("base-version-a-string", ["0"], meta_edit(base_key("version", "7")), [DAMAGED, "version is '7'"]),
    mrg("base-version-4", ["0"], meta_edit(base_key("version", 4)), [DAMAGED, "not 5, 6 or 7"]),
    mrg("base-fingerprint-a-number", ["0"], meta_edit(base_key("fingerprint", 5)), [DAMAGED, "fingerprint 5"]),
    mrg("train-parts-a-string", ["0"], meta_edit(lambda m: m.__setitem__("train_parts", "ln")), [DAMAGED, "'ln'"]),
    mrg("train-parts-unknown", ["0"], meta_edit(lambda m: m.__setitem__("train_parts", ["foo"])), [DAMAGED]),
    mrg("epoch-a-string", ["0"], meta_edit(lambda m: m.__setitem__("epoch", "zero")), [DAMAGED, "epoch 'zero'"]),
    mrg("quant-unknown", ["0"], meta_edit(lambda m: m.__setitem__("quant", "int4")), [DAMAGED, "'int4'"]),
    mrg("complete-a-string", ["0"], meta_edit(lambda m: m.__setitem__("complete", "no")), [DAMAGED]),
    mrg("lora-file-says-state", ["0"], meta_edit(lambda m: m.__setitem__("method", "state")),
        [DAMAGED, "a tensor of another method"]),
    mrg("state-file-says-lora", ["0", "--output", "output-state"],
        meta_edit(lambda m: m.update(method="lora", settings={"r": 8, "alpha": 16}), ckpt="output-state/rwkv-0.pth"),
        [DAMAGED, "time_state, a tensor of another method"]),
    mrg("state-settings-a-list", ["0", "--output", "output-state"],
        meta_edit(lambda m: m.__setitem__("settings", []), ckpt="output-state/rwkv-0.pth"), [DAMAGED]),
    mrg("entry-not-a-tensor", ["0"], meta_edit(tensors=lambda o: o.__setitem__("note", "hello")),
        [DAMAGED, "'note' is not a tensor"]),

    # ---------------------------------------------------------------- the web page's actions
    web("tokenize-no-file", lambda: actions.tokenize(""), says=["no data file chosen"]),
    web("tokenize-not-data", lambda: actions.tokenize("../../etc/passwd"), says=["'../../etc/passwd' is not a data"]),
    web("tokenize-column-not-there", lambda: actions.tokenize("sample.jsonl", column="body"), says=['no field "body"']),
    web("tokenize-missing", lambda: actions.tokenize("nope.jsonl"), says=["nope.jsonl not found"]),
    web("tokenize-data-is-a-file", lambda: actions.tokenize("sample.jsonl"), file_instead_of_folder("data"),
        ["data is a file, not a folder"]),
    web("tokenize-repeat-word", lambda: actions.tokenize("sample.jsonl", repeat="x"), says=["REPEAT must be"]),
    web("tokenize-repeat-huge", lambda: actions.tokenize("sample.jsonl", repeat=str(10**15)),
        says=["would write", "lower REPEAT"]),
    web("tokenize-all-empty", lambda: actions.tokenize("e.jsonl", no_eof=True), jsonl("data/e.jsonl", {"text": ""}),
        ["nothing to train on"]),
    web("tokenize-bin-is-a-folder", lambda: actions.tokenize("sample.jsonl"), folder("data/sample.bin"),
        ["is a folder"]),
    web("check-alpha-inf", lambda: actions.check_config(dict(TRAIN_ENV, LORA_ALPHA="inf")), says=["LORA_ALPHA=inf"]),
    web("check-seed-huge", lambda: actions.check_config(dict(TRAIN_ENV, SEED=str(2**64))), says=["SEED="]),
    web("check-model-dot", lambda: actions.check_config(dict(TRAIN_ENV, MODEL=".")), says=["MODEL='.'"]),
    web("check-output-nul", lambda: actions.check_config(dict(TRAIN_ENV, OUTPUT="out\x00put")), says=["NUL"]),
    web("check-wandb", lambda: actions.check_config(dict(TRAIN_ENV, WANDB="p"), files=False), says=["wandb"]),
    web("check-empty-items", lambda: actions.check_config(dict(TRAIN_ENV)), toy_data([[]] * 8),
        ["nothing to train on"]),
    web("check-micro-bsz-advice", lambda: actions.check_config(dict(TRAIN_ENV, MICRO_BSZ="9", EPOCH_STEPS="1")),
        says=["lower MICRO_BSZ to at most 8"]),
    web("merge-no-epoch", lambda: actions.merge("output", ""), says=["no checkpoint chosen"]),
    web("merge-epoch-word", lambda: actions.merge("output", "abc"), says=["'abc'"]),
    web("merge-epoch-huge", lambda: actions.merge("output", "9" * 5000), says=["5000 digits"]),
    web("merge-output-a-file", lambda: actions.merge("outf", "0"), write("outf", "x"), ["is a file"]),
    web("merge-meta-a-list", lambda: actions.merge("output", "0"), meta_edit(raw="[]"), [DAMAGED]),
    web("merge-merge-dir-a-file", lambda: actions.merge("output", "0"), file_instead_of_folder("merge"),
        ["merge is a file"]),
    web("upload-gone", lambda: actions.save_upload("uploads/gone.jsonl", "x.jsonl", "uploads"), uploaded(),
        ["upload it again"]),
    web("upload-not-uploaded", lambda: actions.save_upload("data/sample.jsonl", "x.jsonl", "uploads"), uploaded(),
        ["was not uploaded through the page"]),
    web("upload-source-a-folder", lambda: actions.save_upload("uploads/d.jsonl", "x.jsonl", "uploads"),
        lambda r: (uploaded()(r), folder("uploads/d.jsonl")(r)), ["is not a file"]),
    web("tokenize-name-too-long", lambda: actions.tokenize(LONG + ".jsonl"), says=["at most 255 bytes"]),
    web("upload-name-too-long", lambda: actions.save_upload("uploads/s.jsonl", LONG + ".jsonl", "uploads"),
        uploaded(), ["at most 255 bytes"]),
    web("upload-not-data", lambda: actions.save_upload("uploads/s.jsonl", "notes.docx", "uploads"), uploaded(),
        says=["not the name of a data file"]),
    web("upload-data-is-a-file", lambda: actions.save_upload("uploads/s.jsonl", "x.jsonl", "uploads"),
        lambda r: (uploaded()(r), file_instead_of_folder("data")(r)), ["data is a file"]),
    web("upload-name-is-a-folder", lambda: actions.save_upload("uploads/s.jsonl", "x.jsonl", "uploads"),
        lambda r: (uploaded()(r), folder("data/x.jsonl")(r)), ["data/x.jsonl is a folder"]),
    web("chat-no-model", lambda: actions.ChatModels().get(""), says=["no model chosen"]),
    web("chat-model-missing", lambda: actions.ChatModels().get("model/nope.pth"), says=["does not exist"]),
    web("chat-model-a-folder", lambda: actions.ChatModels().get("model"), says=["is a folder"]),
    web("chat-model-a-jsonl", lambda: actions.ChatModels().get("data/sample.jsonl"),
        says=["not a PyTorch checkpoint"]),
    web("chat-addon-meta-a-list", lambda: actions.ChatModels().get("model/tiny.pth", "output/rwkv-0.pth"),
        meta_edit(raw="[1]"), [DAMAGED]),
    web("chat-addon-no-base", lambda: actions.ChatModels().get("model/tiny.pth", "output/rwkv-0.pth"),
        meta_edit(lambda m: m.pop("base")), [DAMAGED, "base model record None"]),
    web("chat-addon-rank-a-list", lambda: actions.ChatModels().get("model/tiny.pth", "output/rwkv-0.pth"),
        meta_edit(setting("r", [8])), [DAMAGED, "LORA_R=[8]"]),
    web("chat-addon-train-parts-int", lambda: actions.ChatModels().get("model/tiny.pth", "output/rwkv-0.pth"),
        meta_edit(lambda m: m.__setitem__("train_parts", 3)), [DAMAGED, "train_parts 3"]),
    web("chat-addon-state-garbage", lambda: actions.ChatModels().get("model/tiny.pth", "merge/tiny-state-0.pth"),
        write("merge/tiny-state-0.pth", b"junk"), ["not a PyTorch checkpoint"]),
    web("chat-addon-a-folder", lambda: actions.ChatModels().get("model/tiny.pth", "output/rwkv-7.pth"),
        folder("output/rwkv-7.pth"), ["is a folder"]),
    web("chat-temperature-nan", lambda: actions.reply(None, [], "hi", temperature=float("nan")),
        says=["out of range"]),

    # ---------------------------------------------------------------- the shell scripts themselves
    Case("no-file", "sh-tokenize", [], says=("no FILE given", "sample.jsonl")),
    Case("column-variable-not-there", "sh-tokenize", ["sample.jsonl"], env={"COLUMN": "body"},
         says=('no field "body" (COLUMN=body)',)),
    Case("line-is-a-list", "sh-tokenize", ["b.jsonl"], jsonl("data/b.jsonl", "[1]"), ("not an object",)),
    Case("all-empty-no-eof", "sh-tokenize", ["e.jsonl", "--no-eof"], jsonl("data/e.jsonl", {"text": ""}),
         ("nothing to train on",)),
    Case("repeat-word", "sh-tokenize", ["sample.jsonl", "abc"], says=("REPEAT must be",)),
    Case("seed-beyond-64-bits", "sh-train", {"SEED": str(2**64)}, says=("SEED=",)),
    Case("output-is-a-file", "sh-train", {"OUTPUT": "outf"}, write("outf", "x"), ("OUTPUT=outf is a file",)),
    Case("config-missing", "sh-train", ["--config", "nope.env"], says=("no such file",)),
    Case("no-epoch", "sh-merge", [], says=("give one EPOCH", "rwkv-0.pth")),
    Case("epoch-word", "sh-merge", ["abc"], says=("'abc'",)),
    Case("state-model-word", "sh-merge", ["0"], env={"STATE_MODEL": "yes"}, says=("STATE_MODEL=yes",)),
    Case("dtype-unknown", "sh-merge", ["0"], env={"DTYPE": "int8"}, says=("DTYPE='int8'",)),
    Case("overwrite-word", "sh-merge", ["0"], env={"OVERWRITE": "yes"}, says=("OVERWRITE=yes",)),
    Case("meta-a-list", "sh-merge", ["0"], meta_edit(raw="[]"), (DAMAGED,)),
]


# ------------------------------------------------------------------------------------------ running a case
def set_training_env(values: dict) -> None:
    for name in TrainConfig.names():
        os.environ.pop(name, None)
    os.environ.update(values)


def run_tool(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as its shell script runs it (run_cli): exit code, stdout, stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def run_shell(root: Path, case: Case) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, OMP_NUM_THREADS="1", **case.env)
    args = list(case.args) if not isinstance(case.args, dict) else []
    if case.tool == "sh-train":
        if isinstance(case.args, dict):     # training.sh sets its own variables: give the case's in a config file
            write_env_file(root.parent / "case.env", dict(TRAIN_ENV, **case.args))
            args = ["--config", str(root.parent / "case.env")]
        args = ["--dry-run"] + args
    script = {"sh-tokenize": "make_tokenize.sh", "sh-train": "training.sh", "sh-merge": "merge.sh"}[case.tool]
    p = subprocess.run(["bash", str(root / script), *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def one_line(code: int, out: str, err: str) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, f"exit code {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and " Fix: " in lines[0], err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.tool}:{c.id}" for c in CASES])
def test_mistake_gets_one_line(case: Case, project: Path, capsys, monkeypatch):
    if case.chmod and ROOT_USER:
        pytest.skip("permissions do not apply to root")
    case.setup(project)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = snapshot(project)
    if case.tool == "web":
        with pytest.raises(UserError) as exc:
            case.args()
        assert exc.value.fix, f"no fix: {exc.value}"
        line = f"error: {exc.value}"
    elif case.tool.startswith("sh-"):
        line = one_line(*run_shell(project, case))
    elif case.tool == "tokenize":
        line = one_line(*run_tool(tokenize_tool.main, case.args, capsys))
    elif case.tool == "merge":
        line = one_line(*run_tool(merge_tool.main, case.args, capsys))
    else:
        env, argv = (case.args, []) if isinstance(case.args, dict) else ({}, list(case.args))
        set_training_env(dict(TRAIN_ENV, **env))
        argv = (["--dry-run"] if case.tool == "train" else ["--no-progress", "--max-steps", "1"]) + argv
        line = one_line(*run_tool(train_tool.main, argv, capsys))
    for words in case.says:
        assert words in line, f"{words!r} not in: {line}"
    assert snapshot(project) == before, "a refused input changed the user's files"


def test_the_table_is_large_and_covers_every_entry_point():
    tools = {c.tool for c in CASES}
    assert len(CASES) >= 100 and len({(c.tool, c.id) for c in CASES}) == len(CASES)
    assert tools == {"tokenize", "train", "train-real", "merge", "web", "sh-tokenize", "sh-train", "sh-merge"}


# ------------------------------------------------------------------------------------------ controls
def test_the_unchanged_project_passes_every_entry_point(project: Path, capsys):
    """Each refusal above comes from its one change: the same project, unchanged, tokenizes, dry-runs and merges."""
    assert run_tool(tokenize_tool.main, ["sample.jsonl"], capsys)[0] == 0
    set_training_env(TRAIN_ENV)
    code, _, err = run_tool(train_tool.main, ["--dry-run"], capsys)
    assert code == 0, err
    for out in ("output", "output-state"):
        code, _, err = run_tool(merge_tool.main, ["0", "--output", out, "--dtype", "fp32"], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (project / "merge").iterdir()) == [".merged-from.json", "tiny-lora-0.pth",
                                                                      "tiny-state-0.pth"]
    model = actions.ChatModels().get("model/tiny.pth", "output/rwkv-0.pth")
    assert model.cfg.n_embd == 64


def test_tokenize_refuses_all_empty_then_accepts_one_real_item(project: Path, capsys):
    """The empty-data refusal is about the items, not the file: one item with text makes it pass."""
    jsonl("data/e.jsonl", {"text": ""}, {"text": "User: hi\n\nAssistant: hello"})(project)
    assert run_tool(tokenize_tool.main, ["e.jsonl", "--no-eof"], capsys)[0] == 0
    from trainer.data.binidx import BinIdx
    assert sorted(BinIdx(project / "data" / "e").sizes.tolist())[0] == 0        # the empty item is kept, harmless


def test_repeat_size_check_counts_bytes(project: Path, capsys, monkeypatch):
    """REPEAT's refusal says how much it needs: the .bin is 2 bytes a token, the .idx 20 bytes an item (+34), so
    the largest REPEAT it suggests fits, and one more does not."""
    from trainer.data import prepare
    run_tool(tokenize_tool.main, ["sample.jsonl"], capsys)
    one = sum(p.stat().st_size for p in (project / "data" / "sample.bin", project / "data" / "sample.idx"))
    fake_disk(3 * (one - 34) + 34)(monkeypatch)
    assert run_tool(tokenize_tool.main, ["sample.jsonl", "3"], capsys)[0] == 0
    code, _, err = run_tool(tokenize_tool.main, ["sample.jsonl", "4"], capsys)
    assert code == 2 and "lower REPEAT to at most 3" in err and prepare._gb(4 * (one - 34) + 34) in err


@pytest.mark.parametrize("tool, argv", [
    (tokenize_tool, ["sample.jsonl", "--bogus"]),
    (tokenize_tool, ["sample.jsonl", "1", "2", "3"]),
    (train_tool, ["--bogus"]),
    (merge_tool, ["0", "--bogus"]),
])
def test_unknown_arguments_get_argparse_usage(tool, argv, project: Path, capsys):
    """argparse's own refusal: exit 2, a short usage and one 'error:' line last, no traceback."""
    before = snapshot(project)
    code, out, err = run_tool(tool.main, argv, capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("usage: ")
    assert "error: " in err.strip().split("\n")[-1] and len(err.strip().split("\n")) <= 6
    assert snapshot(project) == before
