"""Tokenizer speed: our tokenizer against the rwkv package's TRIE_TOKENIZER, in one process, same file.

    python bench/tokenizer_speed.py [--mb 8] [--seed 0] [--repeats 3] [--keep FILE.jsonl]

Builds a realistic jsonl of about --mb MB (seeded): dialogues "User: ...\\n\\nAssistant: ..." and plain
texts from real English prose and code (the Python reference documentation in ``pydoc_data`` and the
standard library's sources), real Chinese / Japanese / Korean text (CPython's cjkencodings test texts)
and Chinese sentences assembled from the vocabulary's Chinese words, emoji and mixed scripts; item
lengths log-normal (median ~1.2 K characters, 40 .. 40 K). Then it times, on the same texts:
  trie        rwkv.rwkv_tokenizer.TRIE_TOKENIZER.encode per item (the reference, pure Python)
  single      our Tokenizer.encode per item (Rust, one call per item, one core)
  flat        Tokenizer.encode_flat (what make_tokenize uses: Rust encode_batch in ~1 MB slices,
              all cores, into one uint16 array)
  end-to-end  tools.make_tokenize on the file: read + validate jsonl, tokenize, write .bin/.idx, report
and, for the per-call overhead, the same text cut into short items of 30..300 characters,
and checks that every id equals TRIE_TOKENIZER's. Each path: best of --repeats rounds, interleaved.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _sources(rng: random.Random):
    import pydoc_data.topics as topics

    prose = [p.strip() for t in topics.topics.values() for p in t.split("\n\n") if len(p.strip()) > 40]
    stdlib = Path(os.__file__).parent
    code = []
    for name in ("json/decoder.py", "textwrap.py", "heapq.py", "bisect.py", "shlex.py", "csv.py",
                 "fractions.py", "statistics.py", "difflib.py", "argparse.py"):
        p = stdlib / name
        if p.is_file():
            code += [b for b in p.read_text(encoding="utf-8").split("\n\n\n") if len(b) > 80]
    cjk_real = []
    cjk_dir = stdlib / "test" / "cjkencodings"
    for name in ("gb18030-utf8.txt", "gbk-utf8.txt", "big5-utf8.txt", "euc_jp-utf8.txt", "euc_kr-utf8.txt"):
        p = cjk_dir / name
        if p.is_file():
            cjk_real += [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    from trainer.data.tokenizer import get_tokenizer
    table = get_tokenizer().table
    zh_words = []
    for b in table:
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s and all("\u4e00" <= c <= "\u9fff" for c in s):
            zh_words.append(s)
    return prose, code, cjk_real, zh_words


def make_corpus(target_bytes: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prose, code, cjk_real, zh_words = _sources(rng)
    punct = "，，，。。！？；：、"
    emoji = "😀🎉🚀👍🏽❤️🌍🔥✨🤔📚"

    def zh(n_chars):
        out, k = [], 0
        while k < n_chars:
            if cjk_real and rng.random() < 0.15:
                w = rng.choice(cjk_real)
            else:
                w = rng.choice(zh_words)
            out.append(w)
            k += len(w)
            if rng.random() < 0.18:
                out.append(rng.choice(punct))
        return "".join(out) + "。"

    def en(n_chars):
        out, k = [], 0
        while k < n_chars:
            p = rng.choice(code) if rng.random() < 0.12 else rng.choice(prose)
            if p in code:
                p = "```python\n" + p + "\n```"
            out.append(p)
            k += len(p)
        return "\n".join(out)

    def body(n):
        r = rng.random()
        if r < 0.55:
            return en(n)
        if r < 0.85:
            return zh(n // 2)        # CJK: about 3 bytes a character
        mixed = en(n // 2) + " " + zh(n // 4)
        return mixed + " " + "".join(rng.choice(emoji) for _ in range(rng.randint(0, 5)))

    texts, size = [], 0
    while size < target_bytes:
        n = int(min(40000, max(40, rng.lognormvariate(7.1, 1.0))))   # median ~1.2 K characters
        if rng.random() < 0.7:
            turns = rng.randint(1, 3)
            parts = []
            for _ in range(turns):
                q = body(max(20, n // 6))[: max(20, n // 4)]
                parts += [f"User: {q}", f"Assistant: {body(n // turns)}"]
            t = "\n\n".join(parts)
        else:
            t = body(n)
        texts.append(t)
        size += len(t.encode("utf-8"))
    return texts


def _time_paths(paths: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each path over ``repeats`` interleaved rounds (a burst of load from other
    processes then hits every path alike), and the CPU time (all threads) of that best run."""
    best = {name: float("inf") for name in paths}
    cpu = {}
    for _ in range(repeats):
        for name, fn in paths.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            if t < best[name]:
                best[name], cpu[name] = t, c
    return best, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", help="also save the generated jsonl here")
    args = ap.parse_args(argv)

    import numpy as np
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    from trainer.data.tokenizer import Tokenizer, get_tokenizer, vocab_file
    from tools import make_tokenize

    texts = make_corpus(int(args.mb * 1e6), args.seed)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    cjk = sum(1 for t in texts for c in t if "\u3000" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af")
    lens = sorted(len(t) for t in texts)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"Python {platform.python_version()}, load average before: {os.getloadavg()[0]:.2f}")
    print(f"corpus: {len(texts)} items, {nbytes / 1e6:.2f} MB UTF-8, {cjk} CJK characters, item length "
          f"(characters) median {lens[len(lens) // 2]}, p95 {lens[int(len(lens) * 0.95)]}, max {lens[-1]}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench.jsonl"
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                       encoding="utf-8")
        if args.keep:
            Path(args.keep).write_bytes(src.read_bytes())

        t0 = time.perf_counter()
        trie = TRIE_TOKENIZER(str(vocab_file()))
        trie_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        Tokenizer()                      # a fresh load (get_tokenizer's copy was loaded above)
        our_load = time.perf_counter() - t0
        tok = get_tokenizer()

        ref = [trie.encode(t) for t in texts]
        ntok = sum(len(r) for r in ref)
        single = [tok.encode(t) for t in texts]
        assert single == ref, "single-call ids differ from TRIE_TOKENIZER"
        del single
        flat, offsets = tok.encode_flat(texts, eof=False, progress=False)
        assert np.array_equal(flat, np.concatenate([np.asarray(r, dtype=np.uint16) for r in ref])), \
            "encode_flat ids differ from TRIE_TOKENIZER"
        assert np.array_equal(np.diff(offsets), [len(r) for r in ref])
        del flat, offsets, ref

        def e2e():
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                assert make_tokenize.main([str(src)]) == 0

        paths = {
            "trie (rwkv TRIE_TOKENIZER.encode)": lambda: [trie.encode(t) for t in texts],
            "single (Tokenizer.encode per item)": lambda: [tok.encode(t) for t in texts],
            "flat (Tokenizer.encode_flat)": lambda: tok.encode_flat(texts, eof=True, progress=False),
            "end-to-end tools.make_tokenize": e2e,
        }
        best, cpu = _time_paths(paths, args.repeats)

    t_trie = best["trie (rwkv TRIE_TOKENIZER.encode)"]
    rows = list(best.items())
    print(f"tokens: {ntok}  (ids identical to TRIE_TOKENIZER: yes)")
    print(f"load: TRIE_TOKENIZER {trie_load:.2f} s, ours {our_load:.2f} s (not in the times below)")
    print(f"{'path':<40} {'seconds':>8} {'MB/s':>8} {'Mtok/s':>8} {'x trie':>7} {'CPU s':>7}")
    for name, t in rows:
        print(f"{name:<40} {t:8.3f} {nbytes / 1e6 / t:8.2f} {ntok / 1e6 / t:8.3f} {t_trie / t:7.1f} "
              f"{cpu[name]:7.3f}")

    # The same text cut into short items (30..300 characters, one-line Q&A style): per-call overhead.
    rng = random.Random(args.seed + 1)
    blob, short, pos = "\n".join(texts), [], 0
    while pos < len(blob) and len(short) < 40000:
        n = rng.randint(30, 300)
        short.append(blob[pos:pos + n])
        pos += n
    sbytes = sum(len(t.encode("utf-8")) for t in short)
    sref = [trie.encode(t) for t in short]
    assert tok.encode_batch(short) == sref
    stok = sum(len(r) for r in sref)
    spaths = {
        "trie (rwkv TRIE_TOKENIZER.encode)": lambda: [trie.encode(t) for t in short],
        "single (Tokenizer.encode per item)": lambda: [tok.encode(t) for t in short],
        "flat (Tokenizer.encode_flat)": lambda: tok.encode_flat(short, eof=True, progress=False),
    }
    sbest, scpu = _time_paths(spaths, args.repeats)
    print(f"short items: {len(short)} items of 30..300 characters, {sbytes / 1e6:.2f} MB, {stok} tokens "
          f"(ids identical: yes)")
    for name, t in sbest.items():
        print(f"{name:<40} {t:8.3f} {sbytes / 1e6 / t:8.2f} {stok / 1e6 / t:8.3f} "
              f"{sbest['trie (rwkv TRIE_TOKENIZER.encode)'] / t:7.1f} {scpu[name]:7.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
