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
from trainer.errors import UserError, run_cli

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


# ------------------------------------------------------------------------------------------ --valid
@pytest.fixture
def dup_data(tmp_path):
    """20 distinct items, 5 of them twice (25 lines)."""
    texts = [f"User: question {i}\n\nAssistant: answer {i} " + "more " * (i % 4) for i in range(20)]
    texts += texts[3:8]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    return tmp_path


def listing(folder):
    return sorted(p for p in os.listdir(folder))


def four(folder):
    return {n: (folder / n).read_bytes() for n in ("d.bin", "d.idx", "d.valid.bin", "d.valid.idx")}


def test_valid_holds_out_contents_never_trained(dup_data, capsys):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from trainer.data.tokenizer import vocab_file
    code, out, err = run(capsys, "d.jsonl", 3, "--valid", "0.2", "--data-dir", dup_data)
    assert code == 0, err
    valid, train = items_of(dup_data / "d.valid"), items_of(dup_data / "d")
    assert len({tuple(x) for x in valid}) == 4                           # round(0.2 x 20 distinct) contents
    assert len(valid) == 6 and len(train) == 3 * 19                      # 2 of the 4 are lines written twice
    assert not {tuple(x) for x in valid} & {tuple(x) for x in train}     # no copy of a held-out item trains
    copies = [train[k * 19:(k + 1) * 19] for k in range(3)]              # REPEAT copies of the rest, each shuffled
    assert sorted(copies[0]) == sorted(copies[1]) == sorted(copies[2]) and copies[0] != copies[1]
    trie = TRIE_TOKENIZER(str(vocab_file()))                             # the rwkv package's ids, each + token 0
    texts = [json.loads(line)["text"] for line in (dup_data / "d.jsonl").read_text("utf-8").splitlines()]
    assert sorted(valid + copies[0]) == sorted(trie.encode(t) + [0] for t in texts)
    assert 'VALID_DATA="d.valid"' in out and "held out 6 of the 25 items" in out
    assert "items:   57" in out and "the statistics below are of the training items only" in out
    before = four(dup_data)
    assert run(capsys, "d.jsonl", 3, "--valid", "0.2", "--data-dir", dup_data)[0] == 0
    assert four(dup_data) == before                                      # same seed: the same four files
    assert run(capsys, "d.jsonl", 3, "--valid", "0.2", "--seed", "5", "--data-dir", dup_data)[0] == 0
    assert items_of(dup_data / "d.valid") != valid


def test_valid_without_repeat_and_with_max_tokens(data, capsys):
    tok = get_tokenizer()
    lengths = np.array([len(tok.encode(t)) + 1 for t in read_items(data / "d.jsonl")])
    limit = int(np.median(lengths))
    kept = int((lengths <= limit).sum())
    code, out, _ = run(capsys, "d.jsonl", 1, limit, "--valid", "0.25", "--data-dir", data)
    held = max(1, round(0.25 * kept))                                    # the items of d are all different
    assert code == 0 and len(items_of(data / "d.valid")) == held and len(items_of(data / "d")) == kept - held
    assert max(map(len, items_of(data / "d.valid"))) <= limit            # MAX_TOKENS drops first


def test_without_valid_an_old_valid_pair_is_named_not_deleted(dup_data, capsys):
    assert run(capsys, "d.jsonl", "--valid", "0.1", "--data-dir", dup_data)[0] == 0
    old = {n: (dup_data / n).read_bytes() for n in ("d.valid.bin", "d.valid.idx")}
    code, out, _ = run(capsys, "d.jsonl", "--data-dir", dup_data)
    assert code == 0 and len(items_of(dup_data / "d")) == 25
    warning = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "d.valid.bin is from an earlier run" in warning[0]
    assert "may now be in the training data" in warning[0] and "Fix: delete" in warning[0]
    assert "--valid 0.05" in warning[0]
    assert {n: (dup_data / n).read_bytes() for n in old} == old
    (dup_data / "d.valid.bin").unlink()
    (dup_data / "d.valid.idx").unlink()
    assert "warning" not in run(capsys, "d.jsonl", "--data-dir", dup_data)[1]


@pytest.mark.parametrize("args,message", [
    (["d.jsonl", "--valid", "0"], "--valid 0 must be more than 0 and less than 1"),
    (["d.jsonl", "--valid", "1"], "--valid 1 must be more than 0 and less than 1"),
    (["d.jsonl", "--valid", "-0.1"], "--valid -0.1 must be more than 0 and less than 1"),
    (["d.jsonl", "--valid", "abc"], "--valid abc is not a number"),
    (["one.jsonl", "--valid", "0.5"], "--valid 0.5 holds items out for validation, but the data has only 1 distinct"),
    (["same.jsonl", "--valid", "0.5"], "only 1 distinct item (copies of an item count once)"),
    (["two.jsonl", "--valid", "0.9"], "--valid 0.9 would hold out 2 of the 2 distinct items"),
])
def test_bad_valid_one_line_nothing_written(data, capsys, args, message):
    write_jsonl(data / "one.jsonl", [{"text": "just one"}])
    write_jsonl(data / "same.jsonl", [{"text": "again"}] * 3)
    write_jsonl(data / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    files = listing(data)
    code, out, err = run(capsys, *args, "--data-dir", data)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1 and "Fix: " in err
    assert "Traceback" not in err and listing(data) == files


def test_room_counts_the_held_out_items_too(tmp_path, monkeypatch):
    from trainer import files
    from trainer.data.prepare import _check_room
    # 100 items of 50 tokens, REPEAT=2: 2 x (2 x 5000 + 20 x 100) + 34 = 24034 bytes; 10 held out: 1234 more
    monkeypatch.setattr(files, "free_bytes", lambda folder: 24034 + 1000)
    src = tmp_path / "d.jsonl"
    assert _check_room(src, tmp_path / "d", 5000, 100, 2) == 24034
    with pytest.raises(UserError) as exc:
        _check_room(src, tmp_path / "d", 5000, 100, 2, 500, 10)
    assert "(2 copies of 100 items, 5000 tokens each copy, 2 bytes a token and the 10 held-out items once)" \
        in exc.value.message and exc.value.fix == "lower REPEAT to at most 1"
    monkeypatch.setattr(files, "free_bytes", lambda folder: 24034 + 1234)
    assert _check_room(src, tmp_path / "d", 5000, 100, 2, 500, 10) == 25268
    (tmp_path / "d.valid.idx").mkdir()
    with pytest.raises(UserError, match=r"d\.valid\.idx is a folder"):
        _check_room(src, tmp_path / "d", 5000, 100, 2, 500, 10)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_in_the_second_write_leaves_all_four_files(dup_data, capsys, monkeypatch, exc):
    from trainer.data import binidx
    assert run(capsys, "d.jsonl", 2, "--valid", "0.2", "--data-dir", dup_data)[0] == 0
    before, files = four(dup_data), listing(dup_data)
    real, calls = binidx._write_tokens, []

    def second_fails(f, items, sizes):
        calls.append(1)
        if len(calls) < 2:
            return real(f, items, sizes)

        def some():
            for n, item in enumerate(items):
                if n == 3:
                    raise exc
                yield item
        return real(f, some(), sizes)

    monkeypatch.setattr(binidx, "_write_tokens", second_fails)
    code, out, err = run(capsys, "d.jsonl", 3, "--valid", "0.3", "--seed", "9", "--data-dir", dup_data)
    assert len(calls) == 2                                             # the valid pair was written, then the train
    if isinstance(exc, OSError):
        assert code == 2 and err.startswith("error: cannot write d.bin in ") and "disk is full" in err
        assert err.count("\n") == 1
    else:
        assert code == 130
    assert four(dup_data) == before and listing(dup_data) == files     # no temporaries, nothing changed


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_crash_between_the_moves_never_leaves_a_mismatched_pair(dup_data, capsys, monkeypatch, fail_at):
    assert run(capsys, "d.jsonl", "--valid", "0.2", "--data-dir", dup_data)[0] == 0
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == fail_at:
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run(capsys, "d.jsonl", 2, "--valid", "0.3", "--seed", "9", "--data-dir", dup_data)
    monkeypatch.setattr(os, "replace", real)
    assert code == 2 and err.startswith("error: cannot write ") and err.count("\n") == 1
    # moves: valid .bin, train .bin, valid .idx, train .idx, after both old .idx were removed
    assert [Path(p).name for p in calls] == ["d.valid.bin", "d.bin", "d.valid.idx", "d.idx"][:fail_at]
    assert not (dup_data / "d.idx").exists()                           # the training data is refused, not stale
    assert (dup_data / "d.valid.idx").exists() == (fail_at == 4)
    if fail_at == 4:
        assert len(items_of(dup_data / "d.valid")) >= 6                  # the new held-out pair, whole
    assert not [n for n in listing(dup_data) if n.endswith(".tmp")]


def test_shell_script_valid_fraction(tmp_path):
    script = REPO / "make_tokenize.sh"
    write_jsonl(tmp_path / "t.jsonl", [{"text": f"User: hi {i}\n\nAssistant: hello"} for i in range(4)])
    env = dict(os.environ, PYTHON=sys.executable, VALID_FRACTION="0.25")
    r = subprocess.run([str(script), str(tmp_path / "t.jsonl"), "2"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (len(BinIdx(tmp_path / "t.valid")), len(BinIdx(tmp_path / "t"))) == (1, 6)
    env["VALID_FRACTION"] = "abc"                                      # --valid on the command line wins
    r = subprocess.run([str(script), str(tmp_path / "t.jsonl"), "--valid", "0.5"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (len(BinIdx(tmp_path / "t.valid")), len(BinIdx(tmp_path / "t"))) == (2, 2)
    r = subprocess.run([str(script), str(tmp_path / "t.jsonl")], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --valid abc is not a number")
