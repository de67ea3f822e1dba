"""trainer/data/split.py: content keys, the held-out rule, and ItemView read by the datasets exactly as a binidx of
the same items in the same order would be."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from trainer.data.binidx import BinIdx, write_binidx
from trainer.data.dataset import make_dataset
from trainer.data.split import (KEY_DTYPE, ItemView, content_keys, held_out, keys_of, valid_fraction)
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError

ITEMS = [[1, 2, 3, 0], [4, 5, 0], [0], [1, 2, 3, 0], [7, 8, 9, 10, 0], [65535, 0], [4, 5, 0], [1, 2, 3]]


def flat_and_offsets(items, dtype=np.uint16):
    flat = np.concatenate([np.asarray(i, dtype=dtype) for i in items])
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in items])]).astype(np.int64)
    return flat, offsets


def test_keys_equal_exactly_for_equal_ids(tmp_path):
    write_binidx(tmp_path / "d", ITEMS)
    keys = content_keys(BinIdx(tmp_path / "d"))
    assert keys.dtype == KEY_DTYPE and keys.shape == (8,)
    same = [[i for i in range(8) if keys[i] == keys[j]] for j in range(8)]
    assert same == [[0, 3], [1, 6], [2], [0, 3], [4], [5], [1, 6], [7]]      # [1,2,3] is not [1,2,3,0]
    # the key is blake2b-128 of the ids as little-endian uint16, its length in the personalisation
    want = hashlib.blake2b(np.array([4, 5, 0], "<u2").tobytes(), digest_size=16,
                           person=b"u2" + (3).to_bytes(8, "little")).digest()
    assert keys[1].tobytes() == want
    # make_tokenize's arrays in memory, other integer types, lists of arrays: the same keys
    flat, offsets = flat_and_offsets(ITEMS)
    assert np.array_equal(keys_of(flat, offsets), keys)
    assert np.array_equal(keys_of(flat.astype(np.int64), offsets), keys)
    assert np.array_equal(keys_of(flat, offsets, np.array([5, 0, 2])), keys[[5, 0, 2]])
    assert np.array_equal(content_keys([np.asarray(i, np.int32) for i in ITEMS]), keys)
    assert np.array_equal(content_keys(ItemView(BinIdx(tmp_path / "d"), [7, 3])), keys[[7, 3]])
    # ids beyond uint16 (not from a binidx) never meet a uint16 form
    big = content_keys([np.array([65536 + 1]), np.array([1]), np.array([-1]), np.array([65535])])
    assert len(set(k.tobytes() for k in big)) == 4


def test_held_out_counts_and_keeps_copies_together():
    keys = keys_of(*flat_and_offsets([[i % 10, 0] for i in range(30)]))            # 10 contents, 3 copies each
    for fraction, want in ((0.01, 1), (0.05, 1), (0.15, 2), (0.25, 2), (0.35, 4), (0.5, 5), (0.9, 9)):
        train, valid = held_out(keys, fraction, seed=42)
        assert train.dtype == valid.dtype == np.int64
        assert list(train) == sorted(train) and list(valid) == sorted(valid)
        assert sorted(np.concatenate([train, valid]).tolist()) == list(range(30))
        assert len(valid) == 3 * want                                                 # every copy goes with it
        assert not {k.tobytes() for k in keys[valid]} & {k.tobytes() for k in keys[train]}
    train, valid = held_out(keys, 0.2, seed=42)
    assert valid.tolist() == [4, 7, 14, 17, 24, 27]                                   # contents 4 and 7: fixed
    assert np.array_equal(held_out(keys, 0.2, seed=42)[1], valid)                     # the same every run
    assert held_out(keys, 0.2, seed=7)[1].tolist() == [4, 8, 14, 18, 24, 28]
    # the order of the items does not change which contents are held out
    perm = np.random.default_rng(0).permutation(30)
    assert sorted(perm[held_out(keys[perm], 0.2, seed=42)[1]].tolist()) == valid.tolist()


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_held_out_refuses_fractions_outside_0_1(fraction):
    keys = keys_of(*flat_and_offsets([[1], [2], [3]]))
    with pytest.raises(UserError) as exc:
        held_out(keys, fraction, seed=1)
    assert "must be more than 0 and less than 1" in str(exc.value) and exc.value.fix
    assert str(exc.value).startswith(f"VALID_FRACTION={fraction} ")


def test_held_out_refuses_too_few_items():
    one = keys_of(*flat_and_offsets([[1, 0], [1, 0], [1, 0]]))
    with pytest.raises(UserError, match=r"--valid 0.5 holds items out .* only 1 distinct item") as exc:
        held_out(one, 0.5, seed=1, name="--valid")
    assert exc.value.fix == "add more items to the data, or leave out --valid"
    two = keys_of(*flat_and_offsets([[1], [2]]))
    with pytest.raises(UserError, match=r"VALID_FRACTION=0.8 would hold out 2 of the 2 distinct items") as exc:
        held_out(two, 0.8, seed=1)
    assert exc.value.fix == "lower VALID_FRACTION to at most 0.5, add more items, or leave VALID_FRACTION empty"
    assert held_out(two, 0.5, seed=1)[1].size == 1                                     # round(1.0) = 1: one left
    with pytest.raises(UserError, match="no item"):
        held_out(np.zeros(0, KEY_DTYPE), 0.1, seed=1)


def test_valid_fraction_as_typed():
    assert valid_fraction(None) is None and valid_fraction("") is None and valid_fraction("  ") is None
    assert valid_fraction(" 0.05 ") == 0.05 and valid_fraction(0.5) == 0.5
    for bad, says in (("abc", "--valid abc is not a number"), ("0", "--valid 0 must be more than 0 and less than 1"),
                      ("1", "--valid 1 must be"), ("-0.1", "--valid -0.1 must be"), ("inf", "--valid inf must be")):
        with pytest.raises(UserError) as exc:
            valid_fraction(bad, "--valid")
        assert str(exc.value).startswith(says) and exc.value.fix == "give a share such as --valid 0.05 (5 % of the " \
                                                                    "items)"
    with pytest.raises(UserError, match=r"^VALID_FRACTION=x is not a number.* Fix: give a share such as "
                                        r"VALID_FRACTION=0.05"):
        valid_fraction("x")


# ------------------------------------------------------------------------------------------ ItemView
def qa_items():
    tok = get_tokenizer()
    texts = [f"User: question {i}\n\nAssistant: " + "answer " * (i % 5 + 1) for i in range(9)]
    texts[4] = "no marker here, just text " * 3
    return [np.array(tok.encode(t) + [0], np.uint16) for t in texts] + [np.array([0], np.uint16)]


def samples(ds, epochs=2):
    return [[ds.sample(e, j) for j in range(len(ds))] for e in range(epochs)]


def same_samples(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        for sa, sb in zip(ea, eb):
            assert all(torch.equal(sa[k], sb[k]) for k in ("input_ids", "targets", "mask"))


@pytest.mark.filterwarnings("ignore::trainer.data.dataset.QAFallbackWarning")
@pytest.mark.parametrize("mode,micro_bsz", [("get", 2), ("pad", 3), ("only", 1)])
@pytest.mark.parametrize("loss_mask", ["pad", "qa"])
def test_datasets_read_a_view_as_the_binidx_of_its_items(tmp_path, mode, micro_bsz, loss_mask):
    items = qa_items()
    write_binidx(tmp_path / "all", items)
    keep = [6, 1, 9, 4, 0, 3]                                # not sorted, an empty-text item and one without marker
    write_binidx(tmp_path / "some", [items[i] for i in keep])
    view = ItemView(BinIdx(tmp_path / "all"), keep)
    alone = BinIdx(tmp_path / "some")
    assert len(view) == 6 and view.total_tokens == alone.total_tokens
    assert view.sizes.tolist() == alone.sizes.tolist() and view.pointers.tolist() == alone.pointers.tolist()
    for ctx in (8, 40):
        a = make_dataset(mode, view, ctx, micro_bsz, 4, seed=3, loss_mask=loss_mask)
        b = make_dataset(mode, alone, ctx, micro_bsz, 4, seed=3, loss_mask=loss_mask)
        same_samples(samples(a), samples(b))


def test_view_tokens_join_the_items(tmp_path):
    write_binidx(tmp_path / "d", ITEMS)
    view = ItemView(BinIdx(tmp_path / "d"), [4, 2, 7, 5])
    joined = [7, 8, 9, 10, 0, 0, 1, 2, 3, 65535, 0]
    t = view.tokens
    assert len(t) == 11 and t.shape == (11,) and t.dtype == np.dtype("<u2")
    assert t[0:11].tolist() == joined and t[3:8].tolist() == joined[3:8] and t[1:3].tolist() == [8, 9]
    assert t[5:5].tolist() == [] and t[9:100].tolist() == [65535, 0] and t[::3].tolist() == joined[::3]
    assert t[6] == 1 and t[-2] == 65535 and t[np.array([10, 0, 6])].tolist() == [0, 7, 1]
    assert isinstance(t[3:8], np.ndarray) and np.asarray(t).tolist() == joined and t.max() == 65535
    assert (view.pointers // t.dtype.itemsize).tolist() == [0, 5, 6, 9] == view.offsets[:-1].tolist()
    assert [x.tolist() for x in view] == [ITEMS[4], ITEMS[2], ITEMS[7], ITEMS[5]]
    assert view[-1].tolist() == [65535, 0] and view.get(0, 1, 2).tolist() == [8, 9]
    with pytest.raises(IndexError):
        view[4]
    with pytest.raises(IndexError):
        t[11]
    with pytest.raises(IndexError):
        ItemView(BinIdx(tmp_path / "d"), [8])
    with pytest.raises(ValueError):
        ItemView(BinIdx(tmp_path / "d"), [[1]])
    empty = ItemView(tmp_path / "d", np.zeros(0, np.int64))
    assert len(empty) == 0 and empty.total_tokens == 0 and empty.tokens[0:5].tolist() == []


@pytest.mark.filterwarnings("ignore::trainer.data.dataset.QAFallbackWarning")
def test_view_pickles_by_path(tmp_path):
    items = [np.arange(1, 2000, dtype=np.uint16) for _ in range(50)]
    write_binidx(tmp_path / "big", items)
    view = ItemView(BinIdx(tmp_path / "big"), [3, 1, 4])
    blob = pickle.dumps(view)
    assert len(blob) < 2000                                              # the tokens are not in it
    back = pickle.loads(blob)
    assert back.prefix == tmp_path / "big" and back.indices.tolist() == [3, 1, 4]
    assert back.tokens[1990:2010].tolist() == view.tokens[1990:2010].tolist()
    ds = make_dataset("get", view, 16, 2, 4, seed=0, loss_mask="qa")
    blob = pickle.dumps(ds)
    assert len(blob) < 6000
    again = pickle.loads(blob)
    assert isinstance(again.data, ItemView) and len(again.data) == 3     # the view, not the whole data
    same_samples(samples(ds, 1), samples(again, 1))
