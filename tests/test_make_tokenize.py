"""The tokenize step end to end: jsonl shapes, repeat / shuffle / filter counts, the printed report,
the factor table, and every bad input giving one line, exit code 2 and no files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import make_tokenize
from trainer.data import stats
from trainer.data.binidx import BinIdx
from trainer.data.sources import read_items
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import run_cli

REPO = Path(__file__).resolve().parent.parent


def run(capsys, *args):
    """Run the entry point in this process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(make_tokenize.main, [str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path):
    objs = [{"text": f"User: question {i}\n\nAssistant: " + "answer " * (i % 13)} for i in range(30)]
    objs += [{"text": "长一点的中文文本。" * 20}]
    write_jsonl(tmp_path / "d.jsonl", objs)
    return tmp_path


def items_of(prefix):
    ds = BinIdx(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_sample_file_round_trips(tmp_path, capsys):
    src = tmp_path / "sample.jsonl"
    src.write_bytes((REPO / "data" / "sample.jsonl").read_bytes())
    texts = read_items(src)
    assert 30 <= len(texts) <= 80 and src.stat().st_size < 60_000
    assert any("\u4e00" <= c <= "\u9fff" for t in texts for c in t)            # some Chinese
    code, out, err = run(capsys, "sample.jsonl", "--data-dir", tmp_path)
    assert code == 0, err
    tok = get_tokenizer()
    got = items_of(tmp_path / "sample")
    assert all(x[-1] == 0 and 0 not in x[:-1] for x in got)
    assert sorted(tok.decode(x[:-1]) for x in got) == sorted(texts)
    for needle in ("items:   %d" % len(texts), "max_length:", "max_length_power_of_two:", "p95",
                   "suggested CTX_LEN:", "seed 42", "<- your data", "exactly once"):
        assert needle in out


def test_chat_shapes_become_dialogue_text(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\r\n\r\nThere?"},
                      {"role": "assistant", "content": "  Hello.\n\n\nYes.  "}]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "You are kind."},
        {"text": "  kept exactly as written \n\n"},
    ])
    assert read_items(src) == [
        "System: Be brief.\n\nUser: Hi!\nThere?\n\nAssistant: Hello.\nYes.",
        "User: Add the numbers.\n2 and 3\n\nAssistant: 5",
        "System: You are kind.\n\nUser: Say hi.\n\nAssistant: hi",
        "  kept exactly as written \n\n",
    ]


def test_repeat_shuffles_each_copy_reproducibly(data, capsys):
    n = 31
    code, out, _ = run(capsys, "d.jsonl", 3, "--data-dir", data)
    assert code == 0 and "seed 42" in out and f"items:   {3 * n}" in out
    first = items_of(data / "d")
    bin1 = (data / "d.bin").read_bytes()
    assert len(first) == 3 * n
    copies = [first[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(map(tuple, c)) == sorted(map(tuple, copies[0])) for c in copies)  # each copy = all items
    assert copies[0] != copies[1] and copies[1] != copies[2]                            # freshly shuffled
    assert run(capsys, "d.jsonl", 3, "--data-dir", data)[0] == 0
    assert (data / "d.bin").read_bytes() == bin1                                        # same seed, same file
    code, out, _ = run(capsys, "d.jsonl", 3, "--seed", 7, "--data-dir", data)
    assert code == 0 and "seed 7" in out and items_of(data / "d") != first


def test_max_tokens_drops_and_counts(data, capsys):
    tok = get_tokenizer()
    lengths = np.array([len(tok.encode(t)) + 1 for t in read_items(data / "d.jsonl")])
    limit = int(np.median(lengths))
    code, out, _ = run(capsys, "d.jsonl", 2, limit, "--data-dir", data)
    dropped = int((lengths > limit).sum())
    assert code == 0 and f"dropped {dropped} of {len(lengths)}" in out
    got = items_of(data / "d")
    assert len(got) == 2 * (len(lengths) - dropped) and max(map(len, got)) <= limit


def test_no_eof(data, capsys):
    code, _, _ = run(capsys, "d.jsonl", "--no-eof", "--data-dir", data)
    assert code == 0
    tok = get_tokenizer()
    got = items_of(data / "d")
    assert sorted(got) == sorted(tok.encode(t) for t in read_items(data / "d.jsonl"))


def test_every_item_dropped_is_an_error(data, capsys):
    code, _, err = run(capsys, "d.jsonl", 1, 3, "--data-dir", data)
    assert code == 2 and "every item" in err and "MAX_TOKENS=3" in err
    assert sorted(os.listdir(data)) == ["d.jsonl"]


BAD_LINES = [
    (b"", "is empty"),
    (b"\n  \n\n", "is empty"),
    (b'{"text": "ok"}\n{"text": "broken}\n', r"line 2, column 10: not valid JSON"),
    (b'{"text": "ok"}\n\n{"txt": "x"}\n', 'line 3: the object has "txt" but no "text"'),
    (b'{"text": 5}\n', 'line 1: "text" is a JSON number, not a string'),
    (b'{"text": ["a"]}\n', '"text" is a JSON array'),
    (b'["just", "a list"]\n', "line 1: the item is a JSON list, not an object"),
    (b'{"text": "ok \xff\xfe"}\n', "line 1, column 14: invalid UTF-8 byte 0xff"),
    (b'{"text": "caf\xc3\xa9"}\n{"text": "\xe4\xb8"}\n', "line 2, column 11: invalid UTF-8"),
    (b'{"text": "half an emoji \\ud83d"}\n', "unpaired surrogate"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}\n', "role 'robot'"),
    (b'{"messages": []}\n', "non-empty list"),
    (b'{"instruction": "x", "output": 3}\n', '"output" is a JSON number'),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    code, out, err = run(capsys, "bad.jsonl", "--data-dir", tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in err and "bad.jsonl" in err and "Fix:" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


@pytest.mark.parametrize("args,message", [
    (["d.jsonl", "0"], "REPEAT must be a positive whole number, got '0'"),
    (["d.jsonl", "abc"], "REPEAT must be a positive"),
    (["d.jsonl", "1.5"], "REPEAT must be a positive"),
    (["d.jsonl", "-2"], "REPEAT must be a positive"),
    (["d.jsonl", "1", "0"], "MAX_TOKENS must be a positive whole number"),
    (["d.jsonl", "1", "many"], "MAX_TOKENS must be a positive"),
    (["d.jsonl", "--seed", "x"], "--seed must be"),
    (["nothere.jsonl"], "nothere.jsonl not found (the data files in"),
    (["d.docx"], "d.docx not found"),
])
def test_bad_arguments(data, capsys, args, message):
    code, _, err = run(capsys, *args, "--data-dir", data)
    assert code == 2 and message in err and err.count("\n") == 1
    if "not found" in message:
        assert "d.jsonl" in err                      # lists what is there
    assert sorted(os.listdir(data)) == ["d.jsonl"]


def test_name_without_ending_and_path_with_folder(data, capsys):
    assert run(capsys, "d", "--data-dir", data)[0] == 0
    assert (data / "d.bin").is_file() and (data / "d.idx").is_file()
    other = data / "sub"
    other.mkdir()
    write_jsonl(other / "x.jsonl", [{"text": "hello"}])
    assert run(capsys, other / "x.jsonl", "--data-dir", data / "nowhere")[0] == 0
    assert items_of(other / "x") == [get_tokenizer().encode("hello") + [0]]


def test_factor_table_and_stats():
    for n in (1, 7, 44, 97, 360, 1009):
        rows = stats.batch_table(n)
        assert [m for m, _ in rows] == list(range(max(1, n - 10), n + 11))
        for m, divs in rows:
            assert divs == [d for d in range(1, m + 1) if m % d == 0]
    lines = stats.batch_table_lines(97)
    real = [l for l in lines if "<- your data" in l]
    assert len(real) == 1 and "97 items: 1x97  97x1" in real[0]
    assert "prime" in lines[-1] and "exactly once" in lines[-1]
    assert "24x15" in [l for l in stats.batch_table_lines(360) if "->" in l][0]   # MICRO_BSZ x EPOCH_STEPS

    lengths = np.array([5, 17, 33, 100, 1000, 31, 2, 64])
    s = stats.summary(lengths)
    assert (s.items, s.tokens, s.min, s.max) == (8, 1252, 2, 1000)
    assert s.mean == pytest.approx(156.5) and s.p95 == int(np.ceil(np.percentile(lengths, 95)))
    assert (s.max_length, s.max_length_power_of_two) == (1008, 1024)
    assert stats.summary([16]).max_length == 16 and stats.summary([17]).max_length == 32
    assert stats.summary([64]).max_length_power_of_two == 64
    hist = stats.histogram_lines(lengths)
    assert sum(int(l.split()[-1]) for l in hist) == 8
    assert stats.suggest_ctx_len(np.array([100, 120, 130]))[0] == 144
    ctx, why = stats.suggest_ctx_len(np.array([300] * 99 + [5000]))
    assert ctx == 304 and "1 longer" in why and "MAX_TOKENS=304" in why
    # RWKV-LM's rule: largest prime p <= tokens // ctx - 1 with p % 3 == 2
    assert stats.magic_prime(100 * 512, 512) == 89 and stats.magic_prime(1000, 512) is None


def test_shell_script(tmp_path):
    script = REPO / "make_tokenize.sh"
    assert os.access(script, os.X_OK)
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run([str(script), "surely_not_there.jsonl"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sample.jsonl" in r.stderr
    write_jsonl(tmp_path / "t.jsonl", [{"text": "User: hi\n\nAssistant: hello"}] * 3)
    r = subprocess.run([str(script), str(tmp_path / "t.jsonl"), "2"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(BinIdx(tmp_path / "t")) == 6
