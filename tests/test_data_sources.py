"""Every input make_tokenize takes: the ShareGPT shape, COLUMN, and the files other than .jsonl (.json, .csv, .parquet,
.arrow, .txt/.md, folders, datasets' save_to_disk folders). Each gives the texts we expect, and token ids identical to
the rwkv package's TRIE_TOKENIZER; each wrong input gives one line, exit code 2 and no file. The tests of pyarrow and
datasets files skip where those packages are missing; their absence itself is tested with every machine."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import make_tokenize
from trainer.data.binidx import BinIdx
from trainer.data.sources import read_items
from trainer.errors import run_cli

REPO = Path(__file__).resolve().parent.parent

# The same items in each shape, and the text each must become.
ROWS = {
    "text": [{"text": "User: 你好 😀\n\nAssistant: héllo wörld"}, {"text": ""},
             {"text": 'Ελληνικά, "quoted", a comma\nand a second line'}],
    "messages": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語?\r\n\r\nok"},
                               {"role": "assistant", "content": ""}]},
                 {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello 👋 "}]}],
    "conversations": [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "日本語?"},
                                         {"from": "gpt", "value": ""}]},
                      {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello 👋"}]}],
    "alpaca": [{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
               {"instruction": "Say hi in Chinese.", "input": "", "output": "你好"}],
}
TEXTS = {
    "text": [r["text"] for r in ROWS["text"]],
    "messages": ["System: Be brief.\n\nUser: 日本語?\nok\n\nAssistant: ", "User: hi\n\nAssistant: hello 👋"],
    "conversations": ["System: Be brief.\n\nUser: 日本語?\n\nAssistant: ", "User: hi\n\nAssistant: hello 👋"],
    "alpaca": ["User: Add the numbers.\n2, 3\n\nAssistant: 5", "User: Say hi in Chinese.\n\nAssistant: 你好"],
}


@pytest.fixture(scope="module")
def trie():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from trainer.data.tokenizer import vocab_file
    return TRIE_TOKENIZER(str(vocab_file()))


def run(capsys, *args):
    """make_tokenize in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(make_tokenize.main, [str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def items_of(prefix):
    ds = BinIdx(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def same_ids(prefix, texts, trie):
    """The tokenized items are exactly TRIE_TOKENIZER's ids of ``texts`` (each + the end token), in some order."""
    assert sorted(items_of(prefix)) == sorted(trie.encode(t) + [0] for t in texts)


def quiet_datasets():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def write_rows(folder: Path, name: str, kind: str, rows: list[dict]) -> Path:
    """``rows`` as data/NAME.KIND (a saved dataset: the folder data/NAME)."""
    if kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif kind == "csv":
        path = folder / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(rows[0]))
            for r in rows:
                w.writerow([v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in r.values()])
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "arrow":
        saved = write_rows(folder, f".{name}-saved", "saved", rows)
        path = folder / f"{name}.arrow"
        shutil.move(str(next(saved.glob("*.arrow"))), path)
        shutil.rmtree(saved)
    else:
        path = folder / name
        quiet_datasets().Dataset.from_list(rows).save_to_disk(str(path))
    return path


KINDS = ["jsonl", "json", "csv", "parquet", "arrow", "saved"]


@pytest.mark.parametrize("shape", list(ROWS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_shape_in_every_kind_of_file(tmp_path, capsys, trie, kind, shape):
    path = write_rows(tmp_path, "d", kind, ROWS[shape])
    assert read_items(path) == TEXTS[shape]                       # in file order
    code, out, err = run(capsys, path.name, "--data-dir", tmp_path)
    assert code == 0, err
    assert f"read {len(ROWS[shape])} items from {path}" in out
    same_ids(tmp_path / "d", TEXTS[shape], trie)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "d.bin", "d.idx"])


def test_sharegpt_is_the_messages_shape():
    """ShareGPT's roles map to ours (human and user -> User, gpt and assistant -> Assistant) through the same turn
    code: a conversation gives the text of the same messages."""
    from trainer.data.shapes import item_to_text
    turns = [("system", "system", "Sys"), ("human", "user", " a\n\n\nb "), ("gpt", "assistant", "c"),
             ("user", "user", "d"), ("assistant", "assistant", "")]
    sharegpt = {"conversations": [{"from": f, "value": v} for f, _, v in turns]}
    messages = {"messages": [{"role": r, "content": v} for _, r, v in turns]}
    assert item_to_text(sharegpt) == item_to_text(messages) == \
        "System: Sys\n\nUser: a\nb\n\nAssistant: c\n\nUser: d\n\nAssistant: "
    extra = {"conversations": [{"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a"}], "id": 7}
    assert item_to_text(extra) == "User: q\n\nAssistant: a"      # other keys are left alone


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_column_names_the_field(tmp_path, capsys, trie, kind):
    rows = [{"id": "1", "body": "First note: ünïcödé ✓", "title": "a"}, {"id": "2", "body": "", "title": "b"},
            {"id": "3", "body": "line one\nline two, with a comma", "title": "c"}]
    path = write_rows(tmp_path, "notes", kind, rows)
    code, _, err = run(capsys, path.name, "--data-dir", tmp_path)      # no known shape: one line with the fields
    assert code == 2 and err.count("\n") == 1
    assert '"id", "body", "title" but no "text"' in err and "COLUMN" in err and str(path) in err
    code, _, err = run(capsys, path.name, "--column", "body", "--data-dir", tmp_path)
    assert code == 0, err
    same_ids(tmp_path / "notes", [r["body"] for r in rows], trie)


def test_column_holding_messages_and_column_over_text(tmp_path):
    path = write_rows(tmp_path, "c", "jsonl", [
        {"text": "not this", "dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"text": "nor this", "dialog": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}])
    assert read_items(path) == ["not this", "nor this"]
    assert read_items(path, column="dialog") == ["User: q\n\nAssistant: a", "User: q2\n\nAssistant: a2"]


def test_null_optional_alpaca_fields_count_as_missing(tmp_path):
    """Parquet and datasets files give a missing value as null: for Alpaca's optional input and system that is
    the same as leaving them out."""
    path = write_rows(tmp_path, "a", "jsonl", [{"instruction": "i", "input": None, "output": "o", "system": None}])
    assert read_items(path) == ["User: i\n\nAssistant: o"]


def test_text_and_markdown_files_are_one_document_each(tmp_path, capsys, trie):
    doc = "\ufeff# Título\r\n\r\nPárrafo con ñ, 中文 and 😀.\n\n\n  indented\n"
    (tmp_path / "a.md").write_bytes(doc.encode("utf-8"))
    assert read_items(tmp_path / "a.md") == [doc[1:]]                 # as written, less the byte order mark
    (tmp_path / "b.TXT").write_text("plain", encoding="utf-8")
    code, out, err = run(capsys, "a.md", "--data-dir", tmp_path)
    assert code == 0, err
    same_ids(tmp_path / "a", [doc[1:]], trie)
    assert run(capsys, "b.TXT", "--data-dir", tmp_path)[0] == 0        # the ending in any case
    same_ids(tmp_path / "b", ["plain"], trie)


def test_a_folder_in_sorted_order(tmp_path, capsys, trie):
    docs = tmp_path / "docs"
    (docs / "sub" / "deeper").mkdir(parents=True)
    (docs / "b.txt").write_text("second ✓", encoding="utf-8")
    (docs / "a.md").write_text("# first\n", encoding="utf-8")
    write_rows(docs / "sub", "c", "jsonl", ROWS["alpaca"])
    write_rows(docs / "sub", "d", "csv", ROWS["text"])
    (docs / "sub" / "deeper" / "e.txt").write_text("deepest", encoding="utf-8")
    (docs / "empty.txt").write_text(" \n", encoding="utf-8")             # no text: left out, and said so
    (docs / "picture.png").write_bytes(b"\x89PNG")                      # not data: left out, and said so
    (docs / ".hidden.txt").write_text("never read", encoding="utf-8")
    (docs / ".git").mkdir()
    (docs / ".git" / "x.txt").write_text("never read", encoding="utf-8")
    want = ["# first\n", "second ✓"] + TEXTS["alpaca"] + TEXTS["text"] + ["deepest"]
    assert read_items(docs) == want
    code, out, err = run(capsys, "docs", "--data-dir", tmp_path)
    assert code == 0, err
    assert f"read {len(want)} items from {docs}/ (6 files, " in out
    assert "left out 1 file(s) of" in out and "picture.png" in out and "empty.txt" in out
    same_ids(tmp_path / "docs", want, trie)                               # beside the folder, not in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "docs.bin", "docs.idx"]


def test_folder_with_datasets_and_parquet_inside(tmp_path, capsys, trie):
    pytest.importorskip("pyarrow")
    quiet_datasets()
    root = tmp_path / "mix"
    root.mkdir()
    write_rows(root, "a", "parquet", ROWS["messages"])
    write_rows(root, "b", "saved", ROWS["conversations"])               # a save_to_disk folder in the folder
    write_rows(root, "c", "arrow", ROWS["text"])
    want = TEXTS["messages"] + TEXTS["conversations"] + TEXTS["text"]
    assert read_items(root) == want
    assert run(capsys, "mix", "--data-dir", tmp_path)[0] == 0
    same_ids(tmp_path / "mix", want, trie)


def test_dataset_dict_reads_its_train_split(tmp_path, capsys, trie):
    datasets = quiet_datasets()
    both = datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS["text"][:1]),
                                 "train": datasets.Dataset.from_list(ROWS["alpaca"])})
    both.save_to_disk(str(tmp_path / "dd"))
    code, out, err = run(capsys, "dd", "--data-dir", tmp_path)
    assert code == 0, err
    assert "holds the splits test, train: reading train" in out
    same_ids(tmp_path / "dd", TEXTS["alpaca"], trie)
    datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS["text"]),
                          "b": datasets.Dataset.from_list(ROWS["text"])}).save_to_disk(str(tmp_path / "ab"))
    code, _, err = run(capsys, "ab", "--data-dir", tmp_path)
    assert code == 2 and "holds the splits a, b and none is called train" in err and f"{tmp_path}/ab/a" in err
    datasets.DatasetDict({"only": datasets.Dataset.from_list(ROWS["text"])}).save_to_disk(str(tmp_path / "one"))
    assert read_items(tmp_path / "one") == TEXTS["text"]


def test_json_lines_under_a_json_name_and_bare_names(tmp_path, capsys, trie):
    write_rows(tmp_path, "lines", "jsonl", ROWS["text"]).rename(tmp_path / "lines.json")
    code, out, err = run(capsys, "lines.json", "--data-dir", tmp_path)
    assert code == 0, err
    assert "one JSON object per line: read as JSON Lines" in out
    same_ids(tmp_path / "lines", TEXTS["text"], trie)
    write_rows(tmp_path, "t", "csv", ROWS["alpaca"])
    assert run(capsys, "t", "--data-dir", tmp_path)[0] == 0             # no ending given: t.csv is found
    same_ids(tmp_path / "t", TEXTS["alpaca"], trie)


def test_column_variable_of_the_shell_script(tmp_path):
    write_rows(tmp_path, "n", "csv", [{"body": "from the column ✓", "other": "x"}])
    env = dict(os.environ, PYTHON=sys.executable, COLUMN="body")
    r = subprocess.run([str(REPO / "make_tokenize.sh"), str(tmp_path / "n.csv")], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from trainer.data.tokenizer import get_tokenizer
    assert items_of(tmp_path / "n") == [get_tokenizer().encode("from the column ✓") + [0]]
    r = subprocess.run([str(REPO / "make_tokenize.sh"), str(tmp_path / "n.csv"), "--column", "nope"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)      # the flag wins over COLUMN
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and 'no field "nope" (COLUMN=nope)' in r.stderr


BAD = [   # (file name, content (bytes, a writer, or a list of paths to make), extra args, what the line says)
    ("b.csv", b'text\n"ok"\n"a","b"\n', [], "b.csv, line 3: 2 cells, but the header has 1 columns"),
    ("b.csv", b'text\nfine\ncaf\xe9\n', [], "b.csv, line 3, column 4: invalid UTF-8 byte 0xe9"),
    ("b.csv", b'text,text\nx,y\n', [], 'b.csv, line 1: the header names the column "text" twice'),
    ("b.csv", b'messages\n"[{""role"": ""user"", ""content"": ""x""}]"\n"[{oops"\n', [],
     "b.csv, line 3, column 3: not valid JSON"),
    ("b.csv", b'question,answer\nq,a\n', [], 'b.csv, line 1: the header has "question", "answer" but no "text"'),
    ("b.csv", b'text\nx\n', ["--column", "body"], 'b.csv, line 1: the header has no field "body" (COLUMN=body); '
                                                  'its fields are "text"'),
    ("b.csv", b'text\n', [], "b.csv is empty (no rows)"),
    ("b.csv", b'text\n"unclosed\n', [], "b.csv, line 2: not valid CSV"),
    ("b.json", b'{"data": [{"text": "x"}]}', [], "holds a JSON object with the keys 'data', not a list of objects"),
    ("b.json", b'[{"text": "x"},\n {"text": "y",}]', [], "b.json, line 2, column 15: not valid JSON"),
    ("b.json", b'[{"text": "x"}, "y"]', [], "b.json, item 2: the item is a JSON string, not an object"),
    ("b.json", b'[{"text": "x"}, {"prompt": "p", "completion": "c"}]', [],
     'b.json, item 2: the object has "prompt", "completion" but no "text", "messages", "conversations"'),
    ("b.json", b'[]', [], "b.json is empty (no items)"),
    ("b.jsonl", b'{"conversations": [{"from": "tool", "value": "x"}]}\n', [],
     "b.jsonl, line 1: message 0 has from 'tool'. Fix: use the from values system, human, user, gpt and assistant"),
    ("b.jsonl", b'{"conversations": [{"from": "human", "text": "x"}]}\n', [],
     'line 1: message 0 is not an object with "from" and "value"'),
    ("b.jsonl", b'{"conversations": []}\n', [], '"conversations" must be a non-empty list'),
    ("b.jsonl", b'{"text": "x"}\n{"id": 1}\n', ["--column", "id"],
     'b.jsonl, line 1: the object has no field "id" (COLUMN=id)'),
    ("b.jsonl", b'{"id": 1}\n', ["--column", "id"], '"id" (COLUMN) is a JSON number, not a string'),
    ("b.txt", b"  \n\n", [], "b.txt is empty (no text)"),
    ("b.txt", b"ok\nbad \xff\n", [], "b.txt, line 2, column 5: invalid UTF-8 byte 0xff"),
    ("b.docx", b"PK", [], "b.docx is not a kind of file that make_tokenize reads (it ends in '.docx')"),
    ("docs", [], [], "docs is a folder with no data files in it (it is empty)"),
    ("docs", ["x.pdf", ".y.txt"], [], "docs is a folder with no data files in it (it holds only x.pdf)"),
    ("docs", ["a.txt", "b.md"], [], "every data file in"),
    ("docs", ["a/b/c.jsonl"], [], "docs/ is empty (1 file, no items)"),
]


@pytest.mark.parametrize("name,content,args,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, name, content, args, message):
    data = tmp_path / "data"
    data.mkdir()
    if isinstance(content, bytes):
        (data / name).write_bytes(content)
    else:
        (data / name).mkdir()
        for rel in content:
            (data / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / name / rel).write_bytes(b"" if "c.jsonl" in rel or rel in ("a.txt", "b.md") else b"x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run(capsys, name, *args, "--data-dir", data)
    assert code == 2, out + err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err and " Fix: " in err
    assert message in err and name in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_damaged_parquet_and_arrow_files(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really parquet")
    code, _, err = run(capsys, "x.parquet", "--data-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "x.parquet cannot be read as a Parquet file (" in err
    write_rows(tmp_path, "u", "parquet", [{"question": "q", "answer": "a"}])
    code, _, err = run(capsys, "u.parquet", "--data-dir", tmp_path)
    assert code == 2 and 'u.parquet has "question", "answer" but no "text"' in err and "COLUMN" in err
    write_rows(tmp_path, "n", "parquet", [{"text": "fine"}, {"text": None}])
    code, _, err = run(capsys, "n.parquet", "--data-dir", tmp_path)
    assert code == 2 and 'n.parquet, row 2: "text" is a JSON null, not a string' in err
    quiet_datasets()
    (tmp_path / "y.arrow").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "y.arrow", "--data-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "y.arrow cannot be read as an Arrow shard of the datasets" in err
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    code, _, err = run(capsys, "ds", "--data-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "ds cannot be read as a dataset saved by the datasets library" in err
    write_rows(tmp_path, "dsbad", "saved", [{"text": "ok"}, {"text": None}])
    code, _, err = run(capsys, "dsbad", "--data-dir", tmp_path)
    assert code == 2 and 'dsbad, row 2: "text" is a JSON null, not a string' in err
    write_rows(tmp_path, "dsq", "saved", [{"q": "1"}])
    code, _, err = run(capsys, "dsq", "--data-dir", tmp_path, "--column", "a")
    assert code == 2 and 'dsq has no field "a" (COLUMN=a); its fields are "q"' in err
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.idx"))


@pytest.mark.parametrize("name,module,package,kind", [
    ("x.parquet", "pyarrow.parquet", "pyarrow", "a Parquet file"),
    ("x.arrow", "datasets", "datasets", "an Arrow shard of the datasets library"),
    ("ds", "datasets", "datasets", "a dataset saved by the datasets library"),
])
def test_missing_optional_package_is_one_line_with_the_install_command(tmp_path, capsys, failing_import, name,
                                                                        module, package, kind):
    if name == "ds":
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    else:
        (tmp_path / name).write_bytes(b"PAR1")
    failing_import(module, ModuleNotFoundError(f"No module named '{package}'"))
    code, out, err = run(capsys, name, "--data-dir", tmp_path)
    assert code == 2
    assert err == (f"error: {tmp_path / name} is {kind}: reading it needs the package {package}, which is not "
                   f"installed. Fix: pip install {package}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_cpu_install_without_pyarrow_or_datasets_still_tokenizes(tmp_path):
    """Neither package is imported unless a file needs it: with both missing, .jsonl, .csv, .txt and folders work and
    the web page's actions load."""
    write_rows(tmp_path, "a", "csv", ROWS["alpaca"])
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d", "b", "jsonl", ROWS["text"])
    code = ("import sys; sys.modules['pyarrow'] = sys.modules['datasets'] = None\n"
            "from tools import make_tokenize; import webui.actions\n"
            f"make_tokenize.main(['a.csv', '--data-dir', {str(tmp_path)!r}])\n"
            f"make_tokenize.main(['d', '--data-dir', {str(tmp_path)!r}])\n"
            "assert 'pyarrow' not in sys.modules or sys.modules['pyarrow'] is None\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.bin").is_file() and (tmp_path / "d.bin").is_file()


def test_web_page_lists_and_tokenizes_files_and_folders(tmp_path, monkeypatch, trie):
    from webui import actions
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    (data / "docs" / "a.txt").write_text("a document ✓", encoding="utf-8")
    write_rows(data, "notes", "csv", [{"id": "1", "body": "from the body"}])
    (data / "x.pdf").write_bytes(b"%PDF")
    (data / ".hidden").mkdir()
    assert actions.list_sources() == [("notes.csv", "notes.csv"), ("docs/", "docs")]
    text, prefix = actions.tokenize("docs")
    assert prefix == Path("data/docs") and "read 1 items from data/docs/ (1 file, " in text
    same_ids(data / "docs", ["a document ✓"], trie)
    text, prefix = actions.tokenize("notes.csv", column=" body ")       # spaces around it, as typed in a form
    same_ids(data / "notes", ["from the body"], trie)
    for bad, says in (("x.pdf", "'x.pdf' is not a data file or folder"), (".hidden", "is not a data file"),
                      ("../../etc/passwd", "is not a data file or folder")):
        with pytest.raises(Exception, match=says):
            actions.tokenize(bad)
