"""LOSS_MASK=qa on known strings: the exact tokens trained, and the character→token mapping rules."""
import numpy as np
import pytest

from trainer.data.masks import qa_char_mask, qa_token_mask, token_bytes_table, token_mask_from_char_mask
from trainer.data.tokenizer import get_tokenizer

QA = "User: hi\n\nAssistant: hello there\n\nUser: bye\n\nAssistant: ok"
SYS = "System: be nice\n\nUser: hi\n\nAssistant: hello there\n\nUser: bye\n\nAssistant: ok"


def trained_pieces(ids, mask, tb):
    return [tb(i) for i, m in zip(ids, mask) if m]


def test_qa_mask_exact_tokens():
    tok = get_tokenizer()
    ids = tok.encode(QA) + [0]
    # the ids of the RWKV world vocabulary, checked once by hand
    assert ids == [24281, 59, 4571, 261, 5585, 41693, 59, 38685, 39934, 261,
                   24281, 59, 21402, 261, 5585, 41693, 59, 4709, 0]
    tb = token_bytes_table(tok)
    assert [tb(i) for i in ids] == [b"User", b":", b" hi", b"\n\n", b"Ass", b"istant", b":", b" hello",
                                    b" there", b"\n\n", b"User", b":", b" bye", b"\n\n", b"Ass", b"istant",
                                    b":", b" ok", b""]
    mask = qa_token_mask(ids, tb)
    assert mask.dtype == np.float32
    expected = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert mask.tolist() == expected
    assert trained_pieces(ids, mask, tb) == [b" hello", b" there", b"\n\n", b" ok", b""]


def test_qa_mask_system_user_assistant():
    tok = get_tokenizer()
    ids = tok.encode(SYS) + [0]
    assert ids[:5] == [40812, 59, 4435, 31518, 261]  # "System" ":" " be" " nice" "\n\n"
    tb = token_bytes_table(tok)
    mask = qa_token_mask(ids, tb)
    assert mask.tolist() == [0] * 5 + [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_qa_char_mask_exact_text():
    m = qa_char_mask(QA)
    trained = "".join(c if f else "|" for c, f in zip(QA, m))
    assert trained == "|" * len("User: hi\n\nAssistant:") + " hello there\n\n" + \
        "|" * len("User: bye\n\nAssistant:") + " ok"
    # a System turn after an answer ends it too, and is not trained
    t = "User: a\n\nAssistant: b\n\nSystem: c\n\nAssistant: d\n\n"
    m = qa_char_mask(t)
    assert "".join(c for c, f in zip(t, m) if f) == " b\n\n d\n\n"


def test_item_ending_in_user_turn_does_not_train_end_token():
    tok = get_tokenizer()
    ids = tok.encode("User: hi\n\nAssistant: yo\n\nUser: bye") + [0]
    tb = token_bytes_table(tok)
    mask = qa_token_mask(ids, tb)
    assert trained_pieces(ids, mask, tb) == [b" yo", b"\n\n"]
    assert mask[-1] == 0


def test_markers_only_at_line_start_and_fallback():
    assert qa_char_mask("just some text, no turns at all") is None
    assert qa_char_mask("User: what does Assistant: mean?") is None  # mid-line: text, not a marker
    t = "User: hi\nAssistant: press User: to log in\n"
    m = qa_char_mask(t)
    assert "".join(c for c, f in zip(t, m) if f) == " press User: to log in\n"


class TableTok:
    """A stand-in tokenizer with a hand-made table, to place token boundaries where we want them."""

    def __init__(self, pieces):
        self.table = [b""] + [p if isinstance(p, bytes) else p.encode() for p in pieces]

    def ids(self):
        return list(range(1, len(self.table)))


def test_straddling_token_is_trained():
    # ": Hi" straddles the end of the marker and the start of the answer; "\n\nUs" straddles the end of
    # the answer and the next marker: both are trained (documented rule).
    tok = TableTok(["User: q\n\n", "Assistant", ": Hi", " there", "\n\nUs", "er: again"])
    ids = tok.ids() + [0]
    mask = qa_token_mask(ids, token_bytes_table(tok))
    assert mask.tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_character_split_across_tokens_maps_exactly():
    zh = "中".encode()  # 3 bytes
    tok = TableTok(["User: x\n", "Assistant:", " ", zh[:1], zh[1:], "!", "\n", "User:", b"\xff", " y"])
    ids = tok.ids() + [0]
    mask = qa_token_mask(ids, token_bytes_table(tok))
    # " ", the two halves of 中, "!" and "\n" are the answer; the stray 0xff byte sits in the user turn
    assert mask.tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def test_token_mask_length_mismatch_is_caught():
    with pytest.raises(ValueError):
        token_mask_from_char_mask([1, 1], "abc", np.ones(3, dtype=bool))
