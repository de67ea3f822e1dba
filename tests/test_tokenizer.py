"""The fast tokenizer gives exactly the ids of the rwkv package's TRIE_TOKENIZER, and decodes safely."""
import random

import numpy as np
import pytest

from trainer.data import tokenizer as tokmod
from trainer.data.tokenizer import VOCAB_SIZE, get_tokenizer, vocab_file


@pytest.fixture(scope="module")
def trie():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(str(vocab_file()))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def unicode_corpus() -> list[str]:
    """Edge cases first, then seeded random mixtures of every script and the odd characters."""
    rng = random.Random(1234)
    fixed = [
        "", " ", "  ", "\n", "\n\n", "\r\n", "\r\n\r\n", "a\r\nb\rc\n", "\t\t x", "\x00\x01\x7f",
        "Hello, world!", "User: hi\n\nAssistant: hello", "中文测试：你好，世界！", "日本語のテキストです。",
        "한국어 문장입니다.", "Ελληνικά русский العربية עברית हिन्दी ไทย",
        "emoji 🎉🚀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️", "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f \u1100\u1161\u11a8",
        "zero width\u200b\u200c\u200d joiners \ufeff bom", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 𠜎𠜱 supplementary planes",
        "\u00a0nbsp\u3000ideographic space", "tabs\tand\u000bvertical\u000cfeeds",
        "def f(x):\n    return x ** 2  # comment\n", "<html><body>&amp;</body></html>",
        "1234567890 3.14159 1e-9 0xFF", "''''''''''\"\"\"\"\"", "---" * 40, "###" * 50, "===" * 33,
    ]
    fixed += [" " * n for n in (3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 300, 1000)]
    fixed += ["x" + " " * n + "y" for n in (1, 2, 7, 31, 128, 200)]
    fixed += ["\n" * n for n in (3, 10, 40)] + ["\r\n" * 7, "\t" * 17]
    pools = [
        [chr(c) for c in range(0x20, 0x7F)],
        [chr(c) for c in range(0x4E00, 0x9FFF, 7)],       # CJK ideographs
        [chr(c) for c in range(0x3040, 0x30FF)],          # kana
        [chr(c) for c in range(0xAC00, 0xAD00)],          # hangul
        [chr(c) for c in range(0x0300, 0x036F)],          # combining marks
        [chr(c) for c in range(0x1F300, 0x1F6FF, 3)],     # emoji
        [chr(c) for c in range(0x0400, 0x04FF)] + [chr(c) for c in range(0x0600, 0x06FF)],
        [" ", "  ", "\n", "\r\n", "\t", "\n\n", " " * 9],
        ["，", "。", "！", "？", "、", "：", "“", "”", "…"],
        ["the ", "and ", "ing ", "tion", "Assistant", "User", "的", "是", "我们", "中国"],
    ]
    out = list(fixed)
    for _ in range(400):
        n = rng.randint(1, 120)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    for _ in range(100):   # any code point except surrogates
        out.append("".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                           for _ in range(rng.randint(1, 40))))
    return out


def test_ids_equal_trie_on_unicode_corpus(tok, trie):
    corpus = unicode_corpus()
    expected = [trie.encode(s) for s in corpus]
    assert [tok.encode(s) for s in corpus] == expected
    assert tok.encode_batch(corpus) == expected
    long_text = "\n\n".join(corpus)        # one long item crossing every boundary above
    assert tok.encode(long_text) == trie.encode(long_text)


def test_ids_equal_trie_on_every_vocabulary_entry(tok, trie):
    """Each entry that is valid UTF-8, alone and glued to its neighbour, tokenizes like TRIE_TOKENIZER."""
    texts = []
    for i in range(1, 65530):
        try:
            texts.append(trie.idx2token[i].decode("utf-8"))
        except UnicodeDecodeError:
            continue
    assert len(texts) > 60000
    pairs = [a + b for a, b in zip(texts[::2], texts[1::2])]
    for group in (texts, pairs):
        assert tok.encode_batch(group) == [trie.encode(s) for s in group]
    # a token that is a whole entry encodes to itself
    assert tok.encode(trie.idx2token[10267].decode()) == [10267]


def test_decode_round_trip_and_matches_trie(tok, trie):
    for s in unicode_corpus():
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == trie.decodeBytes(ids)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 65530, size=5000).tolist()
    assert tok.decode_bytes(ids) == trie.decodeBytes(ids)


def test_decode_never_raises_on_split_characters(tok):
    ids = tok.encode("世")
    assert ids == [10267]
    b = "世".encode("utf-8")
    byte_ids = [x + 1 for x in b]           # ids 1..256 are the single bytes 0..255
    assert tok.decode(byte_ids) == "世"
    assert tok.decode(byte_ids[:2]) == "\ufffd"
    assert tok.decode(byte_ids[1:] + tok.encode("ok")) == "\ufffd\ufffdok"
    assert tok.decode([0]) == "" and tok.decode(tok.encode("a") + [0]) == "a"   # end of document
    assert tok.decode(np.array(tok.encode("hi there"), dtype=np.uint16)) == "hi there"
    for bad in ([65536], [-1], [1, 2, 70000]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)


def test_encode_batch_and_flat_match_single_calls(tok, monkeypatch):
    texts = unicode_corpus()[:200]
    monkeypatch.setattr(tokmod, "BATCH_ITEMS", 7)     # many batch boundaries, singletons included
    monkeypatch.setattr(tokmod, "BATCH_BYTES", 300)
    single = [tok.encode(s) for s in texts]
    assert tok.encode_batch(texts) == single
    flat, offsets = tok.encode_flat(texts, eof=True)
    assert flat.dtype == np.uint16 and offsets[0] == 0 and offsets[-1] == flat.size
    for i, ids in enumerate(single):
        assert flat[offsets[i]:offsets[i + 1]].tolist() == ids + [0]
    flat2, offsets2 = tok.encode_flat(texts, eof=False, progress=True)
    assert flat2.tolist() == [t for ids in single for t in ids]
    assert np.array_equal(np.diff(offsets2), [len(x) for x in single])
    empty_flat, empty_off = tok.encode_flat([])
    assert empty_flat.size == 0 and empty_off.tolist() == [0]


def test_shared_instance_and_errors(tok):
    assert get_tokenizer() is tok
    assert tok.vocab_size == VOCAB_SIZE == 65536
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode_batch(["fine", "bad \udfff"])
    with pytest.raises(TypeError):
        tok.encode(123)


def test_joined_batches_give_each_items_own_ids():
    """encode_batch joins short items with "\\x00" (exact only because b"\\x00" is a token of its own and
    part of no other token) and splits the ids again: every item must get exactly TRIE's ids."""
    import os

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from trainer.data.tokenizer import SEPARATOR_ID, get_tokenizer
    tok = get_tokenizer()
    assert tok.table[SEPARATOR_ID] == b"\x00"
    assert not any(x and len(x) > 1 and b"\x00" in x for x in tok.table)
    trie = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    items = ["", "a", " ", "\n\n", "User: hi\n\nAssistant: hello", "中文，测试。", "🙂🙂", "x" * 300, "  end  ",
             "\r\n", "1234567"] * 37
    assert tok.encode_batch(items) == [trie.encode(x) for x in items]
    with_nul = items[:20] + ["a\x00b", "\x00"] + items[20:40]          # such a slice goes item by item
    assert tok.encode_batch(with_nul) == [trie.encode(x) for x in with_nul]
    for eof in (True, False):                      # the vectorised flat path: separators become token 0
        flat, offsets = tok.encode_flat(with_nul + items, eof=eof)
        for i, x in enumerate(with_nul + items):
            assert flat[offsets[i]:offsets[i + 1]].tolist() == trie.encode(x) + ([0] if eof else [])
