"""What one training item looks like, and the text it becomes: the shapes every data file may hold.

An item is a mapping of fields (a JSON object, a CSV row, a Parquet or ``datasets`` row) in one of four shapes,
tried in this order:

    {"text": "User: hi\\n\\nAssistant: hello"}                      the RWKV convention, used as is
    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "system|human|user|gpt|assistant", "value": "..."}, ...]}   (ShareGPT)
    {"instruction": "...", "input": "...", "output": "..."}          Alpaca ("input", "system" optional)

or, with ``column`` (make_tokenize's COLUMN), the one named field: a string is used as is, a list of messages
(either chat shape) becomes dialogue.

The chat shapes become RWKV's dialogue text (``to_dialogue``): one turn per message,
``"<Role>: <content>"`` with Role System / User / Assistant, turns joined by a blank line:

    System: You are a helpful assistant.\\n\\nUser: Hi!\\n\\nAssistant: Hello!

Inside a turn, ``\\r\\n`` becomes ``\\n``, surrounding whitespace is stripped and blank lines are
collapsed to one newline, because a blank line is what ends a turn for RWKV chat front-ends. Alpaca's
instruction and non-empty input form the User turn (joined by a newline), its output the Assistant turn.

A problem with one item is an ``ItemError``; the reader of the file (trainer/data/sources.py) adds the file and
the line or row.
"""
from __future__ import annotations

import re
from typing import Iterable

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# the chat fields: (role field, content field, the roles it may name -> ours)
CHATS = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "user": "user",
                                        "gpt": "assistant", "assistant": "assistant"}),
}
SHAPES = ('{"text": "..."}, {"messages": [{"role": "user", "content": "..."}, ...]}, '
          '{"conversations": [{"from": "human", "value": "..."}, ...]} or '
          '{"instruction": "...", "input": "...", "output": "..."}')
KNOWN = '"text", "messages", "conversations" or "instruction"+"output"'
_ALPACA = ("system", "instruction", "input", "output")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


class ItemError(Exception):
    """A problem with one item (``message``, ``fix``); the file's reader adds where it is."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


def clean_turn(content: str) -> str:
    """A message's content as one dialogue turn: unix newlines, stripped, no blank lines inside."""
    return _BLANK_LINES.sub("\n", content.replace("\r\n", "\n").replace("\r", "\n").strip())


def to_dialogue(turns: list[tuple[str, str]]) -> str:
    """``[("user", "hi"), ("assistant", "hello")]`` -> ``"User: hi\\n\\nAssistant: hello"``."""
    return "\n\n".join(f"{ROLES[role]}: {clean_turn(content)}" for role, content in turns)


def field_list(fields: Iterable[str], most: int = 8) -> str:
    """``"a", "b", "c"`` (at most ``most`` names, then how many there are)."""
    names = [str(f) for f in fields]
    shown = ", ".join(f'"{n}"' for n in names[:most])
    return (shown + f", ... ({len(names)} in all)" if len(names) > most else shown) or "no fields"


def pick_shape(fields: Iterable[str], column: str | None = None, what: str = "the object") -> tuple[str, list[str]]:
    """The shape of an item that has ``fields`` and the fields it reads: ("text", ["text"]), ("alpaca", [...]), ...

    ``what`` names the item in the error (``"the object"``, ``"data/x.csv"``). Raises ItemError for an unknown
    shape or a ``column`` that is not among ``fields``, naming the fields there are."""
    fields = list(fields)
    if column is not None:
        if column not in fields:
            raise ItemError(f'{what} has no field "{column}" (COLUMN={column}); its fields are {field_list(fields)}',
                            f"set COLUMN to the field that holds the text, or leave it empty for the shapes {KNOWN}")
        return "column", [column]
    for name in ("text", "messages", "conversations"):
        if name in fields:
            return name, [name]
    if "instruction" in fields and "output" in fields:
        return "alpaca", [k for k in _ALPACA if k in fields]
    raise ItemError(f"{what} has {field_list(fields)} but no {KNOWN}",
                    f"use one of the supported shapes: {SHAPES}; or name the field that holds the text with "
                    "COLUMN (e.g. COLUMN=content, or --column content)")


def item_to_text(obj: object, column: str | None = None) -> str:
    """The training text of one item (a dict of fields); raises ItemError."""
    if not isinstance(obj, dict):
        kind = "list" if isinstance(obj, list) else _json_type(obj)
        raise ItemError(f"the item is a JSON {kind}, not an object", f"make every item an object: {SHAPES}")
    shape, _ = pick_shape(obj, column)
    if shape == "column":
        text = _field_text(column, obj[column])
    elif shape == "text":
        text = obj["text"]
        if not isinstance(text, str):
            raise ItemError(f'"text" is a JSON {_json_type(text)}, not a string',
                            'put the whole training text in one string: {"text": "..."}')
    elif shape == "alpaca":
        text = _alpaca_to_text(obj)
    else:
        text = chat_to_text(shape, obj[shape])
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ItemError(f"the text holds an unpaired surrogate \\u{ord(text[err.start]):04x} (half of an escaped "
                        "emoji?), which is not valid Unicode", "write the character itself or its full surrogate "
                        "pair, e.g. \\ud83d\\ude00") from None
    return text


def _field_text(name: str, value: object) -> str:
    """COLUMN's value: a string as is, a list of messages (either chat shape) as dialogue."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for chat, (who, _, _) in CHATS.items():
            if who in value[0]:
                return chat_to_text(chat, value, label=name)
    raise ItemError(f'"{name}" (COLUMN) is a JSON {_json_type(value)}, not a string or a list of messages',
                    'set COLUMN to a field that holds the text, or a list of {"role": ..., "content": ...} or '
                    '{"from": ..., "value": ...} messages')


def _alpaca_to_text(obj: dict) -> str:
    for key in _ALPACA:
        if key in obj and not isinstance(obj[key], str) and not (key in ("system", "input") and obj[key] is None):
            raise ItemError(f'"{key}" is a JSON {_json_type(obj[key])}, not a string',
                            "every Alpaca field must be a string")
    turns = []
    if (obj.get("system") or "").strip():
        turns.append(("system", obj["system"]))
    user = clean_turn(obj["instruction"])
    if (obj.get("input") or "").strip():
        user += "\n" + clean_turn(obj["input"])
    turns += [("user", user), ("assistant", obj["output"])]
    return to_dialogue(turns)


def chat_to_text(chat: str, messages: object, label: str | None = None) -> str:
    """A "messages" or "conversations" list as dialogue text (``label``: the field's name, if another)."""
    who, what, roles = CHATS[chat]
    label = label or chat
    user, bot = ("user", "assistant") if chat == "messages" else ("human", "gpt")
    if not isinstance(messages, list) or not messages:
        raise ItemError(f'"{label}" must be a non-empty list of {{"{who}": ..., "{what}": ...}} objects',
                        f'write "{label}": [{{"{who}": "{user}", "{what}": "..."}}, '
                        f'{{"{who}": "{bot}", "{what}": "..."}}]')
    turns = []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or who not in msg or what not in msg:
            raise ItemError(f'message {k} is not an object with "{who}" and "{what}"',
                            f'write each message as {{"{who}": "{user}", "{what}": "..."}}')
        role, content = msg[who], msg[what]
        if not isinstance(role, str) or role not in roles:
            raise ItemError(f"message {k} has {who} {role!r}",
                            f"use the {who} values {', '.join(list(roles)[:-1])} and {list(roles)[-1]}")
        if isinstance(content, list) and chat == "messages":   # OpenAI's parts: [{"type": "text", "text": "..."}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ItemError(f"message {k} has content parts that are not text",
                                "only text can be trained on: keep the text parts only")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ItemError(f'message {k} has "{what}" of JSON type {_json_type(content)}, not a string',
                            f'write the {what} as a string')
        turns.append((roles[role], content))
    return to_dialogue(turns)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)
