"""What the web page's buttons do, without the page: plain functions over the project's own code.

Every function works in the project folder (the current directory, as the shell scripts do) and raises
``UserError`` for anything the user can fix; the page shows its message. Nothing here re-implements a rule:
tokenizing is trainer.data.prepare's ``tokenize_data`` (what make_tokenize.sh runs), the statistics are
trainer.data.stats, the config is TrainConfig with its validation, the memory estimate is trainer.memory,
merging is trainer.checkpoint's ``merge_epoch`` and ``merge_usage_text``, and chat is trainer.inference's
``generate``. Nothing here imports tools/.
"""
from __future__ import annotations

import math
import contextlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError, check_name_lengths

DATA_DIR = Path("data")
MODEL_DIR = Path("model")
MERGE_DIR = Path("merge")


# ------------------------------------------------------------------------------------------ data
def list_sources(data_dir: Path = DATA_DIR) -> list[tuple[str, str]]:
    """What the Data tab offers to tokenize: (label, name) of every data file and folder in data/ (a folder's label
    ends in "/"), files first."""
    from trainer.data.sources import ENDINGS
    if not data_dir.is_dir():
        return []
    entries = sorted(p for p in data_dir.iterdir() if not p.name.startswith("."))
    return [(p.name, p.name) for p in entries if p.is_file() and p.suffix.lower() in ENDINGS] + \
        [(p.name + "/", p.name) for p in entries if p.is_dir()]


def list_data(data_dir: Path = DATA_DIR) -> list[str]:
    """Tokenized data sets: the NAME of every data/NAME.bin + data/NAME.idx."""
    if not data_dir.is_dir():
        return []
    return sorted(p.stem for p in data_dir.glob("*.idx") if p.with_suffix(".bin").is_file())


def safe_upload_name(name: str) -> str:
    """The file name an upload is stored under in data/: its last path part, plain characters, a data ending."""
    from trainer.data.sources import ENDINGS, ENDINGS_TEXT
    base = re.split(r"[\\/]", str(name))[-1].strip()
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    stem, dot, ending = base.rpartition(".")
    if not dot or "." + ending.lower() not in ENDINGS or not stem or base.startswith(".") or ".." in base:
        raise UserError(f"{name!r} is not the name of a data file.",
                        f"upload a {ENDINGS_TEXT} file, named like mydata.jsonl")
    check_name_lengths("the file", base, "rename the file to a shorter name and upload it again")
    return base


def data_entry(name: str, data_dir: Path = DATA_DIR) -> Path:
    """The data file or folder of data/ that the Data tab's list names (its last path part: never outside data/)."""
    from trainer.data.sources import ENDINGS, ENDINGS_TEXT
    base = re.split(r"[\\/]", str(name).strip().rstrip("/\\"))[-1]
    check_name_lengths("the file", base, "rename the file to a shorter name")
    path = data_dir / base
    if not base or base.startswith(".") or not (path.is_dir() or path.suffix.lower() in ENDINGS):
        raise UserError(f"{name!r} is not a data file or folder in {data_dir}/.",
                        f"pick one from the list: a {ENDINGS_TEXT} file, or a folder of them")
    return path


def save_upload(src: str | Path, name: str, upload_dir: str | Path, data_dir: Path = DATA_DIR) -> Path:
    """Copy a file the browser uploaded into data/ under a safe name (never outside data/). Returns the new path.

    ``src`` must lie inside ``upload_dir``, the folder the web server stores uploads in (Gradio's upload cache):
    a request that names any other file of this machine (a direct API call with /etc/x.jsonl or ~/secret.jsonl)
    is refused, so only what a browser actually sent can enter data/.
    """
    target = data_dir / safe_upload_name(name)
    cache = Path(upload_dir).resolve()
    try:
        path = Path(src).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        path = None
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            if cache in Path(src).resolve().parents:      # uploaded, and gone since (the cache is cleaned)
                raise UserError(f"the uploaded file {name!r} is not there any more.", "upload it again")
    if path is None or cache not in path.parents:
        raise UserError(f"{Path(str(src)).name!r} was not uploaded through the page: only uploaded files can be "
                        "copied into data/.", "use the Upload button, or copy the file into data/ yourself")
    if not path.is_file():
        raise UserError(f"{path.name!r} is not a file.", "upload a data file (a folder: copy it into data/ yourself)")
    from trainer.files import copy_file, make_folder
    make_folder(data_dir, "data/")
    if target.resolve().parent != data_dir.resolve():        # belt and braces: the name has no folder
        raise UserError(f"{name!r} would be stored outside {data_dir}/.", "upload a plain file name")
    if target.is_dir():
        raise UserError(f"{target} is a folder.", f"rename the upload, or move the folder {target} away")
    n = 1
    while target.is_file() and not _same_bytes(target, path):   # a different file of that name: kept, and the
        n += 1                                                   # upload goes beside it as NAME-2.jsonl, ...
        stem, ending = safe_upload_name(name).rsplit(".", 1)
        target = data_dir / f"{stem}-{n}.{ending}"
    if not target.is_file():
        copy_file(path, target)            # atomic; a full disk is one line and leaves nothing behind
    return target


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def tokenize(file: str, repeat: str | int = 1, max_tokens: str | int | None = None, no_eof: bool = False,
             column: str | None = None, valid: str | float | None = None,
             data_dir: Path = DATA_DIR) -> tuple[str, Path]:
    """COLUMN=... VALID_FRACTION=... ./make_tokenize.sh FILE REPEAT [MAX_TOKENS]: returns (its printed report, the data
    prefix). With VALID_FRACTION the held-out items go to data/NAME.valid.bin + .idx."""
    from trainer.data.prepare import column_name, positive_int, tokenize_data
    from trainer.data.split import valid_fraction
    if not file:
        raise UserError("no data file chosen.", "pick one from data/ or upload one")
    src = data_entry(file, data_dir)          # a file or folder in data/, nothing else
    n_repeat = positive_int("REPEAT", str(repeat).strip() or "1", 1)
    n_max = None if max_tokens in (None, "", 0, "0") else positive_int("MAX_TOKENS", str(max_tokens).strip(), None)
    share = valid_fraction(valid, "VALID_FRACTION")
    lines: list[str] = []
    result = tokenize_data(src, repeat=n_repeat, max_tokens=n_max, eof=not no_eof, log=lines.append,
                           column=column_name(column), valid=share, valid_name="VALID_FRACTION")
    return "\n".join(lines) + "\n", result.prefix


@dataclass
class DataReport:
    items: int
    tokens: int
    summary: str                          # min / mean / p95 / max and the suggested CTX_LEN
    histogram: list[tuple[str, int]]      # (length range, items): make_tokenize's histogram
    batch_rows: list[tuple[int, str, bool]]   # (items, "MICRO_BSZ x EPOCH_STEPS ...", is your count)
    samples: list[str]                    # the first two items, decoded
    suggested_ctx_len: int
    report: str                           # make_tokenize's whole text report


def data_report(prefix: str | Path, n_samples: int = 2, max_bsz: int = 128) -> DataReport:
    """Statistics of a tokenized data set, from its .idx (what make_tokenize prints), and two decoded items."""
    import numpy as np

    from trainer.data.binidx import BinIdx
    from trainer.data.stats import batch_table, histogram_lines, report_lines, suggest_ctx_len, summary
    from trainer.data.tokenizer import get_tokenizer

    data = BinIdx(prefix)
    lengths = np.asarray(data.sizes, dtype=np.int64)
    if lengths.size == 0:
        raise UserError(f"{prefix} holds no items.", "tokenize a data file with at least one item")
    s = summary(lengths)
    ctx, why = suggest_ctx_len(lengths)
    hist = []
    for line in histogram_lines(lengths):
        m = re.match(r"\s*(\d+)\.\.(\d+)\s*\|.*?(\d+)\s*$", line)
        if m:
            hist.append((f"{m.group(1)}-{m.group(2)}", int(m.group(3))))
    rows = []
    for count, divs in batch_table(s.items):
        cells = "  ".join(f"{d}×{count // d}" for d in [d for d in divs if d <= max_bsz][:12])
        rows.append((count, cells, count == s.items))
    tok = get_tokenizer()
    samples = []
    for i in range(min(n_samples, len(data))):
        ids = [int(t) for t in data[i]]
        samples.append(tok.decode([t for t in ids if t != 0]) + (" ⟨end⟩" if ids and ids[-1] == 0 else ""))
    text = (f"items: {s.items}   tokens: {s.tokens}\n"
            f"item length (tokens): min {s.min}  mean {s.mean:.1f}  p95 {s.p95}  max {s.max}\n"
            f"max_length {s.max_length} (power of two: {s.max_length_power_of_two})\n"
            f"suggested CTX_LEN: {ctx} ({why})")
    return DataReport(s.items, s.tokens, text, hist, rows, samples, ctx, "\n".join(report_lines(lengths)))


# ------------------------------------------------------------------------------------------ train form
FIELD_NAME = re.compile(r"\b([A-Z][A-Z0-9_]{2,})\b")


def error_field(err: UserError, names: list[str]) -> str | None:
    """The variable a config error is about: the first known NAME in its message."""
    for m in FIELD_NAME.finditer(err.message):
        if m.group(1) in names:
            return m.group(1)
    return None


def check_config(values: dict[str, str], files: bool = True):
    """TrainConfig.from_env over the form's values, then (``files``) cfg.check_files(). Returns the config."""
    from trainer.config import TrainConfig
    try:
        cfg = TrainConfig.from_env(values)
    except UserError as err:
        if err.message.startswith("DATA is empty"):       # the page starts with no data chosen: say where to get it
            raise UserError("DATA is empty: no tokenized data is chosen.",
                            "tokenize your data on the Data tab (it fills DATA in), or pick one of data/'s "
                            "tokenized sets in DATA") from None
        raise
    if files:
        cfg.check_files()            # OUTPUT too (TrainConfig.check_output)
    return cfg


def run_plan(cfg):
    """The plan the trainer would make for ``cfg`` on this machine (trainer/plan.py: the same Machine probe and
    resolve as loop.prepare), from the model file's header."""
    from trainer import checkpoint
    from trainer.plan import Machine, device_for, resolve
    sizes = checkpoint.detect_config(checkpoint.load_checkpoint(cfg.model_path), cfg.model_path)
    return resolve(cfg, sizes, Machine.probe(device_for(cfg)))


def memory_estimate(cfg) -> str:
    """What ./training.sh --dry-run prints of the plan and its memory estimate."""
    from trainer.advice import report
    plan = run_plan(cfg)
    sizes = plan.sizes
    where = "" if plan.machine.type == "cuda" else " (this machine trains on the CPU: what a GPU would need)"
    table = plan.estimate.table() if plan.estimate is not None else ""
    return (f"RWKV-{sizes.version}, {sizes.n_layer} layers × {sizes.n_embd} wide, vocabulary {sizes.vocab_size}; "
            f"device {plan.device}, WKV op '{plan.op}'.\nThe plan (trainer/plan.py, as ./training.sh --dry-run "
            "prints it):\n"
            + "\n".join(f"  {line}" for line in plan.describe() + report(plan))
            + f"\nEstimated peak GPU memory{where}, term by term:\n" + table)


def config_name(name: str) -> str:
    """A config's file name part: letters, digits, '-', '_' and '.'."""
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name:
        raise UserError(f"config name {name!r} is not a plain name.",
                        "use letters, digits, '-', '_' (e.g. my-first-run)")
    return name


def config_path(name: str, folder: Path = Path("output"), for_writing: bool = False) -> Path:
    """output/NAME.env; ``for_writing``: refused where a folder (or output/ itself a file) is in the way."""
    p = folder / f"{config_name(name)}.env"
    if for_writing and p.is_dir():
        raise UserError(f"{p} is a folder, so the config cannot be saved there.", "choose another config name")
    if for_writing and folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder: configs are saved in {folder}/.",
                        f"move the file {folder} away")
    return p


def list_configs(folder: Path = Path("output")) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.env") if p.is_file()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ merge
def list_epochs(output_dir: str | Path) -> list[str]:
    """The checkpoints (epochs) in ``output_dir``; none when it is no readable folder (the page lists, never fails)."""
    from trainer.checkpoint import list_epochs as epochs
    try:
        return epochs(output_dir or "output")
    except (OSError, ValueError):
        return []


def trained_output(last_job_output: str | None = None, folder: Path = Path("output")) -> str:
    """The OUTPUT the Merge tab starts with: what the user trained, so that no folder name is typed twice.

    The OUTPUT of the last job this server started if there is one; otherwise that of the newest config in
    output/ (the page saves one for each run it starts) whose folder holds checkpoints; otherwise "output".
    """
    if last_job_output:
        return last_job_output
    from trainer.envfile import read_env_file
    configs = []
    for p in folder.glob("*.env") if folder.is_dir() else []:
        try:
            configs.append((p.stat().st_mtime, p))
        except OSError:
            pass
    for _, p in sorted(configs, reverse=True):
        try:
            out = read_env_file(p).get("OUTPUT", "").strip()
        except (UserError, OSError):
            continue                          # a file that cannot be read says nothing about what was trained
        if out and list_epochs(out):
            return out
    return "output"


def merge(output_dir: str, epoch: str, dtype: str = "bf16", state_model: bool = False,
          merge_dir: Path = MERGE_DIR, model_dir: Path = MODEL_DIR, base: str = "", lora_alpha: str = "",
          pissa_init: str = "") -> tuple[str, list[Path]]:
    """./merge.sh EPOCH: returns (what merge.sh prints, the files written). ``base``, ``lora_alpha``,
    ``pissa_init``: merge.sh's BASE, LORA_ALPHA and PISSA_INIT as typed (empty: not given)."""
    import time

    from trainer.checkpoint import merge_epoch, merge_usage_text
    from trainer.checkpoint.imports import parse_lora_alpha
    if not epoch:
        raise UserError(f"no checkpoint chosen ({output_dir} has {', '.join(list_epochs(output_dir)) or 'none'}).",
                        "train first, then pick an epoch")
    t0 = time.time()
    try:
        res = merge_epoch(epoch, output_dir=output_dir, model_dir=model_dir, merge_dir=merge_dir, dtype=dtype,
                          state_model=state_model, base=(base or "").strip() or None,
                          lora_alpha=parse_lora_alpha(lora_alpha or ""), pissa_init=(pissa_init or "").strip() or None)
    except UserError as err:
        raise merge_tab_error(err) from None
    meta = res.meta
    settings = ", ".join(f"{k}={v}" for k, v in (meta.get("settings") or {}).items())
    files = [p for p in (res.state, res.model) if p is not None]
    lines = [f"merged {res.checkpoint} ({meta['method']}{' ' + settings if settings else ''}) into {res.base} "
             f"(RWKV-{res.version}), {dtype}, in {time.time() - t0:.1f} s"]
    lines += [f"wrote {p.resolve()} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files]
    lines += [f"note: {n}" for n in res.notes]
    return "\n".join(lines) + "\n\n" + merge_usage_text(res), files


_MERGE_TAB_FIELDS = "BASE|LORA_ALPHA|PISSA_INIT"


def merge_tab_error(err: UserError) -> UserError:
    """merge.sh's refusal with its fix pointing at the Merge tab's fields (BASE, LORA_ALPHA, PISSA_INIT), not at
    merge.sh's variables."""
    import re
    fix = re.sub(rf"\b({_MERGE_TAB_FIELDS})=(<[^>]*>\S*|\S+) \./merge\.sh(?: (?:\.\.\.|\d+|EPOCH))?", r"\1 = \2 in the Merge tab",
                 err.fix or "")
    fix = re.sub(rf"\b(set (?:{_MERGE_TAB_FIELDS})) in merge\.sh", r"\1 in the Merge tab", fix)
    return UserError(err.message, fix or None) if fix != (err.fix or "") else err


# ------------------------------------------------------------------------------------------ chat
NONE = "(none)"


def model_choices(model_dir: Path = MODEL_DIR, merge_dir: Path = MERGE_DIR) -> list[str]:
    """Models to chat with: base models in model/ and merged models in merge/ (not state files)."""
    out = sorted(str(p) for p in model_dir.glob("*.pth") if p.is_file()) if model_dir.is_dir() else []
    if merge_dir.is_dir():
        out += sorted(str(p) for p in merge_dir.rglob("*.pth") if not _is_state_file(p) and p.is_file())
    return out


def addon_choices(output_dirs: list[str], merge_dir: Path = MERGE_DIR) -> list[str]:
    """What can go on top of a base model: training checkpoints (any method) and state files."""
    out = [NONE]
    for d in dict.fromkeys(output_dirs):
        for tag in list_epochs(d):
            out.append(str(Path(d) / f"rwkv-{tag}.pth"))
    if merge_dir.is_dir():
        out += sorted(str(p) for p in merge_dir.rglob("*.pth") if _is_state_file(p) and p.is_file())
    return out


def _is_state_file(p: Path) -> bool:
    return "-state-" in p.name and not p.name.endswith("-model.pth")


class ChatModels:
    """Loaded models for the chat page, the most recent few kept (a model with an adapter is its own entry)."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, addon: str = NONE):
        key = (model, addon or NONE)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        m = self._load(model, addon)
        with self._lock:
            self._models[key] = m
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
        return m

    @staticmethod
    def _load(model: str, addon: str):
        from trainer.inference import pick_device, pick_dtype
        from trainer import ops
        from trainer.checkpoint import attach_adapter, attach_state_file, load_model
        if not model:
            raise UserError("no model chosen.", "pick a model from model/ or merge/")
        device = pick_device("auto")
        m = load_model(model, dtype=pick_dtype("auto", device), device=device)
        if addon and addon != NONE:
            if _is_state_file(Path(addon)):
                attach_state_file(m, addon)
            else:
                attach_adapter(m, addon, model)
        m.op = ops.resolve("auto", device, m.cfg.version)
        m.requires_grad_(False)
        return m


def sampling_settings(max_tokens, temperature, top_p) -> tuple[int, float, float]:
    """The chat's max tokens, temperature and top-p as numbers, refused with one line when they are not."""
    try:
        n, t, p = int(float(max_tokens)), float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise UserError(f"max tokens {max_tokens!r}, temperature {temperature!r}, top-p {top_p!r}: not numbers.",
                        "use the sliders: max tokens at least 1, temperature 0 or more, top-p in (0, 1]") from None
    if not (n >= 1 and 0 <= t < math.inf and 0 < p <= 1):
        raise UserError(f"max tokens {n}, temperature {t}, top-p {p}: out of range.",
                        "max tokens at least 1, temperature 0 or more, top-p in (0, 1]")
    return n, t, p


def chat_prompt(history: list[tuple[str, str]], message: str) -> str:
    """The RWKV chat format: turns 'User: ...' and 'Assistant: ...' separated by a blank line."""
    def clean(t: str) -> str:                 # a blank line ends a turn: keep turns free of them
        return re.sub(r"\n\s*\n+", "\n", t.replace("\r\n", "\n")).strip()
    parts = [f"User: {clean(u)}\n\nAssistant: {clean(a)}" for u, a in history]
    parts.append(f"User: {clean(message)}\n\nAssistant:")
    return "\n\n".join(parts)


class _Stop(Exception):
    pass


def reply(model, history: list[tuple[str, str]], message: str, max_tokens: int = 100, temperature: float = 1.0,
          top_p: float = 0.5, seed: int = 0) -> str:
    """The model's answer to ``message`` after ``history``, cut at the first blank line (end of the turn)."""
    from trainer.data.tokenizer import get_tokenizer
    from trainer.inference import generate
    max_tokens, temperature, top_p = sampling_settings(max_tokens, temperature, top_p)
    tok = get_tokenizer()
    ids: list[int] = []

    def on_token(t: int) -> None:
        ids.append(t)
        if "\n\n" in tok.decode([i for i in ids if i != 0]).lstrip():
            raise _Stop

    prompt = tok.encode(chat_prompt(history, message))
    try:
        generate(model, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                 vocab_limit=min(model.cfg.vocab_size, 65530), on_token=on_token)
    except _Stop:
        pass
    text = tok.decode([i for i in ids if i != 0])
    return text.split("\n\n")[0].strip()
