"""The web page's parts without a browser: config files (and ./training.sh --config), the job manager (start,
one at a time, Stop = Ctrl+C with its save), upload names, error-to-field mapping, the local-only guard,
the data report and the missing-Gradio message."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.errors import UserError
from webui import actions
from trainer.envfile import parse_training_sh, read_env_file, training_fields, write_env_file
from webui.guard import LocalOnly
from webui.jobs import Job, JobManager
from webui.progress import loss_frame, progress_markdown

from test_train import make_project

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ config files
def test_form_defaults_are_training_sh_values():
    """The page's defaults are what bash gets from training.sh (compared by sourcing the script)."""
    names = TrainConfig.names()
    script = (ROOT / "training.sh").read_text()
    head = script[:script.index("set +a")]
    out = subprocess.run(["bash", "-c", head + "\n" + "; ".join(f'printf "%s\\0" "${n}"' for n in names)],
                         capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    in_sh = {s_name for _, s_name, _, _ in parse_training_sh(script)}
    fields = {f.name: f for f in training_fields()}
    assert list(fields) == [n for _, n, _, _ in parse_training_sh(script) if n in names] + \
        [n for n in names if n not in in_sh]
    for n, bash_value in zip(names, out):
        if n in in_sh:
            assert fields[n].default == bash_value, n
            assert fields[n].help and fields[n].section != "other"
    assert fields["SAMPLE_PROMPT"].default == TrainConfig.SAMPLE_PROMPT   # not in training.sh: TrainConfig's
    assert "DeepSpeed ZeRO" in fields["STRATEGY"].help                    # continued comment lines are kept
    # the defaults make a valid config
    TrainConfig.from_env({f.name: f.default for f in fields.values()})


def test_env_file_round_trip_and_bash(tmp_path):
    values = {f.name: f.default for f in training_fields()}
    values.update(SAMPLE_PROMPT="User: it's $HOME `x` \"q\" \\n\n\nAssistant:", TRAIN_PARTS="time ln", WANDB="")
    p = write_env_file(tmp_path / "run.env", values)
    assert read_env_file(p) == values
    text = p.read_text()
    assert "LORA_R='64'" in text and "# lora / dora: rank" in text and "./training.sh --config" in text
    # the same file is valid bash, and bash reads the very same values (nothing expanded)
    got = subprocess.run(["bash", "-c", f'set -a; source "{p}"; printf "%s" "$SAMPLE_PROMPT"'],
                         capture_output=True, text=True, check=True).stdout
    assert got == values["SAMPLE_PROMPT"]


def test_env_file_refusals(tmp_path):
    p = tmp_path / "bad.env"
    p.write_text("LORA_RANK='8'\n")
    with pytest.raises(UserError, match="LORA_RANK is not a training.sh variable"):
        read_env_file(p)
    p.write_text("echo hi\n")
    with pytest.raises(UserError, match="is not a NAME=value assignment"):
        read_env_file(p)
    p.write_text("MODEL='unclosed\n")
    with pytest.raises(UserError, match="cannot be read"):
        read_env_file(p)
    with pytest.raises(UserError, match="no such file"):
        read_env_file(tmp_path / "missing.env")
    for bad in ("../x", "a/b", "", ".hidden", "x" * 80):
        with pytest.raises(UserError):
            actions.config_path(bad)


def test_training_sh_config_option(tmp_path):
    """./training.sh --config FILE (tools.train): the file's values replace training.sh's."""
    make_project(tmp_path, 7)
    values = {f.name: f.default for f in training_fields()}
    values.update(MODEL="tiny.pth", DATA="toy", LORA_R="4", LORA_ALPHA="8", CTX_LEN="32", MICRO_BSZ="2",
                  EPOCH_STEPS="3", PRECISION="fp32", ACCELERATOR="cpu", OP="chunk", SAMPLE_PROMPT="ab")
    write_env_file(tmp_path / "output" / "t.env", values)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_R": "99"}     # the file wins over the environment
    out = subprocess.run([sys.executable, "-m", "tools.train", "--config", "output/t.env", "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LORA_R            = 4 " in out.stdout and "EPOCH_STEPS       = 3 " in out.stdout
    bad = tmp_path / "output" / "bad.env"
    bad.write_text("LORA_R='x'\n")
    out = subprocess.run([sys.executable, "-m", "tools.train", "--config", str(bad), "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == \
        "error: LORA_R='x' is not a whole number. Fix: fix LORA_R in training.sh"


# ------------------------------------------------------------------------------------------ the job manager
def test_job_manager_start_one_at_a_time_stop_saves(tmp_path):
    make_project(tmp_path, 7, items=[list(range(1, 30)) + [0]] * 64)
    values = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output", LORA_R="4", LORA_ALPHA="8", CTX_LEN="32",
                  MICRO_BSZ="1", EPOCH_STEPS="64", EPOCH_COUNT="50", PRECISION="fp32", ACCELERATOR="cpu",
                  OP="chunk", GRAD_CP="0", SAMPLE_PROMPT="ab", LR_INIT="1e-3", LR_FINAL="1e-3", OVERWRITE="1")
    env_file = write_env_file(tmp_path / "output" / "job.env", values)
    (tmp_path / "output" / "loss.csv").write_text("optimizer_step,epoch,loss,lr,tokens_per_s\n999,0,7.0,1,1\n")
    jobs = JobManager(tmp_path)
    assert jobs.status().state == "idle"
    jobs.start(env_file, "output")
    try:
        with pytest.raises(UserError, match="already running"):
            jobs.start(env_file, "output")
        deadline = time.time() + 120
        while time.time() < deadline and len(jobs.status().losses) < 15:
            time.sleep(0.3)
        st = jobs.status()
        assert st.state == "running" and st.running, st.log[-2000:]
        assert st.total == 64 * 50 and 0 < st.step < st.total and st.loss is not None and st.eta_s > 0
        assert all(step != 999 for step, _ in st.losses)          # an earlier run's rows are gone (OVERWRITE=1)
        assert [s for s, _ in st.losses] == sorted({s for s, _ in st.losses})
        st = jobs.stop()
    finally:
        jobs.kill()
    assert st.state == "stopped" and not st.running and st.exit_code == 130, st.log[-2000:]
    assert (tmp_path / "output" / "rwkv-interrupted.pth").is_file()
    assert any(p.endswith("rwkv-interrupted.pth") for p in st.saved)
    assert "Continue with RESUME=1" in st.log
    # every optimizer step the trainer logged is on the chart, with loss.csv's values
    rows = (tmp_path / "output" / "loss.csv").read_text().splitlines()[1:]
    assert [(int(r.split(",")[0]), float(r.split(",")[2])) for r in rows] == st.losses
    with pytest.raises(UserError, match="no training job is running"):
        jobs.stop()


# ------------------------------------------------------------------------------------------ small parts
def test_job_losses_skip_a_row_still_being_written(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    csv_path = out / "loss.csv"
    csv_path.write_text("optimizer_step,epoch,loss,lr,tokens_per_s\n1,0,2.5,1e-3,10\n")
    job = Job([sys.executable, "-c", "pass"], tmp_path, dict(os.environ), out, out / "job.env", resume=True)
    job.proc.wait()
    with open(csv_path, "a") as fh:
        fh.write("2,0,2.4,1e-3,11\n3,0,2.")          # the trainer is in the middle of row 3
    assert job.losses() == [(1, 2.5), (2, 2.4)]
    with open(csv_path, "a") as fh:
        fh.write("31,1e-3,12\n")
    assert job.losses() == [(1, 2.5), (2, 2.4), (3, 2.31)]
    while job.running:             # its output reader ends just after the process
        time.sleep(0.05)
    st = job.status()              # a loss.csv of a run before valid_loss (5 columns): no validation line
    assert st.state == "finished" and st.losses == [(1, 2.5), (2, 2.4), (3, 2.31)] and st.valid_losses == []
    assert "validation" not in progress_markdown(st)
    assert list(loss_frame(st).dropna()["series"]) == ["training"] * 3


def _early_stopped_run(root: Path) -> list[str]:
    """A real run that EARLY_STOP=3 ends (validation losses 3.0, 2.0, 2.5, 2.1, 2.2 after steps 1..5, set by the
    test): its log lines; OUTPUT (output/) holds its loss.csv, rwkv-best.pth and rwkv-interrupted.pth."""
    from trainer import validate
    from trainer.data.binidx import write_binidx
    from trainer.loop import train
    from test_train import config
    make_project(root, 7)
    write_binidx(root / "data" / "held", [[1, 2, 3, 0], [4, 5, 6, 7, 8, 0]])
    losses = iter([3.0, 2.0, 2.5, 2.1, 2.2])
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate.Validation, "loss", lambda self, *a: (next(losses), 10))
        res = train(config(VALID_DATA="held", VALID_EVERY=1, EARLY_STOP=3, EPOCH_STEPS=4, EPOCH_COUNT=3),
                    progress=False, log=lines.append)
    assert res.stopped_early
    return "\n".join(lines).splitlines()


def test_job_status_shows_validation_losses_and_early_stop(tmp_path, monkeypatch):
    """The files and log lines of a run that EARLY_STOP ended, replayed as a job's output: the validation losses
    come from loss.csv's valid_loss column and, past its last complete row, from the log; rwkv-best.pth is listed
    once among the saved files; the page says why the run stopped and shows both lines on the chart."""
    monkeypatch.chdir(tmp_path)
    lines = _early_stopped_run(tmp_path)
    out = tmp_path / "output"
    (tmp_path / "replay.txt").write_text("\n".join(lines) + "\n")
    replay = [sys.executable, "-c", "import sys; sys.stdout.write(open('replay.txt').read())"]
    job = Job(replay, tmp_path, dict(os.environ), out, out / "job.env", resume=False)
    while job.running:
        time.sleep(0.05)
    st = job.status()
    assert st.valid_losses == [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.1), (5, 2.2)]
    assert [s for s, _ in st.losses] == [1, 2, 3, 4, 5]
    assert (st.state, st.exit_code, st.early_stop, st.best) == ("stopped_early", 0, 3, "output/rwkv-best.pth")
    assert st.saved == ["output/rwkv-best.pth", "output/rwkv-interrupted.pth"]
    text = progress_markdown(st)
    assert text.startswith("**Stopped early: no better validation loss for 3 validations; best: "
                           "`output/rwkv-best.pth`**"), text
    assert "validation loss **2.2000** (optimizer step 5) · best so far **2.0000** (optimizer step 2)" in text
    frame = loss_frame(st).dropna()
    assert list(frame[frame.series == "validation"].itertuples(index=False, name=None)) == \
        [(1, 3.0, "validation"), (2, 2.0, "validation"), (3, 2.5, "validation"), (4, 2.1, "validation"),
         (5, 2.2, "validation")]
    # loss.csv written up to step 3, row 4 half written: steps 4 and 5 come from the log (printed to 4 decimals)
    csv_lines = (out / "loss.csv").read_text().splitlines(keepends=True)
    assert csv_lines[0] == "optimizer_step,epoch,loss,lr,tokens_per_s,valid_loss\n"
    (out / "loss.csv").write_text("".join(csv_lines[:4]) + csv_lines[4][:6])
    assert job.curves()[1] == [(1, 3.0), (2, 2.0), (3, 2.5), (4, 2.1), (5, 2.2)]
    assert job.curves()[0][:3] == job.status().losses[:3]


def test_loss_frame_has_a_training_and_a_validation_line():
    """Long form (step, loss, series), as the chart gets it: typed even when empty, and both lines named in every
    frame (the chart takes its lines from its first data) by a row without a loss; a long run's training line is
    thinned to about MAX_POINTS (its first and last steps kept), the validation line never."""
    import math
    from gradio import LinePlot
    from webui.progress import MAX_POINTS
    from webui.jobs import Status
    plot = LinePlot(x="step", y="loss", color="series")
    for st in (Status(), Status(state="running", losses=[(3, 2.0)])):
        frame = loss_frame(st)
        assert [str(t) for t in frame.dtypes[["step", "loss"]]] == ["int64", "float64"]
        assert plot.postprocess(frame).datatypes == {"step": "quantitative", "loss": "quantitative",
                                                     "series": "nominal"}
        head = list(frame.head(2).itertuples(index=False, name=None))
        assert [(s, n) for s, _, n in head] == [(st.losses[0][0] if st.losses else 0, "training"),
                                                (st.losses[0][0] if st.losses else 0, "validation")]
        assert all(math.isnan(v) for _, v, _ in head) and frame.loss.isna().sum() == 2
    st = Status(state="running", losses=[(i, 5.0 - i / 1000) for i in range(1, 4002)],
                valid_losses=[(i, 4.0 - i / 2000) for i in range(10, 4002, 10)])
    frame = loss_frame(st).dropna()
    train_rows = frame[frame.series == "training"]
    valid_rows = frame[frame.series == "validation"]
    assert len(train_rows) <= MAX_POINTS + 1 and list(train_rows.step)[-1] == 4001 and list(train_rows.step)[0] == 1
    assert list(valid_rows.step) == list(range(10, 4002, 10)) and list(valid_rows.loss) == [v for _, v in
                                                                                            st.valid_losses]
    assert list(frame.series) == ["training"] * len(train_rows) + ["validation"] * len(valid_rows)


def test_job_gets_one_ctrl_c_and_kill_ends_it(tmp_path):
    """Stop pressed twice (two tabs) and a server shutdown send the trainer one SIGINT, never a second one that
    could cut into the save it started; kill() ends a trainer that ignores SIGTERM too (SIGKILL)."""
    out = tmp_path / "output"
    out.mkdir()
    script = ("import signal, time, pathlib\n"
              "p = pathlib.Path('sigints')\n"
              "signal.signal(signal.SIGINT, lambda *a: p.write_text(p.read_text() + 'x' if p.exists() else 'x'))\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print('ready', flush=True)\n"
              "while True: time.sleep(0.05)\n")
    jobs = JobManager(tmp_path)
    jobs.job = Job([sys.executable, "-c", script], tmp_path, dict(os.environ), out, out / "job.env", resume=False)
    try:
        deadline = time.time() + 30
        while "ready" not in jobs.status().log and time.time() < deadline:
            time.sleep(0.05)
        assert jobs.interrupt() is True
        st = jobs.stop(wait_s=0.5)                     # the Stop button after a shutdown's interrupt
        assert st.running and st.state == "stopping"
        assert jobs.interrupt() is True
        time.sleep(0.3)
        assert (tmp_path / "sigints").read_text() == "x"
        jobs.kill(wait_s=0.5)
        assert jobs.job.proc.poll() == -9
    finally:
        if jobs.job.proc.poll() is None:
            jobs.job.proc.kill()
    deadline = time.time() + 10
    while jobs.running and time.time() < deadline:     # its output reader ends just after the process
        time.sleep(0.05)
    assert jobs.interrupt() is False


def test_upload_names_stay_in_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, want in (("../../etc/x.jsonl", "x.jsonl"), ("..\\..\\y.jsonl", "y.jsonl"), ("my data.jsonl",
                       "my_data.jsonl"), ("/abs/z.JSONL", "z.JSONL"), ("a/..jsonl", None), (".jsonl", None),
                       (".hidden.jsonl", None), ("x.docx", None), ("x.txt", "x.txt"), ("a b.Parquet", "a_b.Parquet"),
                       (".csv", None), ("x.jsonl/..", None), ("", None)):
        if want is None:
            with pytest.raises(UserError):
                actions.safe_upload_name(name)
        else:
            assert actions.safe_upload_name(name) == want
    cache = tmp_path / "uploads"
    (cache / "ab12").mkdir(parents=True)
    src = cache / "ab12" / "src.jsonl"
    src.write_text('{"text": "hi"}\n')
    p = actions.save_upload(src, "../../../evil.jsonl", cache, Path("data"))
    assert p.resolve() == (tmp_path / "data" / "evil.jsonl").resolve() and p.read_text() == src.read_text()
    assert not (tmp_path.parent / "evil.jsonl").exists()


def test_only_uploaded_files_enter_data(tmp_path, monkeypatch):
    """save_upload copies only a file inside the upload folder: any other path of the machine, a link out of
    the folder, the folder itself or a folder in it are refused with one line, and data/ is left as it was."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "uploads"
    (cache / "ab12").mkdir(parents=True)
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "my secret"}\n')
    (cache / "ab12" / "link.jsonl").symlink_to(secret)
    (cache / "ab12" / "dir.jsonl").mkdir()
    for src, why in ((secret, "was not uploaded through the page"), ("/etc/passwd", "was not uploaded"),
                     (cache / "ab12" / "link.jsonl", "was not uploaded"), (cache / ".." / "secret.jsonl",
                     "was not uploaded"), (cache / "ab12" / "missing.jsonl", "not there any more"),
                     (cache, "was not uploaded"), (cache / "ab12" / "dir.jsonl", "is not a file")):
        with pytest.raises(UserError, match=why) as exc:
            actions.save_upload(src, Path(src).name if Path(src).name.endswith(".jsonl") else "x.jsonl", cache)
        assert "\n" not in str(exc.value)
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []
    good = cache / "ab12" / "mine.jsonl"
    good.write_text('{"text": "ok"}\n')
    assert actions.save_upload(good, "mine.jsonl", cache).read_text() == '{"text": "ok"}\n'
    (tmp_path / "data" / "taken.jsonl").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        actions.save_upload(good, "taken.jsonl", cache)
    # the same name again: the same bytes are the same file; other bytes go beside it, the user's file is kept
    assert actions.save_upload(good, "mine.jsonl", cache) == Path("data") / "mine.jsonl"
    other = cache / "ab12" / "other.jsonl"
    other.write_text('{"text": "new"}\n')
    assert actions.save_upload(other, "mine.jsonl", cache) == Path("data") / "mine-2.jsonl"
    assert (tmp_path / "data" / "mine.jsonl").read_text() == '{"text": "ok"}\n'
    assert (tmp_path / "data" / "mine-2.jsonl").read_text() == '{"text": "new"}\n'
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("env,field", [
    ({"LORA_R": "abc"}, "LORA_R"), ({"LORA_R": "0"}, "LORA_R"), ({"LR_FINAL": "1"}, "LR_FINAL"),
    ({"FINETUNE_MODE": "qlora"}, "FINETUNE_MODE"), ({"DATALOAD": "only", "MICRO_BSZ": "2"}, "DATALOAD"),
    ({"MODEL": ""}, "MODEL"), ({"TRAIN_PARTS": "emb xyz"}, "TRAIN_PARTS"), ({"GRAD_CP": "maybe"}, "GRAD_CP"),
])
def test_error_goes_next_to_its_field(env, field):
    values = {f.name: f.default for f in training_fields()}
    values.update(env)
    with pytest.raises(UserError) as exc:
        actions.check_config(values, files=False)
    assert actions.error_field(exc.value, TrainConfig.names()) == field


def _call(app, client=("127.0.0.1", 5000), host=b"127.0.0.1:7860", headers=(), method="GET", kind="http"):
    import asyncio
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request"}
    scope = {"type": kind, "client": client, "headers": [(b"host", host), *headers], "path": "/", "method": method,
             "scheme": "http" if kind == "http" else "ws"}
    asyncio.run(app(scope, receive, send))
    return sent


async def _ok(scope, receive, send):
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": []})


def test_guard_refuses_other_hosts():
    local = LocalOnly(_ok)
    assert _call(local)[0]["status"] == 200
    assert _call(local, host=b"localhost:7860")[0]["status"] == 200
    assert _call(local, client=("::1", 1), host=b"[::1]:7860")[0]["status"] == 200
    assert _call(local, client=("192.168.1.20", 5000))[0]["status"] == 403
    assert _call(local, host=b"evil.example:7860")[0]["status"] == 403      # DNS rebinding
    assert _call(LocalOnly(_ok, allow_remote=True), client=("192.168.1.20", 1), host=b"x:1")[0]["status"] == 200


@pytest.mark.parametrize("allow_remote", [False, True])
def test_guard_refuses_pages_of_other_sites(allow_remote):
    """A foreign Origin (any method, and websockets), or a foreign Referer on a non-GET request, gets 403 with
    one line; the page's own origin, and requests without either header, pass."""
    guard = LocalOnly(_ok, allow_remote=allow_remote)

    def status(headers=(), method="GET", host=b"127.0.0.1:7860"):
        sent = _call(guard, headers=headers, method=method, host=host)
        return sent[0]["status"], sent[1]["body"].decode() if len(sent) > 1 else ""
    same = (b"origin", b"http://127.0.0.1:7860")
    assert status([same], "POST")[0] == 200
    assert status([(b"origin", b"http://LOCALHOST:7860")], host=b"localhost:7860")[0] == 200
    assert status([(b"origin", b"http://[::1]:7860")], host=b"[::1]:7860")[0] == 200
    assert status([(b"origin", b"http://127.0.0.1")], host=b"127.0.0.1:80")[0] == 200     # default port
    assert status([(b"referer", b"http://127.0.0.1:7860/?view=api")], "POST")[0] == 200
    assert status([(b"referer", b"https://evil.example/page")], "GET")[0] == 200          # a link to the page
    assert status(method="POST")[0] == 200
    for headers, method in (([(b"origin", b"https://evil.example")], "GET"),
                            ([(b"origin", b"https://evil.example")], "POST"),
                            ([(b"origin", b"http://127.0.0.1:8000")], "POST"),              # another port
                            ([(b"origin", b"http://localhost:7860")], "POST"),              # another name
                            ([(b"origin", b"null")], "POST"),                               # a sandboxed frame
                            ([(b"origin", b"http://127.0.0.1:7860@evil.example")], "POST"),
                            ([(b"referer", b"https://evil.example/x?secret=1")], "POST"),
                            ([(b"referer", b"https://evil.example/")], "OPTIONS")):
        code, body = status(headers, method)
        assert code == 403, (headers, method)
        assert body.count("\n") == 1 and body.startswith("refused: a page of another site"), body
        assert "secret" not in body
    # a websocket from another site is closed before it opens (the server then answers the handshake with 403)
    ws = _call(guard, headers=[(b"origin", b"https://evil.example")], kind="websocket")
    assert ws == [{"type": "websocket.close", "code": 1008}]
    assert _call(guard, headers=[same], kind="websocket")[0]["type"] == "websocket.accept"


def test_data_report_matches_stats(tmp_path):
    from trainer.data.binidx import write_binidx
    from trainer.data.stats import summary
    from trainer.data.tokenizer import get_tokenizer
    tok = get_tokenizer()
    texts = ["User: hi\n\nAssistant: hello", "User: what is 2+2?\n\nAssistant: 4", "x" * 50]
    items = [tok.encode(t) + [0] for t in texts]
    write_binidx(tmp_path / "d", items)
    rep = actions.data_report(tmp_path / "d")
    lengths = np.array([len(i) for i in items])
    s = summary(lengths)
    assert (rep.items, rep.tokens) == (3, int(lengths.sum()))
    assert sum(c for _, c in rep.histogram) == 3
    assert rep.samples == [texts[0] + " ⟨end⟩", texts[1] + " ⟨end⟩"]
    assert [r for r in rep.batch_rows if r[2]] == [(3, "1×3  3×1", True)]
    assert f"max {s.max}" in rep.summary and "suggested CTX_LEN" in rep.summary


def test_tokenize_action_holds_out_valid_fraction(tmp_path):
    from trainer.data.binidx import BinIdx
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.jsonl").write_text("".join(f'{{"text": "User: q{i}\\n\\nAssistant: a{i}"}}\n' for i in range(10)))
    text, prefix = actions.tokenize("x.jsonl", "2", "", False, "", " 0.2 ", data_dir=data)
    assert prefix == data / "x" and 'VALID_DATA="x.valid"' in text and "VALID_FRACTION=0.2" in text
    held, train = BinIdx(data / "x.valid"), BinIdx(data / "x")
    assert (len(held), len(train)) == (2, 16)                            # round(0.2 x 10), the other 8 twice
    assert not {tuple(held[i]) for i in range(2)} & {tuple(train[i]) for i in range(16)}
    files = sorted(os.listdir(data))
    for value, says in (("abc", "VALID_FRACTION=abc is not a number"), ("0", "VALID_FRACTION=0 must be more than 0"),
                        ("0.99", "VALID_FRACTION=0.99 would hold out 10 of the 10 distinct items")):
        with pytest.raises(UserError, match=says) as exc:
            actions.tokenize("x.jsonl", "1", "", False, "", value, data_dir=data)
        assert "VALID_FRACTION" in exc.value.fix
    assert sorted(os.listdir(data)) == files
    text, _ = actions.tokenize("x.jsonl", "1", "", False, "", "", data_dir=data)      # empty: none held out
    assert len(BinIdx(data / "x")) == 10 and "warning: " in text and "VALID_FRACTION=0.05" in text


def test_chat_prompt_and_pairs():
    assert actions.chat_prompt([("hi", "hello\n\nthere")], "how are you?") == \
        "User: hi\n\nAssistant: hello\nthere\n\nUser: how are you?\n\nAssistant:"


def test_missing_gradio_says_what_to_install(monkeypatch):
    from tools import webui
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(UserError) as exc:
        webui.main(["--port", "7999"])
    assert exc.value.fix == 'pip install -e ".[webui]"'


@pytest.mark.parametrize("mb", ["0", "-5", "nan", "inf"])
def test_max_upload_mb_must_be_a_size(mb):
    from tools import webui
    with pytest.raises(UserError, match="--max-upload-mb .* is not a size") as exc:
        webui.main(["--max-upload-mb", mb])
    assert exc.value.fix == "give the largest upload in MB, e.g. --max-upload-mb 1024"


def test_port_in_use_is_one_line(tmp_path):
    import socket
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        from tools import webui
        with pytest.raises(UserError, match=f"port {port} is in use") as exc:
            webui.main(["--port", str(port), "--root", str(tmp_path)])
    assert exc.value.fix == f"stop it, or pick another port: PORT={port + 1} ./webui.sh"
    with pytest.raises(UserError, match="--host no.such.host.invalid is not an address of this machine"):
        webui.main(["--host", "no.such.host.invalid", "--root", str(tmp_path)])
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(UserError, match="data is a file, but the project keeps its data files in a folder data/"):
        webui.main(["--port", str(_free_port()), "--root", str(tmp_path)])


def test_sampling_settings():
    assert actions.sampling_settings("80", 1, "0.5") == (80, 1.0, 0.5)
    for bad in (("x", 1, 0.5), (None, 1, 0.5), (0, 1, 0.5), (5, -1, 0.5), (5, 1, 0), (5, 1, 1.5), (5, "nan", 0.5)):
        with pytest.raises(UserError):
            actions.sampling_settings(*bad)


def test_memory_estimate_shows_grad_cp_autos_plan_on_a_gpu(tmp_path, monkeypatch):
    """The page's memory panel: on the CPU the plain estimate; on a GPU (simulated: 80 GiB free) the plan that
    GRAD_CP=auto will make there, as the trainer's preflight makes it."""
    import torch
    from trainer import ops, plan
    from trainer.checkpoint import config_from_sizes, init_model, save_atomic
    path = tmp_path / "m.pth"
    save_atomic(init_model(config_from_sizes(7, 2, 128)).state_dict(), path)
    cfg = TrainConfig.from_env(dict(MODEL=str(path), DATA="d", GRAD_CP="auto", OP="chunk"))
    text = actions.memory_estimate(cfg)
    assert "allocated" in text and "GRAD_CP=auto" not in text
    from trainer.plan import Machine
    monkeypatch.setattr(plan, "device_for", lambda cfg: torch.device("cuda"))
    monkeypatch.setattr(ops, "resolve", lambda op, device, version: "triton")
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device, memory_too=True: Machine(
        device="cuda", free=80 * 2**30, probed=True)))
    text = actions.memory_estimate(cfg)
    assert "device cuda (a GPU), precision" in text and "WKV op 'triton'" in text
    assert "GRAD_CP=auto: 0 of 2 blocks checkpointed, the top 2 keep their activations" in text


# ------------------------------------------------------------------------------------------ the running server
# `python -m tools.webui` in a subprocess, driven through its HTTP API as a script (or a page of another site)
# would drive it: POST /gradio_api/call/NAME, then the answer's events from GET /gradio_api/call/NAME/EVENT_ID.
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, *args: str) -> tuple[subprocess.Popen, str]:
    import urllib.request
    pytest.importorskip("gradio", reason="the web page needs gradio (pip install -e \".[webui]\")")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(root / "gradio-uploads")}
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tools.webui", "--root", str(root), "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the web page did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.3)


def http(url: str, path: str, method: str = "GET", body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def api(url: str, name: str, *data) -> tuple[str, object]:
    """Call an event handler of the page by its API name: ("complete", outputs) or ("error", the message)."""
    import json
    code, text = http(url, f"/gradio_api/call/{name}", "POST", json.dumps({"data": list(data)}).encode(),
                      {"Content-Type": "application/json"})
    assert code == 200, text
    code, text = http(url, f"/gradio_api/call/{name}/{json.loads(text)['event_id']}")
    event, payload = None, None
    for line in text.splitlines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(line[len("data: "):])
    if event == "error" and isinstance(payload, dict):
        payload = payload.get("error")
    return event, payload


def multipart(name: str, content: bytes) -> tuple[bytes, dict]:
    """A body for POST /gradio_api/upload: what the page sends when the user picks a file."""
    boundary = "----rwkvtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def file_data(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def _wrong_files(root: Path) -> None:
    """A project full of what a user can get wrong: folders where files belong, junk files, a file as OUTPUT."""
    from trainer.checkpoint import config_from_sizes, init_model, save_atomic
    from trainer.data.binidx import write_binidx
    for d in ("data/dir.jsonl", "model/folder.pth", "output/dir.env"):
        (root / d).mkdir(parents=True)
    save_atomic(init_model(config_from_sizes(7, 2, 64)).state_dict(), root / "model" / "tiny.pth")
    (root / "model" / "junk.pth").write_text("not a model\n")
    (root / "output" / "rwkv-0.pth").write_text("not a checkpoint\n")
    (root / "afile").write_text("x")
    (root / "data" / "bad.idx").write_text("garbage")
    (root / "data" / "bad.bin").write_text("")
    (root / "data" / "gone.jsonl").write_text('{"text": "x"}\n')
    (root / "data" / "badtype.jsonl").write_text('{"text": 1}\n')
    (root / "data" / "ten.jsonl").write_text("".join(f'{{"text": "item {i}"}}\n' for i in range(10)))   # good
    write_binidx(root / "data" / "good", [[1, 2, 3, 0]] * 8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The page's server over a project of wrong files (_wrong_files), uploads capped at 0.05 MB."""
    root = tmp_path_factory.mktemp("server")
    _wrong_files(root)
    proc, url = start_server(root, "--max-upload-mb", "0.05")
    yield url, root
    proc.send_signal(2)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    text = (root / "server.log").read_text()
    assert "Traceback" not in text, text[-4000:]          # no request of the tests hit a bug of ours


def test_server_copies_only_uploaded_files_into_data(server, tmp_path):
    """Through the HTTP API: naming a file of this machine (outside Gradio's upload folder, or put in that folder
    without an upload) is refused with one line and copies nothing; a real upload lands in data/."""
    url, root = server
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "my secret"}\n')
    event, msg = api(url, "on_upload", file_data(secret))
    assert event == "error" and msg.startswith("refused: 'secret.jsonl' was not uploaded through this page"), msg
    assert "\n" not in msg
    planted = root / "gradio-uploads" / "0123abcd" / "planted.jsonl"     # in the upload folder, never uploaded
    planted.parent.mkdir(parents=True)
    planted.write_text('{"text": "planted"}\n')
    event, out = api(url, "on_upload", file_data(planted))
    assert event == "complete" and out[0].startswith("error: 'planted.jsonl' was not uploaded through the page"), out
    assert not (root / "data" / "secret.jsonl").exists() and not (root / "data" / "planted.jsonl").exists()
    assert not [p for p in (root / "gradio-uploads").rglob("secret.jsonl")]        # not even copied into the cache
    # what a browser does: upload, then the upload event names the uploaded file
    content = b'{"text": "User: hi\\n\\nAssistant: hello"}\n'
    code, text = http(url, "/gradio_api/upload", "POST", *multipart("my data.jsonl", content))
    assert code == 200, text
    import json
    uploaded = json.loads(text)[0]
    event, out = api(url, "on_upload", file_data(uploaded))
    assert event == "complete" and out[0] == "✔ uploaded into `data/my_data.jsonl`", out
    assert out[1]["value"] == "my_data.jsonl"
    assert (root / "data" / "my_data.jsonl").read_bytes() == content
    (root / "data" / "my_data.jsonl").unlink()


def test_server_caps_upload_size(server):
    """--max-upload-mb 0.05: Gradio refuses a larger upload (413, one line) and nothing is stored."""
    url, root = server
    before = sorted(p.name for p in (root / "gradio-uploads").rglob("*") if p.is_file())
    code, text = http(url, "/gradio_api/upload", "POST", *multipart("big.jsonl", b"x" * (60 * 1024)))
    assert code == 413 and "maximum allowed size" in text and text.count("\n") <= 1, (code, text)
    assert sorted(p.name for p in (root / "gradio-uploads").rglob("*") if p.is_file()) == before
    code, text = http(url, "/gradio_api/upload", "POST", *multipart("small.jsonl", b"x" * (40 * 1024)))
    assert code == 200, text
    code, config = http(url, "/config")
    assert "Upload a data file into data/ (up to 0.05 MB)" in config


def test_server_refuses_pages_of_other_sites(server):
    """A foreign Origin gets 403 and one line on every route the page uses (the page, the queue and its event
    stream, the call API, uploads, a websocket handshake); a foreign Referer on a POST too. The same origin works."""
    url, root = server
    evil = {"Origin": "https://evil.example"}
    json_type = {"Content-Type": "application/json"}
    for method, path, body, headers in (
            ("GET", "/", None, evil),
            ("GET", "/config", None, evil),
            ("POST", "/gradio_api/queue/join", b"{}", {**evil, **json_type}),
            ("GET", "/gradio_api/queue/data?session_hash=x", None, evil),
            ("POST", "/gradio_api/call/on_stop", b'{"data": []}', {**evil, **json_type}),
            ("POST", "/gradio_api/call/on_stop", b'{"data": []}', {"Origin": "null", **json_type}),
            ("POST", "/gradio_api/call/on_stop", b'{"data": []}', {"Origin": url.replace("127.0.0.1", "localhost"),
                                                                  **json_type}),
            ("POST", "/gradio_api/call/on_stop", b'{"data": []}',
             {"Referer": "https://evil.example/attack.html", **json_type}),
            ("POST", "/gradio_api/upload", *multipart("x.jsonl", b"{}")[:1], {**evil, **multipart("x.jsonl", b"")[1]}),
            ("OPTIONS", "/gradio_api/call/on_stop", None, {**evil, "Access-Control-Request-Method": "POST"}),
            ("GET", "/gradio_api/queue/data", None, {**evil, "Connection": "Upgrade", "Upgrade": "websocket",
                                                    "Sec-WebSocket-Version": "13",
                                                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})):
        code, text = http(url, path, method, body, headers)
        assert code == 403, (method, path, headers, code, text[:200])
        assert text.startswith("refused: a page of another site") and text.count("\n") == 1, text
    code, text = http(url, "/gradio_api/call/on_stop", "POST", b'{"data": []}', {"Origin": url, **json_type})
    assert code == 200, text
    assert http(url, "/", headers={"Referer": "https://evil.example/"})[0] == 200       # a link to the page


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def form_values(**overrides) -> list:
    """The Train form's inputs in their order, as the page sends them: training.sh's defaults, then ``overrides``."""
    values = {f.name: f.default for f in training_fields()}
    values.update(overrides)
    return [values[f.name].split() if f.name == "TRAIN_PARTS" else values[f.name] for f in training_fields()]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the trainer process in /proc (Linux)")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_the_server_stops_its_training_job_with_a_save(tmp_path, sig):
    """SIGTERM or SIGINT (Ctrl+C) to the server: the training job it started gets its Ctrl+C, saves
    rwkv-interrupted.pth, and is gone before the server exits (exit code 0); the Merge tab then opens at that
    job's OUTPUT, listing its checkpoints."""
    import signal
    make_project(tmp_path, 7, items=[list(range(1, 30)) + [0]] * 64)
    proc, url = start_server(tmp_path)
    try:
        event, out = api(url, "on_start", "job", *form_values(
            MODEL="tiny.pth", DATA="toy", OUTPUT="out-run", LORA_R="4", LORA_ALPHA="8", CTX_LEN="32",
            MICRO_BSZ="1", EPOCH_STEPS="64", EPOCH_COUNT="50", PRECISION="fp32", ACCELERATOR="cpu", OP="chunk",
            GRAD_CP="0", SAMPLE_PROMPT="ab", WARMUP_STEPS="0"))
        assert event == "complete" and out[0].startswith("Started:"), out
        trainers = [p for p in _children(proc.pid) if b"tools.train" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(trainers) == 1
        csv_path = tmp_path / "out-run" / "loss.csv"
        deadline = time.time() + 120         # training steps are running: loss.csv has its first block of rows
        while time.time() < deadline and not (csv_path.is_file() and len(csv_path.read_text().splitlines()) > 1):
            assert proc.poll() is None and _alive(trainers[0])
            time.sleep(0.3)
        assert len(csv_path.read_text().splitlines()) > 1, (tmp_path / "out-run" / "webui-train.log").read_text()
        event, out = api(url, "on_load_page", "output", *["(none)"] * 6)      # a page opened now
        assert event == "complete" and out[5]["value"] == "out-run", out[5]     # Merge: the job's OUTPUT
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert not _alive(trainers[0]), log
    assert (tmp_path / "out-run" / "rwkv-interrupted.pth").is_file(), log
    assert "stopped: saved" in (tmp_path / "out-run" / "webui-train.log").read_text()
    assert "the training job stopped (exit code 130); saved: " in log and "Traceback" not in log, log


def test_page_preselects_no_data_and_merge_opens_at_what_was_trained(server):
    """The Data tab's .jsonl list and the Train form's DATA start empty (the page never picks data for the user;
    Check then says how to choose it); the Merge tab opens at the OUTPUT of the newest saved config whose folder
    holds checkpoints, with them listed."""
    import json
    url, root = server
    (root / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    code, text = http(url, "/config")
    props = {c["props"].get("elem_id"): c["props"] for c in json.loads(text)["components"] if "props" in c}
    assert props["data-file"].get("value") is None and props["field-DATA"].get("value") is None
    assert props["data-file"]["choices"] and props["field-DATA"]["choices"]           # there was data to pick
    event, out = api(url, "on_check", *form_values(DATA=""))
    assert event == "complete" and out[0].startswith("error: DATA is empty: no tokenized data is chosen. Fix: "
                                                     "tokenize your data on the Data tab"), out[0]
    names = [f.name for f in training_fields()]
    assert out[1 + names.index("DATA")]["visible"] is True          # shown under the DATA field
    (root / "output").mkdir(exist_ok=True)
    (root / "run-a").mkdir()
    for tag in ("0", "1", "interrupted"):
        (root / "run-a" / f"rwkv-{tag}.pth").write_bytes(b"")
    write_env_file(root / "output" / "a.env", {"OUTPUT": "run-a"})
    time.sleep(0.05)
    write_env_file(root / "output" / "b.env", {"OUTPUT": "run-b"})      # newer, but nothing trained there
    event, out = api(url, "on_load_page", "output", *["(none)"] * 6)
    assert event == "complete", out
    assert ["a.jsonl", "a.jsonl"] in out[0]["choices"] and "value" not in out[0]     # listed, not chosen
    assert ["dir.jsonl/", "dir.jsonl"] in out[0]["choices"]                           # a folder is data too
    assert out[5]["value"] == "run-a"
    assert out[6]["choices"] == [["0", "0"], ["1", "1"], ["interrupted", "interrupted"]] and out[6]["value"] == \
        "interrupted"
    (root / "data" / "a.jsonl").unlink()


def test_validation_fields_and_their_errors(server):
    """VALID_DATA, VALID_FRACTION, VALID_EVERY and EARLY_STOP are on the form (the data section, training.sh's
    defaults); VALID_DATA offers data/'s tokenized sets after "(none)" (its empty value, chosen); Check shows a
    wrong validation setting as its one line, under its field."""
    import json
    url, root = server
    fields = {f.name: f for f in training_fields()}
    for name, default in (("VALID_DATA", ""), ("VALID_FRACTION", "0"), ("VALID_EVERY", "0"), ("EARLY_STOP", "0")):
        assert (fields[name].section, fields[name].default) == ("data", default) and fields[name].help, name
    code, text = http(url, "/config")
    props = {c["props"].get("elem_id"): c["props"] for c in json.loads(text)["components"] if "props" in c}
    assert props["field-VALID_DATA"]["choices"][0] == ["(none)", ""] and props["field-VALID_DATA"]["value"] == ""
    assert ["good", "good"] in props["field-VALID_DATA"]["choices"]
    for name in ("VALID_FRACTION", "VALID_EVERY", "EARLY_STOP"):
        assert props[f"field-{name}"]["value"] == "0"
    # the Data page holding items out fills VALID_DATA in (and lists the new sets); without, it is left as it is
    try:
        event, out = api(url, "on_tokenize", "ten.jsonl", "1", "", False, "", "0.2")
        assert event == "complete" and "set VALID_DATA=`ten.valid` (done for you)" in out[0], out
        assert out[9]["value"] == "ten.valid" and ["ten.valid", "ten.valid"] in out[9]["choices"]
        assert out[8]["value"] == "ten" and out[9]["choices"][0] == ["(none)", ""]
        event, out = api(url, "on_tokenize", "ten.jsonl", "1", "", False, "", "")
        assert event == "complete" and "VALID_DATA" not in out[0] and "value" not in out[9], out[0]
    finally:
        for f in ("ten.bin", "ten.idx", "ten.valid.bin", "ten.valid.idx"):
            (root / "data" / f).unlink(missing_ok=True)
    event, out = api(url, "on_load_page", "output", *["(none)"] * 6)
    assert event == "complete" and out[-1]["choices"][0] == ["(none)", ""] and ["good", "good"] in out[-1]["choices"]
    ok = dict(MODEL="tiny.pth", DATA="good", EPOCH_STEPS="2", MICRO_BSZ="1", CTX_LEN="16", ACCELERATOR="cpu",
              PRECISION="fp32", OP="chunk", OUTPUT="output/fresh")
    names = [f.name for f in training_fields()]
    for wrong, field, want in (
            (dict(VALID_FRACTION="1"), "VALID_FRACTION", "error: VALID_FRACTION=1.0 must be at least 0 and less than "
             "1. Fix: hold out a small share, e.g. VALID_FRACTION=0.05, or 0 for no validation set"),
            (dict(EARLY_STOP="2"), "EARLY_STOP", "error: EARLY_STOP=2 needs a validation set, and there is none. "
             "Fix: set VALID_DATA"),
            (dict(VALID_DATA="good"), "VALID_DATA", "error: VALID_DATA=good is the training data"),
            (dict(VALID_DATA="missing"), "VALID_DATA", "error: VALID_DATA: data/missing"),
            (dict(VALID_FRACTION="0.25"), "VALID_FRACTION", "error: VALID_FRACTION=0.25 holds items out for "
             "validation, but the data has only 1 distinct item")):          # good: 8 copies of one item
        event, out = api(url, "on_check", *form_values(**{**ok, **wrong}))
        assert event == "complete" and out[0].startswith(want) and "\n" not in out[0], (wrong, out[0])
        assert out[1 + names.index(field)]["visible"] is True, (wrong, out[0])
    from trainer.data.binidx import write_binidx
    write_binidx(root / "data" / "held", [[4, 5, 6, 0], [7, 8, 0]])
    try:
        event, out = api(url, "on_check", *form_values(**{**ok, "VALID_DATA": "held", "EARLY_STOP": "2"}))
        assert event == "complete" and out[0].startswith("✔ the config is valid"), out[0]
    finally:
        for ending in (".bin", ".idx"):
            (root / "data" / f"held{ending}").unlink()


def test_trained_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert actions.trained_output() == "output"                          # nothing saved yet
    assert actions.trained_output("my-run") == "my-run"                  # the last job this server started
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "broken.env").write_text("not a config\n")
    write_env_file(tmp_path / "output" / "old.env", {"OUTPUT": "old"})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "rwkv-3.pth").write_bytes(b"")
    os.utime(tmp_path / "output" / "old.env", (1, 1))
    write_env_file(tmp_path / "output" / "new.env", {"OUTPUT": "new"})
    assert actions.trained_output() == "old"                             # new/ holds no checkpoint
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "rwkv-0.pth").write_bytes(b"")
    assert actions.trained_output() == "new"
    assert actions.trained_output("running") == "running"


def test_wrong_values_give_one_line_never_a_traceback(server):
    """Every action of the page, called with what a user can get wrong (missing files, bad names, a folder where a
    file belongs, a file where a folder belongs, junk files, values that are not numbers): one line that starts
    with "error:" in the page, and no traceback in the server's log. A value the page never offers (not among a
    list's choices: a request made by hand) is refused by Gradio before any action runs: one line too."""
    url, root = server
    (root / "data" / "gone.jsonl").unlink()            # listed when the page was made, deleted since
    ok = dict(MODEL="tiny.pth", DATA="good", EPOCH_STEPS="2", MICRO_BSZ="1", CTX_LEN="16", ACCELERATOR="cpu",
              PRECISION="fp32", OP="chunk", OUTPUT="output/fresh")
    none3 = ["(none)", "(none)", []] * 3            # the three chat columns: model, what goes on it, history
    cases = [   # (action, its inputs, which output holds the message, the message starts with)
        ("on_tokenize", ["gone.jsonl", "1", "", False, "", ""], 0, "error: data/gone.jsonl not found"),
        ("on_tokenize", ["badtype.jsonl", "1", "", False, "", ""], 0, 'error: data/badtype.jsonl, line 1: "text" is a '
                                                                'JSON number'),
        ("on_tokenize", [None, "1", "", False, "", ""], 0, "error: no data file chosen"),
        ("on_tokenize", ["badtype.jsonl", "two", "", False, "", ""], 0, "error: REPEAT must be a positive whole number"),
        ("on_tokenize", ["badtype.jsonl", "1", "", False, "body", ""], 0, 'error: data/badtype.jsonl, line 1: the '
                                                                    'object has no field "body" (COLUMN=body)'),
        ("on_tokenize", ["dir.jsonl", "1", "", False, "", ""], 0, "error: data/dir.jsonl is a folder with no data files"),
        ("on_tokenize", ["badtype.jsonl", "1", "", False, "", "abc"], 0, "error: VALID_FRACTION=abc is not a number"),
        ("on_tokenize", ["badtype.jsonl", "1", "", False, "", "1"], 0, "error: VALID_FRACTION=1 must be more than 0"),
        ("on_show", [None], 0, "error: no tokenized data chosen"),
        ("on_show", ["bad"], 0, "error: data/bad.idx is not a binidx index file"),
        ("on_save", ["dir", *form_values(**ok)], 0, "error: output/dir.env is a folder"),
        ("on_save", ["../x", *form_values(**ok)], 0, "error: config name '../x' is not a plain name"),
        ("on_check", form_values(**{**ok, "MODEL": "folder.pth"}), 0, "error: MODEL: model/folder.pth is a folder, not a file"),
        ("on_check", form_values(**{**ok, "MODEL": "junk.pth"}), 0, "error: model/junk.pth "),
        ("on_check", form_values(**{**ok, "DATA": "../../etc/passwd"}), 0, "error: DATA: "),
        ("on_check", form_values(**{**ok, "LORA_R": "abc"}), 0, "error: LORA_R='abc' is not a whole number"),
        ("on_start", ["run", *form_values(**{**ok, "OUTPUT": "afile"})], 0, "error: OUTPUT=afile is a file"),
        ("on_merge", ["afile", "0", "bf16", False, "", "", ""], 0, "error: OUTPUT=afile is a file"),
        ("on_merge", ["output", "0", "bf16", False, "", "", ""], 0, "error: output/rwkv-0.pth "),
        ("on_merge", ["output", None, "bf16", False, "", "", ""], 0, "error: no checkpoint chosen"),
        ("on_stop", [], 0, "no training job is running."),
    ]
    for name, args, at, want in cases:
        event, out = api(url, name, *args)
        got = out[at] if event == "complete" else out
        assert event == "complete" and isinstance(got, str) and got.startswith(want), (name, args[:2], got)
        assert "\n" not in got and "unexpected error" not in got
    event, out = api(url, "epochs_update", "afile")                    # a file as OUTPUT: simply no checkpoints
    assert event == "complete" and out[0]["choices"] == []
    for name, args in (("on_tokenize", ["../../etc/passwd", "1", "", False, "", ""]), ("on_show", ["missing"]),
                       ("on_load", ["dir"]), ("on_load", ["../x"]),
                       ("on_merge", ["output", "../x", "bf16", False]),
                       ("on_send", ["hi", 3, 1, 0.5, "/etc/passwd", *none3[1:]]),
                       ("on_send", ["hi", "abc", 1, 0.5, *none3]), ("on_send", ["hi", 3, 1, 7, *none3]),
                       ("on_check", form_values(**{**ok, "TRAIN_PARTS": "bogus"})),
                       ("on_check", form_values(**{**ok})[:3])):
        event, msg = api(url, name, *args)
        assert event == "error" and msg.startswith("refused: ") and "\n" not in msg, (name, args[:2], msg)
    assert http(url, "/download/merge/%00x")[0] == 404
    assert http(url, "/download/merge/" + "x" * 5000)[0] == 404
    assert "Traceback" not in (root / "server.log").read_text()


# ------------------------------------------------------------------------------------------ merge tab
def test_merge_tab_takes_an_rwkv_peft_lora_file_with_its_alpha(tmp_path, monkeypatch):
    """An RWKV-PEFT LoRA file (its layout: X.lora_A [r, in] / X.lora_B [out, r] under the model's names, no
    metadata) merges through the page's action with BASE and LORA_ALPHA: W + alpha/r · B·A; without the alpha it
    is refused with one line pointing at the Merge tab's field, and nothing is written."""
    import torch

    from trainer import checkpoint
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    base = checkpoint.load_checkpoint("model/tiny.pth")
    g = torch.Generator().manual_seed(3)
    adapter = {}
    for i in range(2):
        for m in ("att.receptance", "att.value", "ffn.key"):
            out_dim, in_dim = base[f"blocks.{i}.{m}.weight"].shape
            adapter[f"blocks.{i}.{m}.lora_A"] = torch.randn(4, in_dim, generator=g) * 0.1
            adapter[f"blocks.{i}.{m}.lora_B"] = torch.randn(out_dim, 4, generator=g) * 0.1
    Path("peft").mkdir()
    torch.save(adapter, "peft/rwkv-0.pth")
    kw = dict(merge_dir=tmp_path / "merge", model_dir=tmp_path / "model", base="tiny.pth")
    with pytest.raises(UserError) as e:
        actions.merge("peft", "0", "fp32", **kw)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "does not record the alpha" in msg, msg
    assert "LORA_ALPHA = 32 in the Merge tab" in msg and "./merge.sh" not in msg, msg
    assert not (tmp_path / "merge").exists()
    with pytest.raises(UserError, match="LORA_ALPHA='x' is not a number"):
        actions.merge("peft", "0", "fp32", lora_alpha="x", **kw)

    text, files = actions.merge("peft", "0", "fp32", lora_alpha=" 8 ", **kw)
    assert "an RWKV-PEFT LoRA file (rank 4, LORA_ALPHA=8 as given)" in text and "records no base model" in text
    merged = checkpoint.load_checkpoint(files[0])
    assert files[0].name == "tiny-lora-0.pth" and merged.keys() == base.keys()
    for k, w in base.items():
        stem = k[:-len(".weight")]
        want = w.float() + 8 / 4 * adapter[stem + ".lora_B"] @ adapter[stem + ".lora_A"] \
            if stem + ".lora_A" in adapter else w.float()
        assert torch.allclose(merged[k].float(), want, atol=1e-6), k


def test_merge_tab_refuses_what_merge_sh_refuses_for_our_own_checkpoints(tmp_path, monkeypatch):
    """Our checkpoints record alpha and PiSSA's initial A and B: a value given for one is refused as merge.sh
    refuses it, and empty fields merge it as before."""
    import torch

    from trainer import checkpoint
    from trainer.loop import train
    from test_train import config
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    train(config(EPOCH_STEPS=1), progress=False, log=lambda *_: None)
    kw = dict(merge_dir=tmp_path / "merge", model_dir=tmp_path / "model")
    with pytest.raises(UserError, match="records the alpha it was trained with, 16"):
        actions.merge("output", "0", "fp32", lora_alpha="32", **kw)
    torch.save({}, "init_pissa.pth")
    with pytest.raises(UserError, match="holds PiSSA's initial A and B itself.*leave PISSA_INIT empty"):
        actions.merge("output", "0", "fp32", pissa_init="init_pissa.pth", **kw)
    assert not (tmp_path / "merge").exists()
    actions.merge("output", "0", "fp32", lora_alpha="16", **kw)      # its own alpha: as merge.sh, no refusal
    _, files = actions.merge("output", "0", "fp32", base="", lora_alpha="", pissa_init="", **kw)
    again = checkpoint.merge_epoch(0, output_dir="output", merge_dir="m-sh", model_dir="model", dtype="fp32")
    a, b = checkpoint.load_checkpoint(files[0]), checkpoint.load_checkpoint(again.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
