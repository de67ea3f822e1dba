"""binidx: round trip, byte layout checked by a reader written from the format, atomic writes, errors."""
import os
import struct

import numpy as np
import pytest

from trainer.data.binidx import BinIdx, write_binidx
from trainer.errors import UserError


def _items(seed=0, n=50):
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, 65536, size=int(rng.integers(0, 300))).astype(np.uint16) for _ in range(n)]
    items[3] = np.zeros(0, dtype=np.uint16)                  # an empty item
    items[4] = [1, 2, 3, 65535, 0]                           # a plain list
    items[5] = np.array([7, 8, 9], dtype=np.int64)           # another integer dtype
    return items


def read_by_the_format(prefix):
    """An independent reader from the format description (formats.md), nothing shared with ours."""
    with open(f"{prefix}.idx", "rb") as f:
        idx = f.read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", idx[9:17])
    code, = struct.unpack("<B", idx[17:18])
    n, n_doc = struct.unpack("<QQ", idx[18:34])
    pos = 34
    sizes = struct.unpack(f"<{n}i", idx[pos:pos + 4 * n]); pos += 4 * n
    pointers = struct.unpack(f"<{n}q", idx[pos:pos + 8 * n]); pos += 8 * n
    doc_idx = struct.unpack(f"<{n_doc}q", idx[pos:pos + 8 * n_doc]); pos += 8 * n_doc
    assert pos == len(idx), "no trailing bytes"
    with open(f"{prefix}.bin", "rb") as f:
        data = f.read()
    items = [list(struct.unpack(f"<{s}H", data[p:p + 2 * s])) for s, p in zip(sizes, pointers)]
    return version, code, list(sizes), list(pointers), list(doc_idx), items, len(data)


def test_round_trip_and_layout(tmp_path):
    items = _items()
    prefix = tmp_path / "d"
    write_binidx(prefix, iter(items))
    expected = [list(map(int, x)) for x in items]

    version, code, sizes, pointers, doc_idx, got, nbytes = read_by_the_format(prefix)
    assert (version, code) == (1, 8)
    assert sizes == [len(x) for x in expected]
    assert pointers == list(np.concatenate([[0], np.cumsum(sizes)[:-1]]) * 2)
    assert doc_idx == list(range(len(items) + 1))
    assert got == expected and nbytes == 2 * sum(sizes)

    ds = BinIdx(prefix)
    assert len(ds) == len(items) and ds.total_tokens == sum(sizes)
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == sizes
    assert ds.pointers.tolist() == pointers and ds.doc_idx.tolist() == doc_idx
    for i, x in enumerate(expected):
        assert ds[i].dtype == np.uint16 and ds[i].tolist() == x
    assert ds[-1].tolist() == expected[-1]
    assert ds.tokens.dtype == np.uint16 and ds.tokens.tolist() == [t for x in expected for t in x]
    assert ds.get(0, offset=5, length=10).tolist() == expected[0][5:15]
    assert ds.get(0, offset=5).tolist() == expected[0][5:]
    assert ds.get(4, offset=3, length=100).tolist() == [65535, 0]
    # a prefix given with an ending is accepted
    assert len(BinIdx(f"{prefix}.bin")) == len(BinIdx(f"{prefix}.idx")) == len(items)
    with pytest.raises(IndexError):
        ds.get(len(items))


def test_reads_files_written_as_make_data_does(tmp_path):
    """A pair written by hand the way Megatron/RWKV-LM's builder writes it, with other dtype codes."""
    docs = [[5, 6, 7, 0], [9, 0], [1, 2, 3, 4, 5, 0]]
    for code, dtype in ((8, "<u2"), (4, "<i4"), (1, "u1")):
        prefix = tmp_path / f"rwkvlm{code}"
        arr = [np.array(d, dtype=dtype) for d in docs]
        with open(f"{prefix}.bin", "wb") as f:
            for a in arr:
                f.write(a.tobytes())
        itemsize = np.dtype(dtype).itemsize
        sizes = [len(d) for d in docs]
        ptr, pointers = 0, []
        for s in sizes:
            pointers.append(ptr)
            ptr += s * itemsize
        with open(f"{prefix}.idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
            f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1))
            f.write(np.array(sizes, dtype=np.int32).tobytes())
            f.write(np.array(pointers, dtype=np.int64).tobytes())
            f.write(np.arange(len(sizes) + 1, dtype=np.int64).tobytes())
        ds = BinIdx(prefix)
        assert [ds[i].tolist() for i in range(len(ds))] == docs
        assert ds.tokens.dtype == np.dtype(dtype) and ds.total_tokens == 12


def test_empty_dataset(tmp_path):
    write_binidx(tmp_path / "e", [])
    ds = BinIdx(tmp_path / "e")
    assert len(ds) == 0 and ds.total_tokens == 0 and ds.tokens.size == 0
    assert read_by_the_format(tmp_path / "e")[4] == [0]


def _listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_on_error_and_interrupt(tmp_path, exc):
    write_binidx(tmp_path / "d", [[1, 2, 0], [3, 0]])
    before = {p: (tmp_path / p).read_bytes() for p in ("d.bin", "d.idx")}

    def failing():
        for i in range(100000):
            yield np.arange(1000, dtype=np.uint16)      # enough to have flushed data to the temp file
            if i == 5000:
                raise exc("stop")

    with pytest.raises(exc):
        write_binidx(tmp_path / "d", failing())
    assert _listing(tmp_path) == ["d.bin", "d.idx"]      # no temporaries, old pair untouched
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    with pytest.raises(exc):
        write_binidx(tmp_path / "new", failing())
    assert _listing(tmp_path) == ["d.bin", "d.idx"]


def test_bad_token_ids_write_nothing(tmp_path):
    for bad in ([1, 70000], [-1, 2], [1.5, 2.0]):
        with pytest.raises(ValueError):
            write_binidx(tmp_path / "x", [[1, 2], bad])
    assert _listing(tmp_path) == []


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=r"missing\.idx does not exist"):
        BinIdx(tmp_path / "missing")
    write_binidx(tmp_path / "d", [[1, 2, 3, 0]] * 10)
    good_idx = (tmp_path / "d.idx").read_bytes()

    (tmp_path / "d.bin").rename(tmp_path / "keep.bin")
    with pytest.raises(UserError, match=r"d\.bin does not exist \(but d\.idx does\)"):
        BinIdx(tmp_path / "d")
    (tmp_path / "keep.bin").rename(tmp_path / "d.bin")

    (tmp_path / "d.idx").write_bytes(b"{not binidx at all}" * 3)
    with pytest.raises(UserError, match=r"d\.idx is not a binidx index file"):
        BinIdx(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(good_idx[:60])
    with pytest.raises(UserError, match=r"d\.idx is truncated"):
        BinIdx(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    with pytest.raises(UserError, match="version 2"):
        BinIdx(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(good_idx)
    (tmp_path / "d.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-3])
    with pytest.raises(UserError, match=r"d\.bin is truncated"):
        BinIdx(tmp_path / "d")
