"""What the Train tab shows of the training job (a ``webui.jobs.Status``): the status text and the loss chart.

    progress_markdown(st)     # "**Training** ... epoch 0 · optimizer step 40/200 ..., validation loss ..."
    loss_frame(st)            # step, loss, series ("training" | "validation"): the chart's two lines
"""
from __future__ import annotations

import pandas as pd

from .jobs import Status

MAX_POINTS = 2000          # points of the training line on the loss chart
# the chart's lines, in fixed colors: the validation line, when it comes, does not recolor the training line
SERIES_COLORS = {"training": "#3b82f6", "validation": "#f97316"}
HEADS = {"starting": "Starting (loading the model and the data)", "running": "Training",
         "stopping": "Stopping: saving a checkpoint, as Ctrl+C does", "finished": "Finished",
         "stopped": "Stopped", "failed": "Failed"}


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _head(st: Status) -> str:
    if st.state == "stopped_early":
        best = f"`{st.best}`" if st.best else "none saved"
        return f"Stopped early: no better validation loss for {st.early_stop} validations; best: {best}"
    return HEADS[st.state]


def validation_line(st: Status) -> str:
    """The last validation loss and the best so far ("" before the first validation)."""
    if not st.valid_losses:
        return ""
    step, loss = st.valid_losses[-1]
    best_step, best = min(st.valid_losses, key=lambda r: (r[1], r[0]))
    return (f"validation loss **{loss:.4f}** (optimizer step {step}) · best so far **{best:.4f}** "
            f"(optimizer step {best_step}) · {len(st.valid_losses)} validations")


def progress_markdown(st: Status) -> str:
    if st.state == "idle":
        return "No training job yet. Fill in the form and press **Start training**."
    pct = f" ({100 * st.step / st.total:.0f}%)" if st.total else ""
    lines = [f"**{_head(st)}**", ""]
    if st.total or st.step:
        lines.append(f"epoch {st.epoch} · optimizer step **{st.step}/{st.total}**{pct} · loss "
                     f"**{st.loss:.4f}** · {st.tokens_per_s or 0:,.0f} tokens/s · time left "
                     f"{_fmt_time(st.eta_s) if st.running else '0:00'} · elapsed {_fmt_time(st.elapsed_s)}"
                     if st.loss is not None else f"elapsed {_fmt_time(st.elapsed_s)}")
    else:
        lines.append(f"elapsed {_fmt_time(st.elapsed_s)}")
    if st.valid_losses:
        lines.append("\n" + validation_line(st))
    lines.append(f"\nloss chart: {len(st.losses)} points · output `{st.output_dir}` · config `{st.env_file}`")
    if st.saved:
        lines.append("\nsaved: " + ", ".join(f"`{p}`" for p in st.saved))
    if st.error:
        lines.append(f"\n**error: {st.error}**")
    elif st.state == "failed":
        lines.append(f"\n**the trainer ended with exit code {st.exit_code}: see its output below**")
    if not st.running and st.state != "idle":
        lines.append(f"\nRepeat this run from the shell: `./training.sh --config {st.env_file}`")
    return "\n".join(lines)


def loss_frame(st: Status) -> pd.DataFrame:
    """The chart's data in long form: one row per point, its line in ``series`` ("training" or "validation").
    The chart fixes its axis types and its lines (their colors) when it first gets data, and later only swaps the
    data: so the columns are typed even when empty (object columns would be nominal), and every frame starts with
    one row of each line without a loss (at the first step: nothing is drawn for it). A long run's training line
    is thinned to about MAX_POINTS (every k-th step, the newest always kept): the page polls each second. The
    validation line (one point per validation) is kept whole."""
    rows = st.losses
    if len(rows) > MAX_POINTS:
        k = -(-len(rows) // MAX_POINTS)
        rows = rows[::k] + ([rows[-1]] if (len(rows) - 1) % k else [])
    first = min([s for s, _ in rows[:1] + st.valid_losses[:1]], default=0)
    points = [(first, float("nan"), "training"), (first, float("nan"), "validation")] + \
        [(s, v, "training") for s, v in rows] + [(s, v, "validation") for s, v in st.valid_losses]
    return pd.DataFrame({"step": pd.Series([p[0] for p in points], dtype="int64"),
                         "loss": pd.Series([p[1] for p in points], dtype="float64"),
                         "series": pd.Series([p[2] for p in points], dtype="str")})
