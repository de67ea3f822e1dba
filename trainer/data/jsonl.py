"""Read a user's .jsonl file into training texts.

One JSON object per non-empty line, in one of three shapes:

    {"text": "User: hi\\n\\nAssistant: hello"}                      the RWKV convention, used as is
    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
    {"instruction": "...", "input": "...", "output": "..."}          Alpaca ("input", "system" optional)

The chat shapes become RWKV's dialogue text (``to_dialogue``): one turn per message,
``"<Role>: <content>"`` with Role System / User / Assistant, turns joined by a blank line:

    System: You are a helpful assistant.\\n\\nUser: Hi!\\n\\nAssistant: Hello!

Inside a turn, ``\\r\\n`` becomes ``\\n``, surrounding whitespace is stripped and blank lines are
collapsed to one newline, because a blank line is what ends a turn for RWKV chat front-ends. Alpaca's
instruction and non-empty input form the User turn (joined by a newline), its output the Assistant turn.

Every mistake is a UserError naming the file, line (and column for JSON errors) and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
SHAPES = ('{"text": "..."}, {"messages": [{"role": "user", "content": "..."}, ...]} or '
          '{"instruction": "...", "input": "...", "output": "..."}')
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def clean_turn(content: str) -> str:
    """A message's content as one dialogue turn: unix newlines, stripped, no blank lines inside."""
    return _BLANK_LINES.sub("\n", content.replace("\r\n", "\n").replace("\r", "\n").strip())


def to_dialogue(turns: list[tuple[str, str]]) -> str:
    """``[("user", "hi"), ("assistant", "hello")]`` -> ``"User: hi\\n\\nAssistant: hello"``."""
    return "\n\n".join(f"{ROLES[role]}: {clean_turn(content)}" for role, content in turns)


class _ItemError(Exception):
    """A problem with one item; read_items adds the file and line."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


def item_to_text(obj: object) -> str:
    """The training text of one parsed JSON line (raises _ItemError)."""
    if not isinstance(obj, dict):
        raise _ItemError(f"the line is a JSON {type(obj).__name__}, not an object",
                         f"write one object per line: {SHAPES}")
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise _ItemError(f'"text" is a JSON {_json_type(text)}, not a string',
                             'put the whole training text in one string: {"text": "..."}')
        return text
    if "messages" in obj:
        return _messages_to_text(obj["messages"])
    if "instruction" in obj and "output" in obj:
        turns = []
        for key in ("system", "instruction", "input", "output"):
            if key in obj and not isinstance(obj[key], str):
                raise _ItemError(f'"{key}" is a JSON {_json_type(obj[key])}, not a string',
                                 "every Alpaca field must be a string")
        if obj.get("system", "").strip():
            turns.append(("system", obj["system"]))
        user = clean_turn(obj["instruction"])
        if obj.get("input", "").strip():
            user += "\n" + clean_turn(obj["input"])
        turns += [("user", user), ("assistant", obj["output"])]
        return to_dialogue(turns)
    keys = ", ".join(f'"{k}"' for k in list(obj)[:6]) or "no keys"
    raise _ItemError(f"the object has {keys} but no \"text\", \"messages\" or \"instruction\"+\"output\"",
                     f"use one of the supported shapes: {SHAPES}")


def _messages_to_text(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise _ItemError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects',
                         'write "messages": [{"role": "user", "content": "..."}, '
                         '{"role": "assistant", "content": "..."}]')
    turns = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _ItemError(f'message {k} is not an object with "role" and "content"',
                             'write each message as {"role": "user", "content": "..."}')
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise _ItemError(f'message {k} has role {role!r}', "use the roles system, user and assistant")
        if isinstance(content, list):   # OpenAI's parts: [{"type": "text", "text": "..."}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _ItemError(f"message {k} has content parts that are not text",
                                 "only text can be trained on: keep the text parts only")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _ItemError(f'message {k} has "content" of JSON type {_json_type(content)}, not a string',
                             "write the content as a string")
        turns.append((role, content))
    return to_dialogue(turns)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def read_items(path: str | Path) -> list[str]:
    """The training texts of a .jsonl file, one per non-empty line, chat shapes converted.

    Raises UserError (file, line, column and fix) for: a missing file (listing the .jsonl files next
    to it), an empty file, invalid UTF-8, invalid JSON, an unsupported shape, a non-string text, an
    unpaired surrogate escape (``"\\ud800"``) that cannot be written as UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        found = sorted(p.name for p in folder.glob("*.jsonl") if p.is_file()) if folder.is_dir() else []
        above = next((q for q in (folder, *folder.parents) if q.exists()), None)
        where = (f"the .jsonl files in {folder}/ are: {', '.join(found)}" if found
                 else f"there are no .jsonl files in {folder}/" if folder.is_dir()
                 else f"{above} is a file, not a folder" if above is not None and not above.is_dir()
                 else f"the folder {folder}/ does not exist")
        raise UserError(f"{path} not found ({'a folder, not a file' if path.is_dir() else where}).",
                        f"put your file in {folder}/ and give its name, e.g. {found[0] if found else 'mydata.jsonl'}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}).",
                        f"check that the file is yours and readable (ls -l {path}; chmod u+r {path})") from None
    if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark, as some Windows editors write
        raw = raw[3:]
    texts: list[str] = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as err:
            col = len(line[:err.start].decode("utf-8", errors="replace")) + 1
            raise UserError(f"{path}, line {lineno}, column {col}: invalid UTF-8 byte "
                            f"0x{line[err.start]:02x}: the file is not UTF-8 text.",
                            "save the file as UTF-8 (in Notepad: Save as, Encoding UTF-8; or "
                            "iconv -f GBK -t UTF-8 in.jsonl > out.jsonl)") from None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {lineno}, column {err.colno}: not valid JSON ({err.msg}).",
                            "each line must be one complete JSON object; check quotes, commas and "
                            "escapes (a newline inside a string is written \\n)") from None
        except RecursionError:
            raise UserError(f"{path}, line {lineno}: JSON nested too deeply.",
                            "write one flat object per line") from None
        except ValueError as err:       # e.g. a number of more than 4300 digits (Python's limit)
            raise UserError(f"{path}, line {lineno}: not valid JSON here ({str(err).split(':')[0]}).",
                            "write numbers with fewer digits, or as strings") from None
        try:
            text = item_to_text(obj)
        except _ItemError as err:
            raise UserError(f"{path}, line {lineno}: {err.message}.", err.fix) from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise UserError(f"{path}, line {lineno}: the text holds an unpaired surrogate "
                            f"\\u{ord(text[err.start]):04x} (half of an escaped emoji?), which is not "
                            "valid Unicode.", "write the character itself or its full surrogate "
                            "pair, e.g. \\ud83d\\ude00") from None
        texts.append(text)
    if not texts:
        raise UserError(f"{path} is empty (no non-empty lines).",
                        'put one JSON object per line in it, e.g. {"text": "User: hi\\n\\nAssistant: hello"}')
    return texts
