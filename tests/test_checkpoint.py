"""Loading, size detection, dtypes, errors for bad files, atomic saving, make_model."""
import os
import signal
import zipfile

import pytest
import torch

from rwkv_ref import random_model
from tools import make_model
from trainer.checkpoint import (config_from_sizes, detect_config, init_model, load_checkpoint, load_model,
                                save_atomic)
from trainer.errors import UserError, interrupt_deferred
from trainer.model import ModelConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny random checkpoint per version, fp32."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for v in (5, 6, 7):
        m = random_model(v, 2, 128, 512, seed=v)
        out[v] = d / f"v{v}.pth"
        save_atomic(m.state_dict(), out[v])
    return out


def one_line_error(fn, *words):
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ------------------------------------------------------------------------------- sizes and detection
def test_config_from_sizes_defaults():
    c = config_from_sizes(7, 12, 768)
    assert (c.ffn_dim, c.d_decay, c.d_aaa, c.d_mv, c.d_gate, c.vocab_size, c.head_size) == (3072, 64, 64, 32, 128, 65536, 64)
    c = config_from_sizes(7, 32, 4096)
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate) == (160, 160, 96, 320)
    c = config_from_sizes(6, 24, 2048)
    assert (c.ffn_dim, c.d_mix, c.d_decay) == (7168, 32, 64)
    assert (config_from_sizes(6, 32, 4096).d_mix, config_from_sizes(6, 32, 4096).d_decay) == (64, 128)
    assert config_from_sizes(5, 24, 1024).ffn_dim == 3584
    assert config_from_sizes(5, 2, 160, head_size=32).n_head == 5
    one_line_error(lambda: config_from_sizes(7, 2, 100), "100", "multiple")
    one_line_error(lambda: config_from_sizes(4, 2, 128), "version 4")


@pytest.mark.parametrize("cfg", [
    ModelConfig(5, 3, 96, 300, head_size=32, ffn_dim=320),
    ModelConfig(6, 2, 128, 77, head_size=64, ffn_dim=256, d_mix=16, d_decay=48),
    ModelConfig(7, 2, 192, 1000, head_size=64, ffn_dim=640, d_decay=40, d_aaa=24, d_mv=16, d_gate=80),
])
def test_detect_config_reads_every_size_from_shapes(cfg):
    model = init_model(cfg, seed=0)
    assert detect_config(model.state_dict(), "x.pth") == cfg


@pytest.mark.parametrize("version", [5, 6, 7])
def test_load_model_roundtrip(saved, version):
    model = load_model(saved[version])
    sd = load_checkpoint(saved[version])
    assert model.cfg.version == version and model.cfg.n_layer == 2 and model.cfg.vocab_size == 512
    assert not model.training
    msd = model.state_dict()
    assert msd.keys() == sd.keys()
    assert all(torch.equal(msd[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("version", [5, 6, 7])
def test_same_checkpoint_in_fp32_fp16_bf16(saved, tmp_path, version):
    """Saved as fp16/bf16: loads in that dtype with exactly the rounded weights; computes close to fp32;
    loaded as fp32 it equals the fp32 model with rounded weights; the state stays fp32."""
    sd32 = load_checkpoint(saved[version])
    m32 = load_model(saved[version])
    idx = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m32(idx)
    for name, dt, tol in (("fp16", torch.float16, 0.02), ("bf16", torch.bfloat16, 0.1)):
        p = tmp_path / f"{name}.pth"
        save_atomic({k: v.to(dt) for k, v in sd32.items()}, p)
        m = load_model(p)
        assert m.dtype == dt and all(t.dtype == dt for t in m.state_dict().values())
        assert all(torch.equal(m.state_dict()[k], sd32[k].to(dt)) for k in sd32)
        with torch.no_grad():
            logits, state = m.forward_with_state(idx)
        assert logits.dtype == dt
        assert all(s.dtype == torch.float32 for layer in state for s in layer)
        err = (logits.float() - ref).abs().max().item()
        assert err < tol * ref.abs().max().item(), (name, err)
        # the same file loaded as fp32 is the fp32 model with rounded weights
        up = load_model(p, dtype=torch.float32)
        rounded = m32.__class__(m32.cfg)
        rounded.load_state_dict({k: v.to(dt).float() for k, v in sd32.items()})
        with torch.no_grad():
            assert torch.allclose(up(idx), rounded(idx), atol=1e-6, rtol=0)
    assert load_model(saved[version], dtype="bf16").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- errors
def test_errors_for_bad_files(tmp_path, saved):
    missing = tmp_path / "nope.pth"
    one_line_error(lambda: load_model(missing), "nope.pth", "does not exist")
    one_line_error(lambda: load_model(tmp_path), str(tmp_path), "folder")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    one_line_error(lambda: load_model(empty), "empty.pth", "empty")
    text = tmp_path / "text.pth"
    text.write_text("hello, I am not a model\n" * 10)
    one_line_error(lambda: load_model(text), "text.pth", "not a PyTorch checkpoint")
    data = saved[7].read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 200):
        trunc = tmp_path / f"trunc{cut}.pth"
        trunc.write_bytes(data[:cut])
        one_line_error(lambda: load_model(trunc), trunc.name)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    one_line_error(lambda: load_model(lst), "list.pth", "dict of tensors")
    mixed = tmp_path / "mixed.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "epoch": 3}, mixed)
    one_line_error(lambda: load_model(mixed), "mixed.pth", "'epoch'")
    obj = tmp_path / "obj.pth"
    torch.save({"x": torch.zeros(1), "f": zipfile.ZipInfo("a")}, obj)      # an arbitrary pickled object
    one_line_error(lambda: load_model(obj), "obj.pth")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    one_line_error(lambda: load_model(other), "other.pth", "emb.weight")


def test_errors_for_wrong_layouts(tmp_path, saved):
    sd = load_checkpoint(saved[6])

    def try_sd(name, d, *words):
        p = tmp_path / name
        torch.save(d, p)
        return one_line_error(lambda: load_model(p), name, *words)

    try_sd("nokey.pth", {k: v for k, v in sd.items() if k != "blocks.1.att.gate.weight"},
           "blocks.1.att.gate.weight", "missing")
    try_sd("shape.pth", {**sd, "blocks.1.ffn.value.weight": torch.zeros(128, 100)}, "blocks.1.ffn.value.weight",
           "[128, 100]")
    try_sd("extra.pth", {**sd, "blocks.0.att.mystery": torch.zeros(1)}, "blocks.0.att.mystery", "unexpected")
    try_sd("gap.pth", {k: v for k, v in sd.items() if not k.startswith("blocks.0.")} |
           {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")},
           "layer 0")
    rwkv4 = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_decay": torch.zeros(8),
             "blocks.0.att.time_first": torch.zeros(8)}
    try_sd("rwkv4.pth", rwkv4, "older RWKV")
    # a state-tuning file alone is not a model
    try_sd("state_only.pth", {"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, "emb.weight")


def test_time_state_and_dropped_v7_layer0_keys_load(tmp_path, saved):
    sd = load_checkpoint(saved[7])
    ts = {f"blocks.{i}.att.time_state": torch.randn(2, 64, 64) for i in range(2)}
    p = tmp_path / "ts.pth"
    save_atomic({**sd, **ts}, p)
    m = load_model(p)
    assert torch.equal(m.blocks[1].att.time_state.detach(), ts["blocks.1.att.time_state"])
    one_line_error(lambda: detect_config({**sd, "blocks.0.att.time_state": torch.zeros(3, 64, 64)}, "t.pth"),
                   "time_state", "[3, 64, 64]")
    # some exporters drop layer 0's unused v0/v1/v2: the model still loads and computes the same
    q = tmp_path / "nov0.pth"
    save_atomic({k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}, q)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(q)(idx), load_model(saved[7])(idx))


# ------------------------------------------------------------------------------------------- saving
def test_save_atomic_never_leaves_half_files(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "m.pth"
    save_atomic({"a": torch.arange(5)}, p)                 # creates the folder
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask      # like a plain open(), not mkstemp's 0600
    assert torch.equal(load_checkpoint(p)["a"], torch.arange(5))
    # an object that cannot be pickled: the old file stays, no temp file is left
    with pytest.raises(Exception):
        save_atomic({"a": torch.zeros(3), "f": lambda: 0}, p)
    assert torch.equal(load_checkpoint(p)["a"], torch.arange(5))
    assert os.listdir(p.parent) == ["m.pth"]

    # Ctrl+C in the middle of writing
    real_save = torch.save

    def interrupted(obj, f, *a, **kw):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.ones(3)}, p)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(p)["a"], torch.arange(5))
    assert os.listdir(p.parent) == ["m.pth"]

    # a full disk becomes a UserError naming the file
    def full(obj, f, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    one_line_error(lambda: save_atomic({"a": torch.ones(3)}, p), "m.pth", "disk is full")
    assert os.listdir(p.parent) == ["m.pth"]


class _CtrlCWhilePickled:
    """Sends this process SIGINT while torch.save pickles it, i.e. in the middle of writing the file."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (dict, ((("sent", 1),),))


def test_ctrl_c_during_save_atomic_finishes_the_file_then_stops(tmp_path, capfd):
    p = tmp_path / "m.pth"
    save_atomic({"a": torch.arange(5)}, p)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.ones(3), "b": _CtrlCWhilePickled(), "c": torch.full((4,), 2.0)}, p)
    new = torch.load(p, weights_only=False)                # the new file, whole
    assert torch.equal(new["a"], torch.ones(3)) and new["b"] == {"sent": 1} and torch.equal(new["c"], torch.full((4,), 2.0))
    assert os.listdir(tmp_path) == ["m.pth"]
    assert "finishing the file being written first" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # Ctrl+C is back to normal
    # nested: held until the outermost block ends; reraise=False drops it
    with pytest.raises(KeyboardInterrupt):
        with interrupt_deferred():
            save_atomic({"b": _CtrlCWhilePickled()}, p)
            done = True
    assert done
    with interrupt_deferred(reraise=False):
        save_atomic({"b": _CtrlCWhilePickled()}, p)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------------------- make_model
def test_make_model_cli(tmp_path, capsys):
    out = tmp_path / "model" / "demo.pth"
    assert make_model.main(["--version", "7", "--layers", "2", "--width", "128", "--out", str(out),
                            "--vocab", "1000", "--seed", "3"]) == 0
    assert "RWKV-7" in capsys.readouterr().out
    sd = load_checkpoint(out)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())           # bf16 by default, like releases
    assert detect_config(sd, out) == config_from_sizes(7, 2, 128, 1000)
    # RWKV-LM's init, but small random output projections (every method learns on it; on zeros state tuning
    # and PiSSA cannot): --output-gain, 0 for RWKV-LM's exactly
    from trainer.model import FINETUNE_OUTPUT_GAIN
    want = init_model(config_from_sizes(7, 2, 128, 1000), seed=3, output_gain=FINETUNE_OUTPUT_GAIN).state_dict()
    assert all(torch.equal(sd[k], want[k].bfloat16()) for k in want)
    assert sd["blocks.1.att.output.weight"].any() and sd["blocks.1.ffn.value.weight"].any()
    zero = tmp_path / "zero.pth"
    make_model.main(["--version", "7", "--layers", "2", "--width", "128", "--out", str(zero), "--vocab", "1000",
                     "--seed", "3", "--output-gain", "0"])
    rwkv_lm = init_model(config_from_sizes(7, 2, 128, 1000), seed=3).state_dict()
    got = load_checkpoint(zero)
    assert all(torch.equal(got[k], rwkv_lm[k].bfloat16()) for k in rwkv_lm)
    assert not got["blocks.1.att.output.weight"].any()
    # with a gain, only the projections RWKV-LM zeroes differ from its init
    assert {k for k in rwkv_lm if not torch.equal(want[k], rwkv_lm[k])} == {
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("att.output", "ffn.value")}
    f32 = tmp_path / "f32.pth"
    make_model.main(["--version", "5", "--layers", "1", "--width", "64", "--out", str(f32), "--dtype", "fp32",
                     "--vocab", "100"])
    assert load_model(f32).dtype == torch.float32
    with pytest.raises(SystemExit) as e:
        from trainer.errors import run_cli
        run_cli(make_model.main, ["--version", "7", "--layers", "2", "--width", "100", "--out", str(f32)])
    assert e.value.code == 2
    assert "multiple" in capsys.readouterr().err
