"""training.sh's variables as data: their defaults and help texts, and config files in the same format.

    fields = training_fields()                    # [Field(name, default, help, section), ...] in training.sh's order
    write_env_file(path, values)                  # NAME='value'   # help    (one line per variable)
    values = read_env_file(path)                  # {NAME: value}; unknown names and odd lines are refused
    folder, why = merge_output_dir(None)          # ./merge.sh's checkpoints: training.sh's OUTPUT (not run)

A config file is what the web page saves; ``./training.sh --config FILE`` (tools/train.py) puts its values
over the ones at the top of training.sh, so a run started from the page can be repeated from the shell. The
file is also valid bash (``set -a; source FILE``): values are single-quoted, so nothing in them is expanded.
Defaults and help come from training.sh itself (the variables a user edits), then from TrainConfig for the
variables training.sh leaves out, so the page, the shell script and the config object never disagree.
"""
from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, fields
from pathlib import Path

from trainer.config import TrainConfig
from trainer.errors import UserError, check_name_lengths

ROOT = Path(__file__).resolve().parent.parent
TRAINING_SH = ROOT / "training.sh"

_ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S*)\s*(?:#\s?(.*))?$")
_MORE_HELP = re.compile(r"^\s+#\s*(.*)$")
_SECTION = re.compile(r"^#\s*-{5,}\s*(\w[\w ]*?)\s*$")


@dataclass(frozen=True)
class Field:
    name: str
    default: str       # as written in training.sh (or TrainConfig's default, as training.sh would write it)
    help: str
    section: str
    kind: str          # the TrainConfig type: "str" | "int" | "float" | "bool" | "tuple[str, ...]"


def parse_training_sh(text: str) -> list[tuple[str, str, str, str]]:
    """``[(section, NAME, value, help), ...]`` for the annotated ``NAME=value  # help`` lines of a script."""
    out: list[list[str]] = []
    section = ""
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        m = _ASSIGN.match(line)
        if m:
            value = shlex.split(m.group(2))[0] if m.group(2) not in ("", '""', "''") else ""
            out.append([section, m.group(1), value, (m.group(3) or "").strip()])
            continue
        m = _MORE_HELP.match(line)
        if m and out and not line.lstrip().startswith("#!"):
            out[-1][3] = (out[-1][3] + " " + m.group(1).strip()).strip()
    return [tuple(x) for x in out]  # type: ignore[misc]


def training_fields(script: Path = TRAINING_SH) -> list[Field]:
    """Every TrainConfig variable with training.sh's default and help, in training.sh's order."""
    defaults = TrainConfig.__dataclass_fields__
    parsed = parse_training_sh(script.read_text(encoding="utf-8")) if script.is_file() else []
    known = TrainConfig.names()
    result: list[Field] = []
    for section, name, value, help_ in parsed:
        if name in known:
            f = defaults[name]
            result.append(Field(name, value, help_ or f.metadata["help"], section, str(f.type)))
    seen = {f.name for f in result}
    for f in fields(TrainConfig):
        if f.name not in seen:
            default = f.default
            text = " ".join(default) if isinstance(default, tuple) else (
                str(int(default)) if isinstance(default, bool) else str(default))
            result.append(Field(f.name, text, f.metadata["help"], "other", str(f.type)))
    return result


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def write_env_file(path: str | Path, values: dict[str, str], note: str = "") -> Path:
    """Write ``values`` (TrainConfig names → text) as annotated ``NAME='value'   # help`` lines, atomically."""
    p = Path(path)
    helps = {f.name: (f.help, f.section) for f in training_fields()}
    lines = [
        "# rwkv-peft-simple training config" + (f" ({note})" if note else "") + f", {time.strftime('%Y-%m-%d %H:%M')}.",
        f"# Run it from the shell:   ./training.sh --config {p}",
        "# Its values replace the ones at the top of training.sh (same names, same meaning, same checks).",
    ]
    section = None
    for name in TrainConfig.names():
        if name not in values:
            continue
        help_, sec = helps.get(name, ("", "other"))
        if sec != section:
            section = sec
            lines.append(f"\n# {'-' * 16} {sec}")
        assign = f"{name}={_quote(str(values[name]))}"
        lines.append(f"{assign:<25} # {help_}" if help_ else assign)
    from .files import write_bytes
    write_bytes(p, "\n".join(lines) + "\n")
    return p


def read_env_file(path: str | Path) -> dict[str, str]:
    """The ``NAME=value`` assignments of a config file (shell quoting, # comments). Refuses what it cannot read."""
    p = Path(path)
    check_name_lengths("--config", p, "give the file the web page saved (output/NAME.env)")
    if not p.is_file():
        raise UserError(f"--config {p}: {'a folder, not a file' if p.is_dir() else 'no such file'}.",
                        "give the file the web page saved (output/NAME.env)")
    try:
        words = shlex.split(p.read_text(encoding="utf-8"), comments=True, posix=True)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--config {p} cannot be read as NAME='value' lines: {err}.",
                        "write one NAME='value' per line, as the web page saves them") from None
    known = set(TrainConfig.names())
    out: dict[str, str] = {}
    for w in words:
        name, eq, value = w.partition("=")
        if w in ("set", "-a", "+a"):      # tolerate `set -a` / `set +a` lines
            continue
        if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise UserError(f"--config {p}: {w[:60]!r} is not a NAME=value assignment.",
                            "write one NAME='value' per line, as the web page saves them")
        if name not in known:
            close = [k for k in known if k.replace("_", "") == name.replace("_", "")]
            raise UserError(f"--config {p}: {name} is not a training.sh variable.",
                            f"did you mean {close[0]}?" if close else "see the variables at the top of training.sh")
        if "\x00" in value:
            raise UserError(f"--config {p}: the value of {name} holds a NUL character (\\x00).",
                            f"retype {name} in the file, or save the config again from the web page")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------ merge's OUTPUT
DEFAULT_OUTPUT = "output"


def training_sh_value(name: str, script: str | Path = "training.sh") -> str | None:
    """``NAME``'s value in a training.sh, read as text (the script is never run); None where the file or the
    line is missing."""
    p = Path(script)
    if not p.is_file():
        return None
    values = {n: v for _, n, v, _ in parse_training_sh(p.read_text(encoding="utf-8"))}
    return values.get(name)


def merge_output_dir(given: str | None = None, script: str | Path = "training.sh") -> tuple[Path, str]:
    """The folder ./merge.sh takes checkpoints from, and where that came from in words: ``given`` (OUTPUT on
    merge.sh's command line) as it is; else training.sh's OUTPUT, the folder the user's training wrote to;
    else output/. Refused with the command to use: a training.sh OUTPUT that the shell would expand ($,
    backquotes: merge does not run the script), and one whose folder holds no checkpoint where output/ does
    (a run trained before OUTPUT was changed, say)."""
    from .checkpoint import list_epochs
    if given:
        return Path(given), "OUTPUT"
    value = training_sh_value("OUTPUT", script)
    if not value:
        return Path(DEFAULT_OUTPUT), "the default"
    if any(c in value for c in "$`"):
        raise UserError(f"training.sh has OUTPUT={value!r}, which the shell expands; merge reads training.sh "
                        "without running it.", "give the folder itself: OUTPUT=FOLDER ./merge.sh EPOCH")
    folder, default = Path(value), Path(DEFAULT_OUTPUT)
    if not list_epochs(folder) and folder.resolve() != default.resolve() and list_epochs(default):
        have = list_epochs(default)
        last = have[-2] if have[-1] == "interrupted" and len(have) > 1 else have[-1]
        raise UserError(f"training.sh has OUTPUT={value!r}, and {folder} holds no checkpoint (rwkv-N.pth), but "
                        f"{DEFAULT_OUTPUT}/ does (epoch{'s' if len(have) > 1 else ''} {', '.join(have)}).",
                        f"to merge those: OUTPUT={DEFAULT_OUTPUT} ./merge.sh {last}; or train first (./training.sh)")
    return folder, "OUTPUT in training.sh"
