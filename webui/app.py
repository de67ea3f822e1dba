"""The web page (Gradio): Data → Train → Merge → Chat, over the project folder the server runs in.

    app = make_app(allow_remote=False, jobs=jobs, max_upload_mb=1024)   # the page at /, merged files at /download/
    serve(app, "127.0.0.1", 7860, jobs)     # until Ctrl+C or SIGTERM; a training job it started saves first

The page holds no state of its own: the training job lives in ``webui.jobs.JobManager`` (one per server),
so a reload or a second tab sees the running job; every button calls a function of ``webui.actions``.
Requests from other machines are refused unless ``allow_remote`` (tools/webui.py --host warns about it), and
requests made by a page of another site always (webui.guard). Only files the browser uploaded are accepted.
"""
from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home: the page works offline
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402  (a gradio dependency)

from trainer.config import COMPILES, DATALOADS, GRAD_CPS, LORA_SCALINGS, LOSS_MASKS, MODES, OPTIMIZERS, PARTS, \
    PRECISIONS, QUANTS, SCHEDULES, STRATEGIES, TRAIN_TYPES  # noqa: E402
from trainer.data.sources import ENDINGS  # noqa: E402
from trainer.errors import UserError  # noqa: E402

from . import actions  # noqa: E402
from .guard import LocalOnly  # noqa: E402
from trainer.envfile import Field, read_env_file, training_fields, write_env_file  # noqa: E402
from .jobs import JobManager, Status  # noqa: E402
from .progress import SERIES_COLORS, loss_frame, progress_markdown  # noqa: E402

CHOICES: dict[str, tuple[str, ...]] = {
    "FINETUNE_MODE": MODES, "DATALOAD": DATALOADS, "LOSS_MASK": LOSS_MASKS, "LR_SCHEDULE": SCHEDULES,
    "TRAIN_TYPE": TRAIN_TYPES, "PRECISION": PRECISIONS, "QUANT": QUANTS, "STRATEGY": STRATEGIES,
    "OPTIMIZER": OPTIMIZERS, "LORA_SCALING": LORA_SCALINGS,
    "ACCELERATOR": ("auto", "cuda", "cpu"), "OP": ("auto", "triton", "fla", "rwkvfla", "chunk", "torch"),
    "GRAD_CP": GRAD_CPS, "COMPILE": COMPILES, "RESUME": ("0", "1"), "L2WRAP": ("0", "1"),
}
OPEN_SECTIONS = ("paths", "method", "data", "schedule")
NO_VALID_DATA = "(none)"   # VALID_DATA's empty value in its list
MAX_UPLOAD_MB = 1024.0     # the largest upload (webui.sh --max-upload-mb)
STOP_WAIT_S = 300.0        # on shutdown, how long the server waits for the training job's Ctrl+C save
CSS = """
.field-error { color: #b91c1c; font-weight: 600; margin-top: -6px; }
.field-error p { color: #b91c1c; }
#memory textarea, #tokenize-log textarea, #train-log textarea, #merge-result textarea { font-family: monospace; }
"""


def _message(err: Exception) -> str:
    if isinstance(err, UserError):
        return f"error: {err}"
    if isinstance(err, OSError) and err.filename is not None:
        # a file or folder of the user's that is missing, a folder where a file belongs (or the reverse), not
        # allowed, or a full disk: one line that names it, as for any other user error
        where = str(err.filename) + (f" → {err.filename2}" if err.filename2 is not None else "")
        return (f"error: {where}: {err.strerror or type(err).__name__}. Fix: check that path (a file where a folder "
                "belongs or the reverse, its permissions, the free space)")
    traceback.print_exc()      # a bug of ours: the server's terminal gets the traceback, the page one line
    return f"unexpected error (please report it): {type(err).__name__}: {err}"


def _safe(fn: Callable) -> Callable:
    """A handler that never shows a traceback: the page gets the error's one line in its first output."""
    def wrapper(*args: Any):
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            n = getattr(wrapper, "n_outputs", 1)
            msg = _message(err)
            return msg if n == 1 else (msg, *[gr.update() for _ in range(n - 1)])
    wrapper.__name__ = fn.__name__
    return wrapper


def upload_folder() -> str:
    """Where Gradio stores what a browser uploads (GRADIO_TEMP_DIR, or gradio/ in the system's temp folder)."""
    from gradio.utils import get_upload_folder
    return get_upload_folder()


class _Blocks(gr.Blocks):
    """gr.Blocks whose refusals of a request's values, before any handler runs, are one line for the caller and
    none in the server's log (Gradio prints them with a traceback): a file that was not uploaded (a request
    naming a path of this machine), a value that is not among a list's choices, a value of the wrong kind."""

    async def preprocess_data(self, *args, **kwargs):
        from gradio.exceptions import ComponentProcessingError, Error, InvalidPathError
        try:
            return await super().preprocess_data(*args, **kwargs)
        except InvalidPathError as err:
            name = re.search(r"Cannot move (.+?) to the gradio cache", str(err))
            shown = Path(name.group(1)).name if name else "a file"
            message = f"refused: {shown!r} was not uploaded through this page; only uploaded files are accepted."
        except Error as err:
            message = f"refused: {err.message}"
        except (ComponentProcessingError, ValueError, TypeError) as err:
            original = (str(err).rsplit("Original error: ", 1)[-1].strip().splitlines() or [type(err).__name__])[0]
            message = f"refused: a value the page cannot use ({original})"
        raise gr.Error(" ".join(message.split())[:400], print_exception=False) from None


def build(jobs: JobManager, chat: actions.ChatModels, max_upload_mb: float = 1024) -> gr.Blocks:
    fields: list[Field] = training_fields()
    names = [f.name for f in fields]
    sections = list(dict.fromkeys(f.section for f in fields))

    with _Blocks(title="rwkv-peft-simple") as demo:
        gr.Markdown("# rwkv-peft-simple\nTokenize your data, train, merge, chat: the same steps as "
                    "`make_tokenize.sh` → `training.sh` → `merge.sh`, with the same checks.")
        with gr.Tabs():
            # ---------------------------------------------------------------------------- data
            with gr.Tab("1 · Data", id="data"):
                with gr.Row():
                    data_file = gr.Dropdown(actions.list_sources(), label="your data in data/: a file (.jsonl, .json, "
                                        ".csv, .parquet, .arrow, .txt, .md) or a folder", elem_id="data-file",
                                        value=None, scale=3)       # nothing chosen until the user picks or uploads
                    with gr.Column(scale=1, min_width=220):
                        upload = gr.UploadButton(f"Upload a data file into data/ (up to {max_upload_mb:g} MB)",
                                                 file_types=list(ENDINGS), elem_id="data-upload")
                        gr.Markdown(f"Folders and larger files: copy them into `data/` yourself, or start the page "
                                    f"with `./webui.sh --max-upload-mb N` (now {max_upload_mb:g}).",
                                    elem_id="data-upload-note")
                with gr.Row():
                    repeat = gr.Textbox("1", label="REPEAT", info="write the data this many times, each copy "
                                        "shuffled", elem_id="data-repeat")
                    max_tokens = gr.Textbox("", label="MAX_TOKENS", info="drop items longer than this many "
                                            "tokens; empty = keep all", elem_id="data-max-tokens")
                    column = gr.Textbox("", label="COLUMN", info="the field holding the text, if not text, "
                                        "messages, conversations or instruction+output", elem_id="data-column")
                    valid = gr.Textbox("", label="VALID_FRACTION", info="share of the items held out for "
                                       "validation, written to NAME.valid; empty: none", elem_id="data-valid")
                    no_eof = gr.Checkbox(False, label="--no-eof", info="do not end items with token 0 (keep it "
                                         "off unless you know why)")
                tok_btn = gr.Button("Tokenize (./make_tokenize.sh)", variant="primary", elem_id="tokenize")
                data_msg = gr.Markdown(elem_id="data-message")
                with gr.Row():
                    existing = gr.Dropdown(actions.list_data(), label="or look at tokenized data", elem_id="data-set",
                                           value=None, scale=3)
                    show_btn = gr.Button("Show statistics", elem_id="data-show", scale=1)
                stats = gr.Textbox(label="statistics", lines=4, elem_id="data-stats", interactive=False)
                with gr.Row():
                    hist = gr.BarPlot(None, x="tokens", y="items",
                                      title="item lengths (tokens)", elem_id="data-hist", y_lim=[0, None], scale=1)
                    batch = gr.Dataframe(headers=["items", "MICRO_BSZ × EPOCH_STEPS", ""], elem_id="batch-table",
                                         label="batch sizes: MICRO_BSZ × EPOCH_STEPS = items (→ your count)",
                                         interactive=False, wrap=True, column_widths=["15%", "70%", "15%"],
                                         max_height=420, scale=1)
                with gr.Row():
                    sample0 = gr.Textbox(label="item 1, decoded", lines=6, elem_id="sample-0", interactive=False)
                    sample1 = gr.Textbox(label="item 2, decoded", lines=6, elem_id="sample-1", interactive=False)
                with gr.Accordion("make_tokenize's full output", open=False):
                    tok_log = gr.Textbox(lines=12, show_label=False, elem_id="tokenize-log", interactive=False)

            # ---------------------------------------------------------------------------- train
            with gr.Tab("2 · Train", id="train"):
                gr.Markdown("The variables of `training.sh`, with its defaults and comments. **Check** validates "
                            "them (the same checks as `./training.sh`) and estimates the memory; **Start** saves "
                            "them to `output/NAME.env` and runs `./training.sh --config output/NAME.env`.")
                with gr.Row():
                    cfg_name = gr.Textbox("webui", label="config name", info="saved as output/NAME.env",
                                          elem_id="config-name", scale=2)
                    load_dd = gr.Dropdown(actions.list_configs(), label="load a saved config", value=None,
                                          elem_id="config-load", scale=2)
                    load_btn = gr.Button("Load", scale=1, elem_id="config-load-btn")
                comps: dict[str, gr.components.Component] = {}
                errs: dict[str, gr.Markdown] = {}
                accs: dict[str, gr.Accordion] = {}
                for sec in sections:
                    with gr.Accordion(sec, open=sec in OPEN_SECTIONS) as acc:
                        accs[sec] = acc
                        sec_fields = [f for f in fields if f.section == sec]
                        for i in range(0, len(sec_fields), 4):
                            with gr.Row():
                                for f in sec_fields[i:i + 4]:
                                    with gr.Column(min_width=220):
                                        comps[f.name] = _field_component(f)
                                        errs[f.name] = gr.Markdown("", visible=False, elem_id=f"err-{f.name}",
                                                                   elem_classes=["field-error"])
                with gr.Row():
                    check_btn = gr.Button("Check (dry run of the config)", elem_id="check")
                    save_btn = gr.Button("Save config", elem_id="save-config")
                    start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                    stop_btn = gr.Button("Stop (saves, as Ctrl+C)", variant="stop", elem_id="stop")
                form_msg = gr.Markdown(elem_id="train-message")
                with gr.Accordion("memory estimate", open=False):
                    mem = gr.Textbox(show_label=False, lines=12, elem_id="memory", interactive=False)
                progress = gr.Markdown(progress_markdown(Status()), elem_id="train-progress")
                loss_plot = gr.LinePlot(None, x="step", y="loss", color="series", color_map=SERIES_COLORS,
                                        title="loss per optimizer step", elem_id="loss-plot", height=300)
                samples = gr.Textbox(label="samples generated at each save (samples.txt)", lines=6,
                                     elem_id="train-samples", interactive=False)
                with gr.Accordion("trainer output", open=False):
                    log = gr.Textbox(show_label=False, lines=14, elem_id="train-log", interactive=False,
                                     autoscroll=True)
                timer = gr.Timer(1.0)

            # ---------------------------------------------------------------------------- merge
            with gr.Tab("3 · Merge", id="merge"):
                gr.Markdown("Merge a checkpoint of `OUTPUT` into its base model (`./merge.sh EPOCH`): the method, "
                            "its settings and the base model are read from the checkpoint.")
                with gr.Row():
                    m_out = gr.Textbox("output", label="OUTPUT (the folder training wrote to)", elem_id="merge-output")
                    m_epoch = gr.Dropdown(actions.list_epochs("output"), label="checkpoint (epoch)",
                                          elem_id="merge-epoch", value=None)
                    m_dtype = gr.Dropdown(["bf16", "fp16", "fp32"], value="bf16", label="DTYPE", elem_id="merge-dtype")
                    m_state = gr.Checkbox(False, label="STATE_MODEL", info="state tuning: also write the base "
                                          "model with the state inside")
                m_peft = _merge_peft_fields()
                with gr.Row():
                    m_refresh = gr.Button("Refresh list", elem_id="merge-refresh")
                    m_btn = gr.Button("Merge", variant="primary", elem_id="merge")
                m_link = gr.Markdown(elem_id="merge-download")
                m_text = gr.Textbox(label="result", lines=14, elem_id="merge-result", interactive=False)

            # ---------------------------------------------------------------------------- chat
            with gr.Tab("4 · Chat", id="chat"):
                gr.Markdown("Talk to up to three models side by side: a base model, one with a checkpoint of "
                            "training (any method) or a state file on top, or a merged model.")
                cols = []
                with gr.Row():
                    for i in range(3):
                        with gr.Column():
                            mdl = gr.Dropdown(label=f"model {i + 1}", elem_id=f"chat-model-{i}",
                                              choices=[actions.NONE], value=actions.NONE)
                            add = gr.Dropdown(label="with", elem_id=f"chat-addon-{i}",
                                              choices=[actions.NONE], value=actions.NONE)
                            bot = gr.Chatbot(label=f"model {i + 1}", elem_id=f"chat-{i}", height=320,
                                             buttons=["copy", "copy_all"], feedback_options=None)
                            cols.append((mdl, add, bot))
                with gr.Row():
                    c_msg = gr.Textbox(label="your message", elem_id="chat-input", scale=4)
                    c_send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                    c_clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
                with gr.Row():
                    c_tokens = gr.Slider(1, 500, value=80, step=1, label="max tokens", elem_id="chat-tokens")
                    c_temp = gr.Slider(0, 2, value=1.0, step=0.05, label="temperature", elem_id="chat-temperature")
                    c_top_p = gr.Slider(0.05, 1, value=0.5, step=0.05, label="top-p", elem_id="chat-top-p")
                c_status = gr.Markdown(elem_id="chat-status")
                c_refresh = gr.Button("Refresh the lists of models and checkpoints", elem_id="chat-refresh")

        # ================================================================================ handlers
        field_comps = [comps[n] for n in names]

        def values_of(vals) -> dict[str, str]:
            out = {}
            for n, v in zip(names, vals):
                if isinstance(v, (list, tuple)):
                    v = " ".join(v)
                out[n] = "" if v is None else str(v)
            return out

        def validation(err: Exception | None, ok: str = "") -> list:
            """Updates for form_msg, every field's error line and the accordions (open the one with the error)."""
            field = actions.error_field(err, names) if isinstance(err, UserError) else None
            out: list = [_message(err) if err else ok]
            for n in names:
                out.append(gr.update(value=f"⚠ {err}", visible=True) if n == field else gr.update(value="", visible=False))
            sec_of = {f.name: f.section for f in fields}
            for sec in sections:
                out.append(gr.update(open=True) if field and sec_of[field] == sec else gr.update())
            return out

        val_outputs = [form_msg] + [errs[n] for n in names] + [accs[s] for s in sections]

        def on_check(*vals):
            try:
                cfg = actions.check_config(values_of(vals))
                est = actions.memory_estimate(cfg)
            except Exception as err:  # noqa: BLE001
                return validation(err) + [gr.update()]
            return validation(None, "✔ the config is valid and the model and data fit it.") + [est]

        def on_save(name, *vals):
            try:
                values = values_of(vals)
                actions.check_config(values, files=False)
                path = write_env_file(actions.config_path(name, for_writing=True), values, note="saved by the web page")
            except Exception as err:  # noqa: BLE001
                return validation(err) + [gr.update()]
            return validation(None, f"✔ saved `{path}`. Run it from the shell: `./training.sh --config {path}`") + \
                [gr.update(choices=actions.list_configs())]

        def on_start(name, *vals):
            try:
                values = values_of(vals)
                cfg = actions.check_config(values)
                if jobs.running:
                    raise UserError("a training job is already running.", "press Stop first: one job at a time")
                path = write_env_file(actions.config_path(name, for_writing=True), values,
                                      note="started from the web page")
                jobs.start(path, cfg.OUTPUT, resume=bool(cfg.RESUME))
            except Exception as err:  # noqa: BLE001
                return validation(err)
            return validation(None, f"Started: `./training.sh --config {path}` (saved `{path}`)")

        def on_load(name):
            if not name:
                return [gr.update() for _ in names] + ["pick a saved config first"]
            try:
                values = read_env_file(actions.config_path(name))
            except Exception as err:  # noqa: BLE001
                return [gr.update() for _ in names] + [_message(err)]
            ups = []
            for n in names:
                if n not in values:
                    ups.append(gr.update())
                elif n == "TRAIN_PARTS":
                    ups.append(gr.update(value=values[n].split()))
                else:
                    ups.append(gr.update(value=values[n]))
            return ups + [f"loaded `{actions.config_path(name)}`"]

        @_safe
        def on_stop():
            if not jobs.running:
                return "no training job is running."
            st = jobs.stop()
            if st.running:
                return "SIGINT sent; the trainer is still saving (see the progress below)."
            return f"Stopped (exit code {st.exit_code}); saved: {', '.join(st.saved) or 'nothing'}"

        def on_tick():
            st = jobs.status()
            return (progress_markdown(st), loss_frame(st), st.samples, st.log,
                    gr.update(interactive=not st.running), gr.update(interactive=st.running))

        tick_outputs = [progress, loss_plot, samples, log, start_btn, stop_btn]
        check_btn.click(on_check, field_comps, val_outputs + [mem])
        save_btn.click(on_save, [cfg_name] + field_comps, val_outputs + [load_dd])
        start_btn.click(on_start, [cfg_name] + field_comps, val_outputs).then(on_tick, None, tick_outputs)
        stop_btn.click(on_stop, None, form_msg).then(on_tick, None, tick_outputs)
        load_btn.click(on_load, load_dd, field_comps + [form_msg])
        timer.tick(on_tick, None, tick_outputs, show_progress="hidden")

        # ---- data
        def show_report(prefix, note: str = ""):
            rep = actions.data_report(prefix)
            hist_df = pd.DataFrame(rep.histogram, columns=["tokens", "items"])
            rows = [[c, cells, "← your data" if mine else ""] for c, cells, mine in rep.batch_rows]
            s = rep.samples + ["", ""]
            return (note, rep.summary, gr.update(value=hist_df, sort=list(hist_df["tokens"])), pd.DataFrame(rows, columns=["items", "MICRO_BSZ × EPOCH_STEPS", ""]),
                    s[0], s[1])

        report_outputs = [data_msg, stats, hist, batch, sample0, sample1]

        def on_tokenize(file, rep, mx, eof, col, val=""):
            try:
                text, prefix = actions.tokenize(file, rep, mx, eof, col, val)
                held = f" The held-out items: `{prefix}.valid`: set VALID_DATA=`{prefix.name}.valid` (done for " \
                    "you)." if (val or "").strip() else ""
                out = show_report(prefix, f"✔ wrote `{prefix}.bin` and `{prefix}.idx`: set DATA=`{prefix.name}` "
                                          f"on the Train page (done for you).{held}")
            except Exception as err:  # noqa: BLE001
                return [_message(err)] + [gr.update()] * (len(report_outputs) - 1) + [gr.update()] * 4
            data_sets = actions.list_data()
            return list(out) + [text, gr.update(choices=data_sets, value=prefix.name),
                                gr.update(choices=data_sets, value=prefix.name),
                                valid_data_update(data_sets, f"{prefix.name}.valid" if held else None)]

        def on_show(name):
            try:
                if not name:
                    raise UserError("no tokenized data chosen.", "pick one from the list, or tokenize your data first")
                return list(show_report(Path("data") / name, f"data/{name}.bin + .idx"))
            except Exception as err:  # noqa: BLE001
                return [_message(err)] + [gr.update()] * (len(report_outputs) - 1)

        def on_upload(file):
            try:
                if not file:
                    return "no file", gr.update()
                path = file if isinstance(file, str) else getattr(file, "name", str(file))
                if not uploaded_here(path):
                    raise UserError(f"{Path(str(path)).name!r} was not uploaded through the page: only uploaded "
                                    "files can be copied into data/.",
                                    "use the Upload button, or copy the file into data/ yourself")
                target = actions.save_upload(path, os.path.basename(path), upload_folder())
            except Exception as err:  # noqa: BLE001
                return _message(err), gr.update()
            kept = "" if target.name == actions.safe_upload_name(os.path.basename(path)) else \
                f" (a different `{actions.safe_upload_name(os.path.basename(path))}` was there already and is kept)"
            return (f"✔ uploaded into `{target}`{kept}", gr.update(choices=actions.list_sources(), value=target.name))

        tok_btn.click(on_tokenize, [data_file, repeat, max_tokens, no_eof, column, valid],
                      report_outputs + [tok_log, existing, comps["DATA"], comps["VALID_DATA"]])
        show_btn.click(on_show, existing, report_outputs)
        upload.upload(on_upload, upload, [data_msg, data_file])

        def uploaded_here(path: str) -> bool:
            """Whether this server received the file through its upload route (Gradio records each one)."""
            received = getattr(demo, "upload_file_set", None)
            if received is None:        # a Gradio without that record: save_upload's folder check alone
                return True
            mine = os.path.abspath(path)
            return any(os.path.abspath(str(f)) == mine for f in list(received))

        # ---- merge
        def epochs_update(out_dir):
            e = actions.list_epochs(out_dir or "output")
            return gr.update(choices=e, value=e[-1] if e else None)

        def on_merge(out_dir, epoch, dtype, state_model, base, lora_alpha, pissa_init):
            try:
                text, files = actions.merge(out_dir, epoch, dtype, state_model, base=base, lora_alpha=lora_alpha,
                                            pissa_init=pissa_init)
            except Exception as err:  # noqa: BLE001
                return _message(err), ""
            links = [f"[download {p.name}](/download/{p.as_posix()}) ({p.stat().st_size / 2**20:.1f} MiB) · "
                     f"on disk: `{p.resolve()}`" for p in files]
            return text, "\n\n".join(links)

        m_refresh.click(epochs_update, m_out, m_epoch)
        m_out.change(epochs_update, m_out, m_epoch)
        m_btn.click(on_merge, [m_out, m_epoch, m_dtype, m_state, *m_peft], [m_text, m_link])

        # ---- chat
        def chat_lists(out_dirs):
            models = actions.model_choices()
            addons = actions.addon_choices([d for d in out_dirs if d] + ["output"])
            return models, addons

        def on_chat_refresh(out_dirs, *current):
            models, addons = chat_lists(out_dirs)
            ups = []
            newest = [a for a in addons if a != actions.NONE and not actions._is_state_file(Path(a))]
            merged = [m for m in models if m.startswith("merge")]
            defaults = [(models[0] if models else actions.NONE, actions.NONE),
                        (models[0] if models else actions.NONE, newest[-1] if newest else actions.NONE),
                        (merged[-1] if merged else actions.NONE, actions.NONE)]
            for i in range(3):
                cm, ca = current[2 * i], current[2 * i + 1]
                m = cm if cm in models else defaults[i][0]
                a = ca if ca in addons and ca != actions.NONE else defaults[i][1]
                ups += [gr.update(choices=[actions.NONE] + models, value=m), gr.update(choices=addons, value=a)]
            return ups

        def on_send(msg, n_tok, temp, top_p, *cols_state):
            if not msg or not str(msg).strip():
                return [gr.update()] * 3 + [gr.update(), "type a message first"]
            try:
                n_tok, temp, top_p = actions.sampling_settings(n_tok, temp, top_p)
            except UserError as err:
                return [gr.update()] * 3 + [gr.update(), _message(err)]
            msg = str(msg)
            outs, notes = [], []
            for i in range(3):
                model, addon, hist = cols_state[3 * i], cols_state[3 * i + 1], cols_state[3 * i + 2] or []
                hist = [m for m in hist if isinstance(m, dict)] if isinstance(hist, list) else []
                if not model or model == actions.NONE:
                    outs.append(hist)
                    continue
                pairs = _pairs(hist)
                t0 = time.time()
                try:
                    m = chat.get(model, addon)
                    answer = actions.reply(m, pairs, msg, max_tokens=n_tok, temperature=temp, top_p=top_p)
                    notes.append(f"model {i + 1}: {time.time() - t0:.1f} s")
                except Exception as err:  # noqa: BLE001
                    answer = "⚠ " + _message(err)
                hist = hist + [{"role": "user", "content": msg}, {"role": "assistant", "content": answer}]
                outs.append(hist)
            return outs + ["", " · ".join(notes)]

        chat_inputs = [c_msg, c_tokens, c_temp, c_top_p]
        for mdl, add, bot in cols:
            chat_inputs += [mdl, add, bot]
        c_send.click(on_send, chat_inputs, [c[2] for c in cols] + [c_msg, c_status])
        c_msg.submit(on_send, chat_inputs, [c[2] for c in cols] + [c_msg, c_status])
        c_clear.click(lambda: [[], [], []], None, [c[2] for c in cols])
        chat_sel = [x for mdl, add, _ in cols for x in (mdl, add)]

        # ---- on page load (also a reload or a second tab): fresh lists, and the running job if there is one
        # The Merge tab starts at the OUTPUT the user trained (the last job this server started, or the newest
        # saved config with checkpoints) and then follows the Train form's OUTPUT (typed or loaded from a config).
        def on_load_page(form_out, *current):
            merge_out = actions.trained_output(jobs.last_output)
            ups = on_chat_refresh([merge_out, form_out], *current)
            data_sets = actions.list_data()
            return [gr.update(choices=actions.list_sources()), gr.update(choices=data_sets),
                    gr.update(choices=[Path(p).name for p in actions.model_choices()]),
                    gr.update(choices=data_sets), gr.update(choices=actions.list_configs()),
                    gr.update(value=merge_out), epochs_update(merge_out)] + ups + \
                [valid_data_update(data_sets)]

        demo.load(on_load_page, [comps["OUTPUT"]] + chat_sel,
                  [data_file, existing, comps["MODEL"], comps["DATA"], load_dd, m_out, m_epoch] + chat_sel +
                  [comps["VALID_DATA"]])
        demo.load(on_tick, None, tick_outputs)
        comps["OUTPUT"].change(lambda v: v, comps["OUTPUT"], m_out)

        def tab_refresh(merge_out, form_out, *current):
            return [epochs_update(merge_out)] + on_chat_refresh([merge_out, form_out], *current)
        c_refresh.click(tab_refresh, [m_out, comps["OUTPUT"]] + chat_sel, [m_epoch] + chat_sel)
    return demo


def _merge_peft_fields() -> list:
    """The Merge tab's fields for what RWKV-PEFT's adapter files do not record (merge.sh's BASE, LORA_ALPHA,
    PISSA_INIT); empty: not given, as for this toolkit's own checkpoints, which record all three."""
    with gr.Accordion("RWKV-PEFT files (its rwkv-N.pth: OUTPUT = its run's folder)", open=False):
        with gr.Row():
            return [gr.Textbox("", label="BASE (the model it trained: a file in model/ or a path)",
                               elem_id="merge-base"),
                    gr.Textbox("", label="LORA_ALPHA (RWKV-PEFT LoRA files only)", elem_id="merge-lora-alpha"),
                    gr.Textbox("", label="PISSA_INIT (RWKV-PEFT PiSSA files only: its init_pissa.pth)",
                               elem_id="merge-pissa-init")]


def _pairs(history: list) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a Chatbot history, leaving out error notes."""
    pairs, user = [], None
    for m in history:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):       # gradio 6 may give [{"type": "text", "text": ...}]
            content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
        if role == "user":
            user = str(content)
        elif role == "assistant" and user is not None:
            if not str(content).startswith("⚠"):
                pairs.append((user, str(content)))
            user = None
    return pairs


def valid_choices(data_sets: list[str]) -> list[tuple[str, str]]:
    """VALID_DATA's choices: none (the empty value: no validation set, or VALID_FRACTION's), then data/'s sets."""
    return [(NO_VALID_DATA, "")] + [(d, d) for d in data_sets]


def valid_data_update(data_sets: list[str], value: str | None = None):
    """VALID_DATA's list after data/ changed; ``value``: the held-out set the Data tab just wrote, chosen."""
    return gr.update(choices=valid_choices(data_sets)) if value is None else \
        gr.update(choices=valid_choices(data_sets), value=value)


def _field_component(f: Field):
    common = dict(label=f.name, info=f.help, elem_id=f"field-{f.name}")
    if f.name in CHOICES:
        choices = list(CHOICES[f.name])
        return gr.Dropdown(choices, value=f.default if f.default in choices else choices[0], **common)
    if f.name == "TRAIN_PARTS":
        return gr.CheckboxGroup(list(PARTS), value=f.default.split(), **common)
    if f.name == "MODEL":
        return gr.Dropdown([Path(p).name for p in actions.model_choices()], value=f.default,
                           allow_custom_value=True, **common)
    if f.name == "DATA":      # empty until the user tokenizes, picks or loads data: never training.sh's example
        return gr.Dropdown(actions.list_data(), value=None, allow_custom_value=True, **common)
    if f.name == "VALID_DATA":
        return gr.Dropdown(valid_choices(actions.list_data()), value=f.default, allow_custom_value=True, **common)
    return gr.Textbox(f.default, lines=2 if f.name == "SAMPLE_PROMPT" else 1, **common)


# ---------------------------------------------------------------------------------------- the server
def make_app(allow_remote: bool = False, jobs: JobManager | None = None, max_upload_mb: float = MAX_UPLOAD_MB):
    """The whole server: the page at /, merged files at /download/merge/..., guarded by LocalOnly. Gradio refuses
    an upload larger than ``max_upload_mb`` (the page says so before sending it; a direct request gets 413)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    jobs = jobs or JobManager(Path.cwd())
    chat = actions.ChatModels()
    api = FastAPI()

    @api.get("/download/{path:path}")
    def download(path: str):
        root = actions.MERGE_DIR.resolve()
        try:
            p = (Path.cwd() / path).resolve()
            ok = root in p.parents and p.is_file()
        except (OSError, ValueError):       # a name no file can have (a NUL byte, too long)
            ok = False
        if not ok:
            raise HTTPException(404, "only files in merge/ can be downloaded")
        return FileResponse(p, filename=p.name)

    if not 0 < max_upload_mb < float("inf"):
        raise UserError(f"--max-upload-mb {max_upload_mb} is not a size.", "give the largest upload in MB, e.g. 1024")
    demo = build(jobs, chat, max_upload_mb)
    app = gr.mount_gradio_app(api, demo, path="", footer_links=[], ssr_mode=False, css=CSS, show_error=True,
                              max_file_size=max(1, int(max_upload_mb * 2**20)))
    # Gradio checks that a file named in a request was uploaded (is in its upload folder) before it copies it
    # into its cache, but only once it counts as launched, which launch() says and mount_gradio_app does not:
    # without this a request naming /etc/x.jsonl had the file copied into the cache (and on to data/).
    demo.has_launched = True
    app.state.jobs = jobs
    return LocalOnly(app, allow_remote)


def serve(app, host: str, port: int, jobs: JobManager, stop_wait_s: float = STOP_WAIT_S) -> None:
    """Run the server until Ctrl+C (SIGINT) or SIGTERM. Either one first sends the training job started here its
    Ctrl+C (SIGINT: it saves rwkv-interrupted.pth), closes the server, waits up to ``stop_wait_s`` for the
    trainer to finish saving, and only then returns; a trainer still running after that is ended.

    (uvicorn catches both signals, shuts down, then raises the caught signal again under the handlers that were
    there before it started: SIGTERM's default one would end this process before the job is stopped.)"""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            jobs.interrupt()            # the trainer starts its save now, while the server closes
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
    waiting = [False]

    def noted(sig, frame):             # before uvicorn runs, after it stopped, and while the job saves
        jobs.interrupt()
        server.should_exit = True
        if waiting[0]:
            try:
                os.write(2, b"still waiting for the training job to save its checkpoint (kill -9 ends this server "
                            b"without waiting, and may cut the save short) ...\n")
            except OSError:
                pass

    previous = {s: signal.signal(s, noted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        waiting[0] = True
        try:
            _stop_job(jobs, stop_wait_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _stop_job(jobs: JobManager, wait_s: float) -> None:
    if not jobs.running:
        return
    print(f"stopping the training job: it saves a checkpoint first, as Ctrl+C does (waiting up to {wait_s:.0f} s) "
          "...", file=sys.stderr, flush=True)
    try:
        st = jobs.stop(wait_s=wait_s)
    except UserError:                   # it ended meanwhile
        return
    if st.running:
        print(f"the training job did not finish saving in {wait_s:.0f} s: ended without its save",
              file=sys.stderr, flush=True)
        jobs.kill()
    else:
        print(f"the training job stopped (exit code {st.exit_code}); saved: {', '.join(st.saved) or 'nothing'}",
              file=sys.stderr, flush=True)
