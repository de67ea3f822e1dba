"""DATALOAD get / pad / only: shapes, shift, masks, epoch coverage, reproducibility, rank split."""
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trainer.data.binidx import BinIdx, write_binidx
from trainer.data.dataset import (EpochSampler, QAFallbackWarning, collate, data_facts, get_fits,
                                  items_per_epoch, items_without_assistant, make_dataset, preview)
from trainer.data.masks import qa_token_mask, token_bytes_table
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError

QA = "User: hi\n\nAssistant: hello there\n\nUser: bye\n\nAssistant: ok"


def numbered_items(n, seed=0, lo=2, hi=20):
    """Item i: tokens [1000+i, 1000+i, ..., 0] of random length; the first token names the item."""
    rng = np.random.default_rng(seed)
    return [np.array([1000 + i] * int(rng.integers(lo - 1, hi)) + [0], dtype=np.uint16) for i in range(n)]


@pytest.fixture
def make_bi(tmp_path):
    count = [0]

    def make(items):
        count[0] += 1
        prefix = tmp_path / f"d{count[0]}"
        write_binidx(prefix, items)
        return BinIdx(prefix)

    return make


def check_shift(s):
    inp, tgt = s["input_ids"], s["targets"]
    assert inp.dtype == torch.int64 and tgt.dtype == torch.int64 and s["mask"].dtype == torch.float32
    assert inp.shape == tgt.shape == s["mask"].shape and inp.dim() == 1


# ----------------------------------------------------------------------------- pad
def test_pad_shapes_shift_and_padding_mask(make_bi):
    items = [np.array([5, 6, 7, 0], np.uint16), np.arange(1, 31, dtype=np.uint16)]  # 4 and 30 tokens
    bi = make_bi(items)
    for loss_mask in ("none", "pad"):
        ds = make_dataset("pad", bi, ctx_len=8, micro_bsz=2, epoch_steps=1, seed=0, loss_mask=loss_mask)
        got = {}
        for j in range(len(ds)):
            s = ds[j]
            check_shift(s)
            assert s["input_ids"].shape == (8,)
            got[int(s["input_ids"][0])] = s
        short, long_ = got[5], got[1]
        assert short["input_ids"].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
        assert short["targets"].tolist() == [6, 7, 0, 0, 0, 0, 0, 0]
        assert short["mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # padding never counts
        # the long item is cut to CTX_LEN+1 = 9 tokens: targets are the inputs shifted by one
        assert long_["input_ids"].tolist() == list(range(1, 9))
        assert long_["targets"].tolist() == list(range(2, 10))
        assert long_["mask"].tolist() == [1] * 8


def test_pad_batches_of_any_size(make_bi):
    bi = make_bi(numbered_items(12))
    ds = make_dataset("pad", bi, ctx_len=16, micro_bsz=3, epoch_steps=4, seed=1, loss_mask="pad")
    dl = DataLoader(ds, batch_size=3, sampler=EpochSampler(ds), collate_fn=collate)
    batches = list(dl)
    assert len(batches) == 4
    again = [ds.collate([ds[j] for j in range(k, k + 3)]) for k in range(0, 12, 3)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    for b in batches:
        assert b["input_ids"].shape == b["targets"].shape == b["mask"].shape == (3, 16)
        real = b["mask"] > 0
        assert torch.equal(b["input_ids"][:, 1:][real[:, 1:]], b["targets"][:, :-1][real[:, 1:]])


def test_pad_qa_mask_follows_targets(make_bi):
    tok = get_tokenizer()
    ids = tok.encode(QA) + [0]  # 19 tokens
    bi = make_bi([np.array(ids, np.uint16)])
    ds = make_dataset("pad", bi, ctx_len=24, micro_bsz=1, epoch_steps=1, seed=0, loss_mask="qa")
    s = ds[0]
    # target k is token k+1: trained are " hello" " there" "\n\n" (tokens 7-9) and " ok" <end> (17-18)
    assert s["mask"].tolist() == [0] * 6 + [1, 1, 1] + [0] * 7 + [1, 1] + [0] * 6
    assert s["targets"][:18].tolist() == ids[1:]
    assert ds.qa_fallback_count == 0


# ----------------------------------------------------------------------------- only
def test_only_cut_to_ctx_len_no_padding(make_bi):
    items = [np.array([5, 6, 7, 0], np.uint16), np.arange(1, 31, dtype=np.uint16)]
    bi = make_bi(items)
    ds = make_dataset("only", bi, ctx_len=8, micro_bsz=1, epoch_steps=2, seed=0, loss_mask="pad")
    got = {int(ds[j]["input_ids"][0]): ds[j] for j in range(2)}
    assert got[5]["input_ids"].tolist() == [5, 6, 7] and got[5]["targets"].tolist() == [6, 7, 0]
    assert got[5]["mask"].tolist() == [1, 1, 1]
    assert got[1]["input_ids"].tolist() == list(range(1, 9))  # cut to CTX_LEN
    assert got[1]["targets"].tolist() == list(range(2, 10))
    for s in got.values():
        check_shift(s)
    with pytest.raises(UserError, match="MICRO_BSZ=1"):
        make_dataset("only", bi, ctx_len=8, micro_bsz=2, epoch_steps=1, seed=0, loss_mask="pad")


# ----------------------------------------------------------------------------- get
def test_get_windows_inside_the_data(make_bi):
    items = numbered_items(10, lo=3, hi=9)
    bi = make_bi(items)
    flat = np.concatenate(items).astype(np.int64)
    T = 16
    ds = make_dataset("get", bi, ctx_len=T, micro_bsz=4, epoch_steps=25, seed=3, loss_mask="none")
    starts = []
    for j in range(len(ds)):
        s = ds[j]
        check_shift(s)
        assert s["input_ids"].shape == (T,)
        st = ds.window_start(0, j)
        assert 0 <= st <= len(flat) - (T + 1)
        starts.append(st)
        assert s["input_ids"].tolist() == flat[st:st + T].tolist()
        assert s["targets"].tolist() == flat[st + 1:st + T + 1].tolist()
        assert s["mask"].tolist() == [1.0] * T
    assert len(set(starts)) > 20  # random, not the same window over and over
    assert max(starts) == len(flat) - (T + 1) or max(starts) > len(flat) // 2


def test_get_refuses_short_data_and_facts(make_bi):
    bi = make_bi([np.array([1, 2, 3, 0], np.uint16), np.array([4, 0], np.uint16)])
    f = data_facts(bi)
    assert (f.items, f.shortest, f.longest, f.total_tokens) == (2, 2, 4, 6)
    assert get_fits(bi, 5) and not get_fits(bi, 6)
    assert items_per_epoch(10, 2, 4) == 80
    make_dataset("get", bi, ctx_len=5, micro_bsz=1, epoch_steps=1, seed=0, loss_mask="none")[0]
    with pytest.raises(UserError, match="CTX_LEN"):
        make_dataset("get", bi, ctx_len=6, micro_bsz=1, epoch_steps=1, seed=0, loss_mask="none")


def test_get_qa_mask_spans_items(make_bi):
    tok = get_tokenizer()
    a = np.array(tok.encode(QA) + [0], np.uint16)
    b = np.array(tok.encode("no markers here at all") + [0], np.uint16)
    bi = make_bi([a, b, a])
    flat = np.concatenate([a, b, a])
    tb = token_bytes_table(tok)
    full = np.concatenate([qa_token_mask(a, tb), np.ones(len(b), np.float32), qa_token_mask(a, tb)])
    ds = make_dataset("get", bi, ctx_len=20, micro_bsz=1, epoch_steps=30, seed=0, loss_mask="qa")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for j in range(len(ds)):
            st = ds.window_start(0, j)
            s = ds[j]
            assert s["targets"].tolist() == flat[st + 1:st + 21].tolist()
            assert s["mask"].tolist() == full[st + 1:st + 21].tolist()
    assert ds.qa_fallback_count == 1 and ds.qa_fallback_items == {1}
    assert len([x for x in w if issubclass(x.category, QAFallbackWarning)]) == 1  # once per item


# ----------------------------------------------------------------------------- epochs, seeds, ranks
def item_ids(ds, epoch):
    ds.set_epoch(epoch)
    return [int(ds[j]["input_ids"][0]) - 1000 for j in range(len(ds))]


@pytest.mark.parametrize("mode", ["pad", "only"])
def test_epoch_covers_every_item_once_and_ranks_are_disjoint(make_bi, mode):
    n = 24
    bi = make_bi(numbered_items(n))
    B = 2 if mode == "pad" else 1
    W = 3
    steps = n // (B * W)
    per_rank = [make_dataset(mode, bi, 32, B, steps, seed=7, loss_mask="pad", world_size=W, rank=r)
                for r in range(W)]
    seen_orders = []
    for epoch in range(3):
        parts = [item_ids(ds, epoch) for ds in per_rank]
        allitems = sum(parts, [])
        assert sorted(allitems) == list(range(n))  # every item exactly once; ranks disjoint
        for r in range(W):
            for q in range(r + 1, W):
                assert not set(parts[r]) & set(parts[q])
        seen_orders.append(allitems)
    assert seen_orders[0] != seen_orders[1] != seen_orders[2]  # reshuffled each epoch
    assert seen_orders[0] != list(range(n))  # shuffled at all


def test_smaller_epochs_walk_through_all_items(make_bi):
    bi = make_bi(numbered_items(10))
    ds = make_dataset("pad", bi, 32, micro_bsz=1, epoch_steps=4, seed=0, loss_mask="pad")
    stream = sum((item_ids(ds, e) for e in range(5)), [])  # 20 samples = exactly two passes
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))


def test_reproducible_pure_function_of_seed_epoch_index(make_bi):
    bi = make_bi(numbered_items(16))
    for mode, B in (("pad", 2), ("only", 1), ("get", 2)):
        a = make_dataset(mode, bi, 12, B, 8 // B, seed=5, loss_mask="pad")
        b = make_dataset(mode, bi, 12, B, 8 // B, seed=5, loss_mask="pad")
        c = make_dataset(mode, bi, 12, B, 8 // B, seed=6, loss_mask="pad")
        # b is read in reverse order and after visiting other epochs: same samples
        b.set_epoch(4)
        _ = [b[j] for j in range(len(b))]
        ref = [a[(2, j)]["input_ids"].tolist() for j in range(len(a))]
        back = [b[(2, j)]["input_ids"].tolist() for j in reversed(range(len(b)))][::-1]
        assert ref == back
        other = [c[(2, j)]["input_ids"].tolist() for j in range(len(c))]
        assert ref != other
        a.set_epoch(2)
        assert [a[j]["input_ids"].tolist() for j in range(len(a))] == ref


def test_global_step_independent_of_gpu_split(make_bi):
    """The items of global step s are the same whether 2 GPUs take 1 each or 1 GPU takes 2."""
    bi = make_bi(numbered_items(12))
    one = make_dataset("pad", bi, 32, micro_bsz=2, epoch_steps=6, seed=9, loss_mask="pad")
    two = [make_dataset("pad", bi, 32, micro_bsz=1, epoch_steps=6, seed=9, loss_mask="pad",
                        world_size=2, rank=r) for r in range(2)]
    a = item_ids(one, 1)
    r0, r1 = item_ids(two[0], 1), item_ids(two[1], 1)
    for s in range(6):
        assert sorted(a[2 * s:2 * s + 2]) == sorted([r0[s], r1[s]])


def test_epoch_sampler_carries_the_epoch_and_resumes(make_bi):
    bi = make_bi(numbered_items(8))
    ds = make_dataset("pad", bi, 32, micro_bsz=2, epoch_steps=4, seed=0, loss_mask="pad")
    sampler = EpochSampler(ds)
    dl = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
    sampler.set_epoch(3)
    full = [b["input_ids"][:, 0].tolist() for b in dl]
    sampler.set_epoch(3, start=4)  # resume after two steps
    assert [b["input_ids"][:, 0].tolist() for b in dl] == full[2:]
    assert full == [[i + 1000 for i in item_ids(ds, 3)[k:k + 2]] for k in range(0, 8, 2)]


# ----------------------------------------------------------------------------- qa fallback, preview
def test_qa_fallback_counted_once_per_item(make_bi):
    tok = get_tokenizer()
    qa = np.array(tok.encode(QA) + [0], np.uint16)
    plain = np.array(tok.encode("just a story") + [0], np.uint16)
    bi = make_bi([qa, plain, plain])
    assert items_without_assistant(bi, tok) == [1, 2]
    ds = make_dataset("pad", bi, 32, micro_bsz=3, epoch_steps=1, seed=0, loss_mask="qa")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for epoch in range(3):
            ds.set_epoch(epoch)
            samples = [ds[j] for j in range(3)]
    assert ds.qa_fallback_count == 2
    assert len([x for x in w if issubclass(x.category, QAFallbackWarning)]) == 2
    for s in samples:  # the fallback item trains on all its real targets, like pad
        if int(s["input_ids"][0]) == plain[0]:
            L = len(plain) - 1
            assert s["mask"].tolist() == [1] * L + [0] * (32 - L)


def test_preview_marks_untrained_text(make_bi):
    tok = get_tokenizer()
    bi = make_bi([np.array(tok.encode(QA) + [0], np.uint16)])
    ds = make_dataset("pad", bi, 24, micro_bsz=1, epoch_steps=1, seed=0, loss_mask="qa")
    text = preview(ds[0], tok)
    assert text.splitlines()[0] == "5 of 18 target tokens trained, 6 padding positions (never trained)"
    body = "\n".join(text.splitlines()[1:-1])
    assert body == "⟦User: hi\n\nAssistant:⟧ hello there\n\n⟦User: bye\n\nAssistant:⟧ ok<end>"
    assert "⟦" in text.splitlines()[-1]  # the legend
    short = preview(collate([ds[0]]), tok, max_chars=10)
    assert "⟦User: hi\n" in short and "more characters" in short


def test_unknown_mode_and_mask_are_user_errors(make_bi):
    bi = make_bi(numbered_items(4))
    with pytest.raises(UserError, match="DATALOAD"):
        make_dataset("random", bi, 8, 1, 1, 0, "pad")
    with pytest.raises(UserError, match="LOSS_MASK"):
        make_dataset("pad", bi, 8, 1, 1, 0, "answers")


@pytest.mark.filterwarnings("ignore::trainer.data.dataset.QAFallbackWarning")
def test_pickles_by_path_and_workers_agree(make_bi):
    import pickle

    bi = make_bi(numbered_items(8, hi=200))
    ds = make_dataset("get", bi, 16, 2, 4, seed=0, loss_mask="qa")
    blob = pickle.dumps(ds)
    assert len(blob) < 4000  # the tokens are not in the pickle
    back = pickle.loads(blob)
    assert all(torch.equal(ds[j]["input_ids"], back[j]["input_ids"]) for j in range(len(ds)))
    sampler = EpochSampler(ds, epoch=2)
    dl = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=1,
                    multiprocessing_context="spawn")
    ref = [collate([ds[(2, j)], ds[(2, j + 1)]]) for j in range(0, 8, 2)]
    for got, want in zip(dl, ref):
        assert all(torch.equal(got[k], want[k]) for k in want)
