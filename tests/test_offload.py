"""OFFLOAD_BLOCKS (trainer/offload.py): streamed blocks give the same losses and gradients as resident ones,
on the CPU (the slots' bookkeeping: which block's weights a slot holds when it is read) and on a GPU (the
copy stream and its events, compiled blocks, the whole trainer)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from trainer import offload
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.peft import get_method

from rwkv_ref import random_model


def _adapted(version: int, mode: str, n_layer: int = 6, seed: int = 0):
    model = random_model(version, n_layer, 64, vocab_size=97, seed=seed)
    settings = {"lora": {"r": 4, "alpha": 8}, "pissa": {"r": 4, "svd_niter": 2}, "bone": {"r": 16},
                "state": {}}[mode]
    torch.manual_seed(1)
    get_method(mode)(settings).apply(model, train_parts=())
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)          # LoRA's B starts at zero: make every adapter matter
    model.op = "torch"
    return model


def _loss_and_grads(model, ids, targets):
    loss = model(ids, targets=targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("version,mode", [(7, "lora"), (6, "lora"), (5, "state"), (7, "bone"), (6, "pissa")])
@pytest.mark.parametrize("grad_cp", [True, False])
def test_streamed_blocks_give_the_resident_models_losses_and_gradients(monkeypatch, version, mode, grad_cp):
    """Three of six blocks streamed through two slots: two training steps with a no-grad forward between
    them give exactly the losses and gradients of the same model with every block resident, and the
    slots were really reloaded (the schedule's copies plus ensure's). The tiny model's matrices are
    streamed (the size limit lowered to theirs)."""
    monkeypatch.setattr(offload, "STREAM_MIN_NUMEL", 1024)
    base = _adapted(version, mode)
    base.train()
    base.grad_cp = grad_cp
    streamed = copy.deepcopy(base)
    blocks = offload.choose_blocks(6, 3)
    assert blocks == [1, 2, 4]
    off = offload.setup(streamed, blocks, torch.device("cpu"))
    assert off is not None and streamed.offload is off and len(off.slots) == 2
    # the streamed blocks' frozen matrices are views of the two slots; the adapters are their own
    assert len(off.names) >= 4
    for b in blocks:
        for n, p in offload.streamable(streamed.blocks[b]).items():
            assert p.data_ptr() == off.slots[off._slot(b)][n].data_ptr()
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        ids = torch.randint(0, 97, (2, 24), generator=gen)
        targets = torch.randint(0, 97, (2, 24), generator=gen)
        want = _loss_and_grads(base, ids, targets)
        got = _loss_and_grads(streamed, ids, targets)
        assert torch.equal(got[0], want[0])
        assert got[1].keys() == want[1].keys()
        for n in want[1]:
            assert torch.equal(got[1][n], want[1][n]), n
        with torch.no_grad():                 # a sample between steps: another order of use
            assert torch.equal(streamed(ids[:1, :5]), base(ids[:1, :5]))
    assert off.loads > 2 * 3                  # each streamed block copied in more than once a step


def test_choose_blocks_spreads_them_and_never_takes_block_0():
    assert offload.choose_blocks(32, 0) == []
    assert offload.choose_blocks(32, 3) == [1, 11, 21]
    assert offload.choose_blocks(32, 31) == list(range(1, 32))
    assert offload.choose_blocks(32, 99) == list(range(1, 32))
    assert offload.choose_blocks(1, 2) == []


def _cfg(**kw):
    env = dict(MODEL="m.pth", DATA="d")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


def test_offload_setting_is_checked():
    assert _cfg().OFFLOAD_BLOCKS == "auto"
    assert _cfg(OFFLOAD_BLOCKS=" 6 ").OFFLOAD_BLOCKS == "6"
    assert _cfg(OFFLOAD_BLOCKS="AUTO").OFFLOAD_BLOCKS == "auto"
    with pytest.raises(UserError, match="neither auto nor a whole number"):
        _cfg(OFFLOAD_BLOCKS="-1")
    for kw, said in ((dict(FINETUNE_MODE="full"), "trains the weights"), (dict(QUANT="nf4"), "QUANT=nf4"),
                     (dict(GRAD_CP="0"), "GRAD_CP=0"), (dict(ACCELERATOR="cpu"), "ACCELERATOR=cpu"),
                     (dict(GPU_COUNT=2), "2 GPUs"), (dict(STRATEGY="deepspeed_stage_2"), "STRATEGY=deepspeed")):
        with pytest.raises(UserError, match=said):
            _cfg(OFFLOAD_BLOCKS=4, **kw)
        assert _cfg(OFFLOAD_BLOCKS="auto", **kw).OFFLOAD_BLOCKS == "auto"    # auto: simply not used there
        assert _cfg(OFFLOAD_BLOCKS=0, **kw).OFFLOAD_BLOCKS == "0"


def _project(root, version: int, n_layer: int = 6):
    import numpy as np

    from trainer import checkpoint
    from trainer.data.binidx import write_binidx
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    model = random_model(version, n_layer, 64, vocab_size=97, seed=3)
    checkpoint.save_atomic(model.state_dict(), root / "model" / "tiny.pth")
    rng = np.random.default_rng(1)
    write_binidx(root / "data" / "toy", [list(rng.integers(1, 97, size=rng.integers(12, 30))) + [0]
                                          for _ in range(8)])


def _streaming_project(tmp_path, monkeypatch) -> dict:
    """A 6-block RWKV-7 project in tmp_path (its matrices streamable: the size limit lowered), and a dict
    that offload.setup fills with the last model and BlockOffload it made."""
    monkeypatch.setattr(offload, "STREAM_MIN_NUMEL", 1024)
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, 7)
    seen: dict = {}
    setup = offload.setup

    def recording(model, blocks, device, dtype=None):
        seen["off"], seen["model"] = setup(model, blocks, device, dtype), model
        return seen["off"]
    monkeypatch.setattr(offload, "setup", recording)
    return seen


def _train_cfg(**kw):
    env = dict(MODEL="tiny.pth", DATA="toy", OUTPUT="output", FINETUNE_MODE="lora", LORA_R="4", LORA_ALPHA="8",
               CTX_LEN="24", MICRO_BSZ="2", EPOCH_STEPS="4", EPOCH_COUNT="1", PRECISION="fp32", LR_INIT="1e-2",
               LR_FINAL="1e-2", OP="chunk", GRAD_CP="1", SAMPLE_PROMPT="ab", OFFLOAD_BLOCKS="0")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


@pytest.mark.parametrize("mode,extra", [("lora", {}), ("state", {}),
                                        ("lora", {"TRAIN_TYPE": "infctx", "CHUNK_CTX": "8"})])
def test_trainer_with_streamed_blocks_trains_as_without(tmp_path, monkeypatch, mode, extra):
    """The whole trainer (loading those blocks into CPU memory, the method on them, training, saving, the
    sample at the end) with 3 of 6 blocks streamed gives the losses of the run without, step by step; also
    with infctx (each chunk recomputed in the backward pass, the state's gradient carried). On the CPU only
    through the count (a number is refused off a GPU; the plan's count is forced here): what streaming
    changes is the same."""
    from trainer import loop
    from trainer import plan as planning
    seen = _streaming_project(tmp_path, monkeypatch)
    runs = []
    for n in (0, 3):
        monkeypatch.setattr(planning, "_offload_number", lambda cfg, sizes, machine, precision, n=n: n)
        logs = []
        runs.append(loop.train(_train_cfg(FINETUNE_MODE=mode, OUTPUT=f"out{n}", **extra), log=logs.append,
                               progress=False).losses)
    off = seen["off"]
    # two copies a step at least: block 4 in the forward pass, block 1 after 4's backward
    assert off is not None and off.order == [1, 2, 4] and off.loads >= 2 + 2 * len(runs[1])
    assert any(line.startswith("OFFLOAD_BLOCKS: blocks 1, 2, 4 (3 of 6)") for line in logs)
    assert len(runs[0]) == 4 and runs[1] == pytest.approx(runs[0], rel=1e-6, abs=1e-7)


def _sizes(cfg):
    from trainer.checkpoint import detect_config, load_checkpoint
    return detect_config(load_checkpoint(cfg.model_path), cfg.model_path)


def _gpu(**kw):
    """A GPU as Machine.probe finds it (probed: the settings are checked against it, and refused with the fix)."""
    from trainer.plan import Machine
    return Machine(probed=True, **kw)


def test_a_number_is_refused_off_a_gpu_and_beyond_the_models_blocks(tmp_path, monkeypatch):
    """plan.resolve on the machine at hand (a probed one) refuses what cannot run, and takes OFFLOAD_BLOCKS=auto's
    count from its search (OFFLOAD_BLOCKS: the plan's blocks are what loop.prepare streams)."""
    from trainer import memory
    from trainer import plan as planning
    from trainer.plan import Machine, resolve
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, 7)
    cfg = _train_cfg(OFFLOAD_BLOCKS=3)
    sizes = _sizes(cfg)
    assert sizes.n_layer == 6
    with pytest.raises(UserError, match="this run is on the cpu"):
        resolve(cfg, sizes, Machine.probe(torch.device("cpu")))
    assert resolve(cfg, sizes, _gpu(), op="chunk").offload == 3     # (op given: a CPU build checks no GPU op)
    with pytest.raises(UserError, match="at most 5"):
        resolve(_train_cfg(OFFLOAD_BLOCKS=6), sizes, _gpu(), op="chunk")
    auto = _train_cfg(OFFLOAD_BLOCKS="auto")
    # the plan's auto choice (its search forced to 4 blocks, as the old test handed in an estimate planning 4)
    monkeypatch.setattr(planning, "_search_offload", lambda plan: dataclasses.replace(plan, offload=4))
    assert resolve(auto, sizes, _gpu(free=80 * 2**30), op="chunk").offload == 4
    assert resolve(auto, sizes, Machine.probe(torch.device("cpu"))).offload == 0
    # no plan of the memory (free memory not read, or the estimate failed: estimate None): nothing streamed
    assert resolve(auto, sizes, _gpu(), op="chunk").offload == 0

    def broken(plan, sizes):
        raise RuntimeError("a bug in the estimate")
    monkeypatch.setattr(memory, "estimate", broken)
    plan = resolve(auto, sizes, _gpu(free=80 * 2**30), op="chunk")
    assert plan.estimate is None and plan.offload == 0


def test_streamed_weights_must_fit_in_the_cpu_memory_available(tmp_path, monkeypatch):
    """A number whose blocks would not fit in HOST_FRACTION of MemAvailable is refused with the most that
    fit; auto streams only as many (none where fewer than three fit: two slots stay on the GPU)."""
    from trainer import advice, memory
    from trainer import device as gpu
    from trainer import plan as planning
    from trainer.plan import nominal, resolve
    monkeypatch.setattr(offload, "STREAM_MIN_NUMEL", 1024)       # the tiny model's matrices
    monkeypatch.chdir(tmp_path)
    _project(tmp_path, 7, n_layer=8)
    cfg = _train_cfg(OFFLOAD_BLOCKS=6, PRECISION="bf16")
    sizes = _sizes(cfg)
    per = planning.offload_host_bytes(cfg, sizes, "bf16")
    model = random_model(7, 8, 64, vocab_size=97, seed=3)
    get_method("lora")({"r": 4, "alpha": 8, "dropout": 0.0}).apply(model)
    assert per == 2 * sum(p.numel() for p in offload.streamable(model.blocks[1]).values()) > 0
    HF = planning.HOST_FRACTION
    # the CPU memory available is what Machine.probe read (device.host_available) when the run started
    assert resolve(cfg, sizes, _gpu(host=int(6 * per / HF) + 1), op="chunk").offload == 6
    with pytest.raises(UserError) as e:
        resolve(cfg, sizes, _gpu(host=int(4.5 * per / HF)), op="chunk")
    assert "OFFLOAD_BLOCKS=6 keeps" in e.value.message and "OFFLOAD_BLOCKS=4 fits there" in e.value.message
    assert "at most 4" in e.value.fix and ".wslconfig" in e.value.fix
    with pytest.raises(UserError, match="OFFLOAD_BLOCKS=2 fits"):
        resolve(cfg, sizes, _gpu(host=int(2.5 * per / HF)), op="chunk")
    # auto: the plan streams no more than fit there (none where fewer than three would)
    auto = _train_cfg(OFFLOAD_BLOCKS="auto", PRECISION="bf16")
    assert planning.offload_host_limit(auto, sizes, "bf16", int(4.5 * per / HF)) == 4
    resident = nominal(auto, sizes, op="fla").estimate
    tight = resident.total - 3.5 * per          # fits with six blocks streamed (two stay in the slots)
    free = tight / memory.FIT_FRACTION
    assert resolve(auto, sizes, _gpu(free=free), op="fla").offload == 6
    assert resolve(auto, sizes, _gpu(free=free, host=int(4.5 * per / HF)), op="fla").offload == 4   # 4 fit there
    kept = resolve(auto, sizes, _gpu(free=free, host=int(2.5 * per / HF)), op="fla")                # 2 fit there
    assert kept.offload == 0 and kept.estimate.terms == resident.terms      # the plan without streaming
    # the pre-flight's suggestions offer no more than fit either
    zero = _train_cfg(OFFLOAD_BLOCKS=0, PRECISION="bf16")
    offers = lambda: sorted(c[0]["OFFLOAD_BLOCKS"] for c in advice._candidates(nominal(zero, sizes))  # noqa: E731
                            if "OFFLOAD_BLOCKS" in c[0])
    monkeypatch.setattr(gpu, "host_available", lambda: int(4.5 * per / HF))
    assert offers() == [4]
    monkeypatch.setattr(gpu, "host_available", lambda: None)
    assert offers() == [4, 7]
    # MemAvailable as Linux (and WSL2's VM) reports it
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.undo()
    assert gpu.host_available(str(meminfo)) == 20000000 * 1024
    assert gpu.host_available(str(tmp_path / "none")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,compile_", [("bone", "1"), ("state", "1"), ("bone", "0")])
def test_gpu_streamed_blocks_train_as_resident_ones(tmp_path, monkeypatch, mode, compile_):
    """On a GPU, bf16, our Triton op, compiled blocks or not: OFFLOAD_BLOCKS=3 of 6 (copies on the second
    stream, page-locked memory, the backward's hooks) gives the losses of OFFLOAD_BLOCKS=0 step by step
    (Bone and state start from zeros: the same start wherever the adapters are made), the streamed
    matrices are views of the two GPU slots (bf16) and their copies in CPU memory are page-locked."""
    from trainer import loop
    seen = _streaming_project(tmp_path, monkeypatch)
    runs = []
    for n in (0, 3):
        cfg = _train_cfg(FINETUNE_MODE=mode, OUTPUT=f"out{n}", ACCELERATOR="cuda", OP="triton", PRECISION="bf16",
                         COMPILE=compile_, OFFLOAD_BLOCKS=n, DISHA_R="16", LR_INIT="1e-3", LR_FINAL="1e-3")
        runs.append(loop.train(cfg, log=lambda *_: None, progress=False).losses)
    off, model = seen["off"], seen["model"]
    assert off.pinned and off.copy_stream is not None and off.order == [1, 2, 4]
    for b in off.order:
        for n, p in offload.streamable(model.blocks[b]).items():
            assert p.is_cuda and p.dtype == torch.bfloat16
            assert p.data_ptr() == off.slots[off._slot(b)][n].data_ptr()
        assert all(t.is_pinned() for t in off.host[b].values())
    assert off.loads >= 2 + 2 * len(runs[1])
    assert len(runs[0]) == 4
    assert runs[1] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)
