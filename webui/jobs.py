"""The one training job of the web page: started as a separate process, watched, stopped like Ctrl+C.

    jobs = JobManager(root)                     # one per server; the job's state lives here, not in the page
    jobs.start(env_file, output_dir, resume)    # python -m tools.train --config ENV_FILE --no-progress
    st = jobs.status()                          # what the page shows: step, loss, tokens/s, time left, losses...
    jobs.stop()                                 # SIGINT to the trainer (once), as Ctrl+C, then wait for its save
    jobs.interrupt()                            # the same SIGINT without waiting (the server's shutdown)

Only one job runs at a time (a second start is refused with a UserError). A reloaded page or a second tab
calls ``status()`` and sees the same job. The trainer's own files are the source of truth: ``loss.csv``
(every optimizer step, written in blocks of 10), ``samples.txt`` (one sample per save) and its log lines
(``--no-progress``: one line per ~5% of the run or every 15 s). Rows of ``loss.csv`` and ``samples.txt``
written before the job started (an earlier run in the same OUTPUT) are not shown unless it resumes.
With a validation set, ``loss.csv``'s 6th column (valid_loss; files of older runs have 5) holds the validation
loss on the steps after which one ran, and the log says each as it comes ("validation after optimizer step N:
loss X ..."), and why the run stopped when EARLY_STOP ended it.
"""
from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"epoch (\d+) step (\d+)/(\d+)\s+optimizer step (\d+)/(\d+)\s+loss (\S+)\s+lr (\S+)\s+"
                      r"([\d,.]+) tokens/s")
SAVED = re.compile(r"^(?:saved|stopped: saved) (\S+\.pth)")
VALIDATION = re.compile(r"^validation after optimizer step (\d+): loss (\S+) over .*?(?:saved (.+\.pth))?$")
EARLY_STOP = re.compile(r"^EARLY_STOP=\d+: .* for (\d+) validations.*? The best checkpoint is (.+?\.pth); "
                        r"the last is (.+?\.pth) \(")
LOG_LINES = 400


@dataclass
class Status:
    state: str = "idle"    # idle | starting | running | stopping | finished | stopped | stopped_early | failed
    running: bool = False
    step: int = 0                    # optimizer steps done
    total: int = 0                   # optimizer steps in the run
    epoch: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, loss) for the chart
    valid_losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, validation loss)
    early_stop: int = 0              # EARLY_STOP ended the run: this many validations without a better loss
    best: str = ""                   # rwkv-best.pth, once the trainer saved one
    samples: str = ""
    saved: list[str] = field(default_factory=list)
    log: str = ""
    exit_code: int | None = None
    error: str = ""                  # the trainer's "error: ..." line (a UserError), if it failed with one
    output_dir: str = ""
    env_file: str = ""
    command: str = ""


class Job:
    def __init__(self, cmd: list[str], cwd: Path, env: dict, output_dir: Path, env_file: Path, resume: bool):
        self.output_dir = output_dir
        self.env_file = env_file
        self.csv_path = output_dir / "loss.csv"
        self.samples_path = output_dir / "samples.txt"
        # rows from an earlier run in the same folder are not this job's (unless it resumes that run)
        # a new run starts with no loss.csv (the trainer refuses an OUTPUT holding a run unless OVERWRITE=1, which
        # removes it), and a resumed run's rows are its own: shown from the start either way
        self.csv_from = self.samples_from = 0
        self.log_path = output_dir / "webui-train.log"
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.progress: list[tuple[float, tuple]] = []    # (time received, PROGRESS groups)
        self.validations: list[tuple[int, float]] = []    # (optimizer step, loss) of the log's VALIDATION lines
        self.early_stop = 0                                 # validations without a better loss (EARLY_STOP line)
        self.best = ""
        self.saved: list[str] = []
        self.error = ""
        self.stop_requested = False
        self.started = time.time()
        self.ended: float | None = None
        self.command = " ".join(cmd)
        from trainer.files import make_folder, write_error
        make_folder(output_dir, "OUTPUT")
        try:      # appended: the log of an earlier job in this folder stays (a refused start overwrites nothing)
            self._log = open(self.log_path, "a", encoding="utf-8")
            self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}  {self.command}\n")
        except OSError as err:
            raise write_error(err, self.log_path) from None
        # its own process group: SIGINT reaches the trainer and any process it starts, as Ctrl+C in a terminal
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                     bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            if self._log is not None:
                try:
                    self._log.write(raw)
                    self._log.flush()
                except OSError as err:     # a full disk: the page keeps showing the lines, the file stops
                    self.lines.append(f"(the web page stopped copying these lines to {self.log_path}: "
                                      f"{err.strerror or err})")
                    self._close_log()
            m = PROGRESS.search(line)
            if m:
                self.progress.append((time.time(), m.groups()))
            m = SAVED.search(line.strip())
            if m:
                self.saved.append(m.group(1))
            self._read_validation(line.strip())
            if line.startswith("error: "):
                self.error = line[len("error: "):]
        self.proc.wait()
        self.ended = time.time()
        self._close_log()

    def _read_validation(self, line: str) -> None:
        """A validation line (its loss; rwkv-best.pth when it saved one), or EARLY_STOP's line (it saved the last
        state as rwkv-interrupted.pth, and names the best)."""
        m = VALIDATION.match(line)
        if m:
            self.validations.append((int(m.group(1)), float(m.group(2))))
            if m.group(3):
                self._saved_once(m.group(3))
                self.best = m.group(3)
            return
        m = EARLY_STOP.match(line)
        if m:
            self.early_stop = int(m.group(1))
            self.best = m.group(2)
            self._saved_once(m.group(3))

    def _saved_once(self, path: str) -> None:
        """rwkv-best.pth is written again at every better loss: listed once, where it was first saved."""
        if path not in self.saved:
            self.saved.append(path)

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            try:
                log.close()
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self.proc.poll() is None or self._reader.is_alive()

    def _csv_rows(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """loss.csv's complete rows: (optimizer step, loss), and (optimizer step, valid_loss) where that column
        (the 6th; a file of an older run has 5) holds a value."""
        rows: list[tuple[int, float]] = []
        valid: list[tuple[int, float]] = []
        try:
            with open(self.csv_path, encoding="utf-8") as fh:
                head = fh.readline()
                fh.seek(max(self.csv_from, len(head)))
                text = fh.read()
                text = text[:text.rfind("\n") + 1]       # a row the trainer is still writing waits
                for row in csv.reader(io.StringIO(text)):
                    if len(row) >= 3 and row[0].isdigit():
                        rows.append((int(row[0]), float(row[2])))
                        if len(row) >= 6 and row[5].strip():
                            valid.append((int(row[0]), float(row[5])))
        except (OSError, ValueError):
            pass
        return rows, valid

    def curves(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """The chart's training and validation losses: loss.csv's, then those of the log's lines about the steps
        after its last row (the trainer writes it in blocks of 10 rows)."""
        rows, valid = self._csv_rows()
        in_csv = rows[-1][0] if rows else -1
        last = in_csv
        for _, g in self.progress:
            step = int(g[3])
            if step > last:
                rows.append((step, float(g[5])))
                last = step
        valid += [(step, loss) for step, loss in self.validations if step > in_csv]
        return rows, valid

    def losses(self) -> list[tuple[int, float]]:
        return self.curves()[0]

    def samples(self) -> str:
        try:
            with open(self.samples_path, encoding="utf-8") as fh:
                fh.seek(self.samples_from)
                return fh.read()
        except OSError:
            return ""

    def status(self) -> Status:
        running = self.running
        code = None if running else self.proc.returncode
        if running:
            state = "stopping" if self.stop_requested else ("running" if self.progress else "starting")
        elif code == 0 and self.early_stop:         # EARLY_STOP ended it (a Stop pressed meanwhile came too late)
            state = "stopped_early"
        elif self.stop_requested or code == 130:
            state = "stopped"
        else:
            state = "finished" if code == 0 else "failed"
        now = self.ended if self.ended and not running else time.time()
        losses, valid = self.curves()
        st = Status(state=state, running=running, exit_code=code, error=self.error, elapsed_s=now - self.started,
                    losses=losses, valid_losses=valid, early_stop=self.early_stop, best=self.best,
                    samples=self.samples(), saved=list(self.saved), log="\n".join(self.lines),
                    output_dir=str(self.output_dir), env_file=str(self.env_file), command=self.command)
        if self.progress:
            t_last, g = self.progress[-1]
            st.epoch, st.step, st.total = int(g[0]), int(g[3]), int(g[4])
            st.loss, st.tokens_per_s = float(g[5]), float(g[7].replace(",", ""))
            if st.losses and st.losses[-1][0] > st.step:      # loss.csv can be ahead of the last log line
                st.step, st.loss = st.losses[-1]
            t0, g0 = self.progress[0]
            done = st.step - int(g0[3])
            if running and done > 0:
                per_step = (t_last - t0) / max(1, int(g[3]) - int(g0[3])) if len(self.progress) > 1 else \
                    (t_last - self.started) / max(1, int(g[3]))
                st.eta_s = max(0.0, per_step * (st.total - st.step))
        return st

    def interrupt(self) -> None:
        """Ctrl+C for the trainer's process group, once: a second SIGINT could cut into the save it starts."""
        if self.stop_requested:
            return
        self.stop_requested = True
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass


class JobManager:
    """Holds at most one training job; safe to call from several page sessions at once."""

    def __init__(self, root: Path | str = "."):
        self.root = Path(root)
        self.job: Job | None = None
        self.last_output: str | None = None      # OUTPUT of the last job started, as the form gave it
        self._lock = threading.Lock()

    def start(self, env_file: Path | str, output_dir: Path | str, resume: bool = False,
              extra_args: list[str] | None = None) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise UserError(f"a training job is already running (output {self.job.output_dir}).",
                                "wait for it to finish, or press Stop first: one job runs at a time")
            env = dict(os.environ)
            env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env["PYTHONUNBUFFERED"] = "1"
            cmd = [sys.executable, "-m", "tools.train", "--config", str(env_file), "--no-progress",
                   *(extra_args or [])]
            out = Path(output_dir)
            try:
                self.job = Job(cmd, self.root, env, out if out.is_absolute() else self.root / out, Path(env_file),
                               resume)
            except OSError as err:          # OUTPUT cannot be made or written, or python cannot be run
                raise UserError(f"cannot start the trainer: {err.filename or ''}: {err.strerror or err}.",
                                "check OUTPUT: a folder you can write to") from None
            self.last_output = str(output_dir)
            return self.job

    def status(self) -> Status:
        job = self.job
        return job.status() if job is not None else Status()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def interrupt(self) -> bool:
        """Send the running trainer its Ctrl+C (once) without waiting; False when no job runs."""
        job = self.job
        if job is None or not job.running:
            return False
        job.interrupt()
        return True

    def stop(self, wait_s: float = 120.0) -> Status:
        """Ctrl+C for the trainer: SIGINT (once), then wait (up to ``wait_s``) while it saves rwkv-interrupted.pth."""
        job = self.job
        if job is None or not job.running:
            raise UserError("no training job is running.", "start one with Start")
        job.interrupt()
        deadline = time.time() + wait_s
        while job.running and time.time() < deadline:
            time.sleep(0.2)
        return job.status()

    def kill(self, wait_s: float = 10.0) -> None:
        """End the trainer without saving (server shutdown after a stop that did not finish): SIGTERM to its
        process group, SIGKILL after ``wait_s``."""
        job = self.job
        if job is None or job.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(job.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                job.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                pass
