"""Read a user's data file or folder into training texts: every kind of file that make_tokenize takes.

    texts = read_items("data/chat.jsonl")                        # list[str], one per item
    src = read_source("data/docs", column="content", log=print)  # .texts, .files (how many were read), .n_bytes

What is read, by the file's ending (in any case):

    .jsonl       one JSON object per non-empty line                                       errors name the line
    .json        a list of JSON objects (a file of one object per line is read as .jsonl)  the item
    .csv         a header line with the field names, then one item per row (a comma between cells)  the line
    .parquet     one item per row (needs pyarrow)                                         the row
    .arrow       one item per row of a shard that the ``datasets`` library wrote (needs datasets)    the row
    .txt, .md    the whole file is one document, used as written (COLUMN does not apply)
    a folder     a ``datasets`` ``save_to_disk`` folder (its "train" split or its only one; needs datasets),
                 else every data file in it and its subfolders, in the sorted order of their paths; names
                 starting with "." are left out, and so are files of other kinds (the log lists them)

Every item has one of the shapes of trainer/data/shapes.py, or COLUMN (``column``) names its field. A CSV cell
of a "messages" or "conversations" column holds that list as JSON. Lines, rows and items are counted from 1.
Every mistake is a UserError naming the file, the line, item or row, and the fix. Nothing is downloaded: the
optional packages (pyarrow, datasets) are imported only for the files that need them, and their absence is one
line with the install command.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from .shapes import CHATS, ItemError, item_to_text, pick_shape

ENDINGS = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".md")
ENDINGS_TEXT = ".jsonl, .json, .csv, .parquet, .arrow, .txt or .md"
_EMPTY = {   # ending: (what an empty file lacks, the fix)
    ".jsonl": ("no non-empty lines", 'put one JSON object per line in it, e.g. {"text": "User: hi\\n\\nAssistant: hello"}'),
    ".json": ("no items", 'write a list of objects in it, e.g. [{"text": "User: hi\\n\\nAssistant: hello"}]'),
    ".csv": ("no rows", "write a header line with the field names (e.g. text) and one row per item"),
    ".parquet": ("no rows", "write at least one row into it"),
    ".arrow": ("no rows", "save at least one row into it"),
    ".txt": ("no text", "write the text in it"),
    ".md": ("no text", "write the text in it"),
    "": ("no rows", "save at least one row into it"),
}
Log = Callable[[str], None]


@dataclass
class Source:
    texts: list[str]      # the training text of every item, in file order
    files: int            # the data files (or datasets folders) read
    n_bytes: int          # their size on disk


def read_items(path: str | Path, column: str | None = None) -> list[str]:
    """The training texts of a data file or folder (see the module's docstring)."""
    return read_source(path, column).texts


def read_source(path: str | Path, column: str | None = None, log: Log | None = None) -> Source:
    """Read ``path`` (a data file or folder) into texts; ``column``: the field with the text (COLUMN), or None."""
    path, column, log = Path(path), (column or None), (log or (lambda line: None))
    _check_exists(path)
    if path.is_dir() and not is_saved_dataset(path):
        parts = _folder_files(path, log)
    else:
        if path.is_file() and path.suffix.lower() not in ENDINGS:
            raise UserError(f"{path} is not a kind of file that make_tokenize reads (it ends in "
                            f"{path.suffix or 'no ending'!r}).", f"give a {ENDINGS_TEXT} file, or a folder of them; if "
                            "yours is one of these under another name, rename it to end that way")
        parts = [path]
    texts: list[str] = []
    n_bytes, empty = 0, []
    for part in parts:
        before = len(texts)
        texts.extend(_rows(part, column, log))
        n_bytes += _size(part)
        if len(texts) == before:
            empty.append(part)
    folder = path.is_dir() and parts != [path]
    if not texts:
        if folder:
            raise UserError(f"every data file in {path}/ is empty ({len(parts)} file{'s' * (len(parts) > 1)}, no "
                            "items).", "put the training data in them")
        lacks, fix = _EMPTY["" if path.is_dir() else path.suffix.lower()]
        raise UserError(f"{path} is empty ({lacks}).", fix)
    if empty and folder:
        log(f"left out {len(empty)} empty file(s) of {path}/: {', '.join(str(p.relative_to(path)) for p in empty[:5])}"
            + (", ..." if len(empty) > 5 else ""))
    return Source(texts, len(parts), n_bytes)


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` is what ``datasets``' save_to_disk wrote (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or \
        ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _rows(path: Path, column: str | None, log: Log) -> Iterator[str]:
    if path.is_dir():
        return _dataset_texts(path, column, log)
    return {".jsonl": _jsonl_texts, ".json": _json_texts, ".csv": _csv_texts, ".parquet": _parquet_texts,
            ".arrow": _dataset_texts, ".txt": _document_texts, ".md": _document_texts}[path.suffix.lower()](
        path, column, log)


def _item(path: Path, where: str, obj: object, column: str | None) -> str:
    """One item's text; its mistakes as one line naming the file and where in it."""
    try:
        return item_to_text(obj, column)
    except ItemError as err:
        raise UserError(f"{path}, {where}: {err.message}.", err.fix) from None


# ------------------------------------------------------------------------------------------ the file itself
def _check_exists(path: Path) -> None:
    """A missing path is one line listing the data files next to where it was looked for."""
    if path.is_file() or path.is_dir():
        return
    folder = path.parent
    try:
        found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ENDINGS) \
            if folder.is_dir() else []
    except OSError:
        found = []
    above = next((q for q in (folder, *folder.parents) if q.exists()), None)
    where = (f"the data files in {folder}/ are: {', '.join(found[:20])}{', ...' if len(found) > 20 else ''}" if found
             else f"there are no data files in {folder}/" if folder.is_dir()
             else f"{above} is a file, not a folder" if above is not None and not above.is_dir()
             else f"the folder {folder}/ does not exist")
    what = "not a file or folder" if path.exists() else "not found"
    raise UserError(f"{path} {what} ({where}).",
                    f"put your file in {folder}/ and give its name, e.g. {found[0] if found else 'mydata.jsonl'}")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}).",
                        f"check that the file is yours and readable (ls -l {path}; chmod u+r {path})") from None
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw   # a UTF-8 byte order mark, as Windows editors write


def _not_utf8(path: Path, line_no: int, line: bytes, at: int) -> UserError:
    col = len(line[:at].decode("utf-8", errors="replace")) + 1
    return UserError(f"{path}, line {line_no}, column {col}: invalid UTF-8 byte 0x{line[at]:02x}: the file is not "
                     "UTF-8 text.", "save the file as UTF-8 (in Notepad: Save as, Encoding UTF-8; or iconv -f GBK "
                     f"-t UTF-8 in{path.suffix} > out{path.suffix})")


def _decode(path: Path, raw: bytes) -> str:
    """The whole file as text; invalid UTF-8 is one line naming its line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        raise _not_utf8(path, raw.count(b"\n", 0, err.start) + 1, raw[start:err.start + 1], err.start - start) \
            from None


def _parse_json(text: str, path: Path, line: int | None, fix: str) -> object:
    """json.loads with its failures as one line (``line``: the file's line the text is, None: the whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {line or err.lineno}, column {err.colno}: not valid JSON ({err.msg}).",
                        fix) from None
    except RecursionError:
        raise UserError(f"{path}{f', line {line}' if line else ''}: JSON nested too deeply.",
                        "write flat objects") from None
    except ValueError as err:       # e.g. a number of more than 4300 digits (Python's limit)
        raise UserError(f"{path}{f', line {line}' if line else ''}: not valid JSON here ({str(err).split(':')[0]}).",
                        "write numbers with fewer digits, or as strings") from None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ text files
_JSONL_FIX = ("each line must be one complete JSON object; check quotes, commas and escapes (a newline inside a "
              "string is written \\n)")


def _jsonl_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    for line_no, line in enumerate(_read_bytes(path).split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, line_no, line, err.start) from None
        yield _item(path, f"line {line_no}", _parse_json(s, path, line_no, _JSONL_FIX), column)


def _json_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    text = _decode(path, _read_bytes(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip()[:1] == "{":      # JSON Lines under a .json name
            log(f"{path} holds one JSON object per line: read as JSON Lines (.jsonl)")
            yield from _jsonl_texts(path, column, log)
            return
        data = _parse_json(text, path, None, "the file must be one JSON list of objects, [{...}, {...}]; check "
                                             "quotes, commas and brackets")
    except (RecursionError, ValueError):
        data = _parse_json(text, path, None, "")
    if not isinstance(data, list):
        keys = f" with the keys {', '.join(repr(k) for k in list(data)[:6])}" if isinstance(data, dict) and data else ""
        raise UserError(f"{path} holds a JSON {type(data).__name__.replace('dict', 'object')}{keys}, not a list of "
                        "objects.", 'write the items as a list, [{"text": "..."}, {"text": "..."}], or one object '
                        "per line in a .jsonl file")
    for k, obj in enumerate(data, 1):
        yield _item(path, f"item {k}", obj, column)


def _document_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    text = _decode(path, _read_bytes(path))
    if text.strip():
        yield text


def _csv_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)          # a whole document may sit in one cell (the default is 128 KiB)
    reader = csv.reader(io.StringIO(_decode(path, _read_bytes(path)), newline=""), strict=True)
    fix = ('one item per row, one cell per column, cells with commas, quotes or newlines in double quotes '
           '("a, b"), a quote inside them doubled ("")')
    try:
        header = next(reader, None)
        if header is None:
            return
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            raise UserError(f'{path}, line 1: the header names the column "{twice[0]}" twice.',
                            "give every column its own name")
        shape, _ = _pick(header, column, f"{path}, line 1: the header")
        line = reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                raise UserError(f"{path}, line {start}: {len(cells)} cells, but the header has {len(header)} "
                                "columns.", fix)
            row = dict(zip(header, cells))
            if shape in CHATS:                   # a cell holds the list of messages as JSON
                row[shape] = _parse_json(row[shape], path, start, f'write the {shape} of a row as JSON in its cell, '
                                         f'e.g. [{{"{CHATS[shape][0]}": "user", "{CHATS[shape][1]}": "hi"}}]')
            yield _item(path, f"line {start}", row, column)
    except csv.Error as err:
        raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({err}).", fix) from None


def _pick(fields: list[str], column: str | None, what: str) -> tuple[str, list[str]]:
    """The shape of a table's rows from its column names (one line if it has none of them)."""
    try:
        return pick_shape(fields, column, what)
    except ItemError as err:
        raise UserError(f"{err.message}.", err.fix) from None


# ------------------------------------------------------------------------------------------ tables
def _missing(package: str, path: Path, kind: str) -> UserError:
    return UserError(f"{path} is {kind}: reading it needs the package {package}, which is not installed.",
                     f"pip install {package}")


def _parquet_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", path, "a Parquet file") from None
    import pyarrow as pa
    try:
        table = pq.ParquetFile(path)
        _, fields = _pick(table.schema_arrow.names, column, str(path))
        row = 0
        for batch in table.iter_batches(batch_size=4096, columns=fields):
            for obj in batch.to_pylist():
                row += 1
                yield _item(path, f"row {row}", obj, column)
    except OSError as err:
        if isinstance(err, PermissionError):
            raise UserError(f"{path} cannot be read ({err.strerror or err}).",
                            f"check that the file is yours and readable (ls -l {path})") from None
        raise _not_a(path, "a Parquet file", err) from None
    except (pa.ArrowException, ValueError) as err:
        raise _not_a(path, "a Parquet file", err) from None


def _not_a(path: Path, kind: str, err: BaseException) -> UserError:
    why = " ".join(str(err).split())[:160] or type(err).__name__
    return UserError(f"{path} cannot be read as {kind} ({why}).", "check that the file is whole (copy it again) and "
                     "is what its ending says")


def _dataset_texts(path: Path, column: str | None, log: Log) -> Iterator[str]:
    """A save_to_disk folder or one .arrow shard, read through ``datasets`` from this disk only."""
    ds, where = _load_dataset(path, log)
    _, fields = _pick(ds.column_names, column, str(path) + (f" (split {where.split()[1]})" if where else ""))
    row = 0
    for batch in ds.select_columns(fields).iter(batch_size=1024):
        for values in zip(*(batch[f] for f in fields)):
            row += 1
            yield _item(path, f"{where}row {row}", dict(zip(fields, values)), column)


def _load_dataset(path: Path, log: Log):
    """(the Dataset, "split NAME, " or ""): never anything from the network (offline, local files only)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind = "a dataset saved by the datasets library" if path.is_dir() else "an Arrow shard of the datasets library"
    try:
        import datasets
    except ImportError:
        raise _missing("datasets", path, kind) from None
    getattr(datasets, "disable_progress_bars", lambda: None)()
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
    except PermissionError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}).",
                        f"check that the files are yours and readable (ls -lR {path})") from None
    except Exception as err:  # noqa: BLE001 -- whatever datasets / pyarrow raise for a damaged folder or file
        raise _not_a(path, kind, err) from None
    if not isinstance(ds, datasets.DatasetDict):
        return ds, ""
    splits = list(ds)
    if not splits:
        raise UserError(f"{path} holds no split.", "save a dataset with at least one split")
    split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
    if split is None:
        raise UserError(f"{path} holds the splits {', '.join(splits)} and none is called train.",
                        f"give the folder of the split to use, e.g. {path / splits[0]}")
    if len(splits) > 1:
        log(f"{path} holds the splits {', '.join(splits)}: reading {split}")
    return ds[split], f"split {split}, "


# ------------------------------------------------------------------------------------------ folders
def _folder_files(folder: Path, log: Log) -> list[Path]:
    """The data files (and save_to_disk folders) below ``folder``, sorted by path; what else is there is logged."""
    found: list[Path] = []
    other: list[str] = []
    seen: set[Path] = set()

    def walk(d: Path) -> None:
        if d.resolve() in seen:           # a link back up: read once
            return
        seen.add(d.resolve())
        try:
            entries = sorted(d.iterdir(), key=lambda p: p.name)
        except OSError as err:
            raise UserError(f"the folder {d} cannot be read ({err.strerror or err}).",
                            f"check that it is yours and readable (ls -ld {d})") from None
        for p in entries:
            if p.name.startswith("."):
                continue
            if p.is_dir():
                found.append(p) if is_saved_dataset(p) else walk(p)
            elif p.is_file() and p.suffix.lower() in ENDINGS:
                found.append(p)
            else:
                other.append(str(p.relative_to(folder)))

    walk(folder)
    if other:
        log(f"left out {len(other)} file(s) of {folder}/ that are not data files: {', '.join(other[:5])}"
            + (", ..." if len(other) > 5 else ""))
    if not found:
        held = f"it holds only {', '.join(other[:5])}{', ...' if len(other) > 5 else ''}" if other else "it is empty"
        raise UserError(f"{folder} is a folder with no data files in it ({held}).",
                        f"put {ENDINGS_TEXT} files in it, or give the name of one file")
    return found
