"""STRATEGY: the refusals, the DeepSpeed config, and the DeepSpeed-only parts of the loop (fp32 master
weights for saving, partitioned optimizer checkpoints, resume) against a fake engine on the CPU; a real
DeepSpeed stage 1 run on a GPU (skipped without one)."""
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.config import STRATEGIES, TrainConfig
from trainer.errors import UserError
from trainer.strategy import (DS_DIR, GRAD_CLIP, Spread, decays, deepspeed_config, deepspeed_regroup_refusal,
                              deepspeed_stage, is_offload, relaid, strategy_problems)

from rwkv_ref import random_model
from test_train import config, make_project


def cfg(**kw):
    base = TrainConfig.from_env(dict(MODEL="m.pth", DATA="d", ACCELERATOR="cuda"))
    return dataclasses.replace(base, **kw)


# ------------------------------------------------------------------------------------- rules
@pytest.mark.parametrize("kw,wsl,words", [
    (dict(STRATEGY="deepspeed_stage_2", ACCELERATOR="cpu"), False, ["needs CUDA GPUs", "STRATEGY=auto"]),
    (dict(STRATEGY="deepspeed_stage_2_offload"), True, ["WSL2", "deepspeed_stage_2 (no offload)"]),
    (dict(STRATEGY="deepspeed_stage_3_offload"), True, ["WSL2", "deepspeed_stage_3 (no offload)"]),
    (dict(STRATEGY="deepspeed_stage_3", QUANT="nf4"), False, ["QUANT=nf4", "deepspeed_stage_2"]),
])
def test_refusals_name_the_setting_and_the_fix(kw, wsl, words):
    problems = strategy_problems(cfg(**kw), wsl=wsl)
    assert len(problems) == 1
    text = " ".join(problems[0])
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_accepted_where_it_can_work(strategy):
    assert strategy_problems(cfg(STRATEGY=strategy), wsl=False) == []
    assert strategy_problems(cfg(STRATEGY=strategy, QUANT="nf4"), wsl=False) == [] or "stage_3" in strategy
    if not is_offload(strategy):
        assert strategy_problems(cfg(STRATEGY=strategy), wsl=True) == []


def test_config_validation_refuses_stage_3_with_quant():
    with pytest.raises(UserError) as e:
        TrainConfig.from_env(dict(MODEL="m.pth", DATA="d", STRATEGY="deepspeed_stage_3", QUANT="int8"))
    assert "QUANT=int8" in e.value.message


def test_deepspeed_on_the_cpu_is_refused_before_any_work():
    with pytest.raises(UserError) as e:
        Spread(cfg(STRATEGY="deepspeed_stage_1")).check_device(torch.device("cpu"))
    assert "needs CUDA GPUs" in e.value.message and "STRATEGY=auto" in e.value.fix


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    with pytest.raises(UserError) as e:
        Spread(cfg(STRATEGY="deepspeed_stage_2")).check_device(torch.device("cuda"))
    assert "pip install deepspeed" in e.value.message


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "auto"])
def test_deepspeed_config_follows_the_settings(strategy):
    c = cfg(STRATEGY=strategy, MINI_BSZ=4, MICRO_BSZ=3)
    ds = deepspeed_config(c)
    z = ds["zero_optimization"]
    assert z["stage"] == deepspeed_stage(strategy) == int(strategy.split("_")[2])
    assert ("offload_optimizer" in z) == is_offload(strategy)
    assert ("offload_param" in z) == (strategy == "deepspeed_stage_3_offload")
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_clipping"] == GRAD_CLIP
    assert "bf16" not in ds and "fp16" not in ds        # Fabric adds the precision block from PRECISION
    # AdamW's settings reach DeepSpeed inside the optimizer Spread.optimizer builds (its client optimizer: see
    # test_deepspeed_optimizers_carry_the_settings), never as a config block, from which it would build another
    assert "optimizer" not in ds and "optimizer" not in deepspeed_config(cfg(STRATEGY=strategy, WEIGHT_DECAY=0.1))


# ------------------------------------------------------------------ DeepSpeed parts, faked
class FakeEngine:
    """What the loop asks of DeepSpeed's engine, recorded."""

    def __init__(self):
        self.boundaries, self.saved, self.loaded = [], [], []

    def set_gradient_accumulation_boundary(self, b):
        self.boundaries.append(b)

    def save_checkpoint(self, d, tag, client_state, save_latest, exclude_frozen_parameters):
        assert exclude_frozen_parameters and not save_latest
        (Path(d) / tag).mkdir(parents=True, exist_ok=True)
        (Path(d) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
        self.saved.append(tag)

    def load_checkpoint(self, d, tag, **kw):
        self.loaded.append(tag)
        return d, {}


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """deepspeed.utils.safe_get_full_fp32_param: the 'master' value is the parameter + 1000 in fp32."""
    mod = types.ModuleType("deepspeed")
    utils = types.ModuleType("deepspeed.utils")
    utils.safe_get_full_fp32_param = lambda p: p.detach().float() + 1000
    mod.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", mod)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return utils


def test_master_weights_swaps_in_fp32_masters_and_puts_the_working_copy_back(fake_deepspeed):
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    lin.bias.requires_grad_(False)
    before_w, before_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    spread = Spread(cfg(STRATEGY="deepspeed_stage_2"))
    with spread.master_weights(lin):
        assert lin.weight.dtype == torch.float32
        torch.testing.assert_close(lin.weight.detach(), before_w.float() + 1000)
        torch.testing.assert_close(lin.bias.detach(), before_b)          # frozen: untouched
    assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.weight.detach(), before_w)
    with Spread(cfg(STRATEGY="auto")).master_weights(lin):              # DDP: nothing to gather
        assert torch.equal(lin.weight.detach(), before_w)


def test_deepspeed_saves_masters_and_optimizer_partitions_and_resumes_from_them(tmp_path, monkeypatch,
                                                                             fake_deepspeed):
    """RunFiles.save under a (fake) DeepSpeed: the adapter holds the fp32 masters, train_state.pth names the
    partitioned optimizer checkpoint instead of holding a state dict, older tags are removed, and resume
    loads that tag, refusing another GPU count or strategy."""
    from trainer.loop import RunFiles, prepare
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    c = dataclasses.replace(config(), STRATEGY="deepspeed_stage_2")
    prep = prepare(c, log=lambda *_: None)
    spread = Spread(c)
    spread.engine = FakeEngine()
    files = RunFiles(tmp_path / "output", prep, spread=spread)
    opt = torch.optim.AdamW([p for p in prep.model.parameters() if p.requires_grad])
    files.save(epoch=0, step_in_epoch=4, opt_step=2, micro_step=4, optimizer=opt, complete=True)
    files.save(epoch=1, step_in_epoch=4, opt_step=4, micro_step=8, optimizer=opt, complete=True)
    # a new tag each save (never the folder the committed train_state.pth names), the older one removed
    first, last = spread.engine.saved
    assert first.startswith("step-2-") and last.startswith("step-4-")
    assert sorted(p.name for p in (tmp_path / "output" / DS_DIR).iterdir()) == [last]
    state = checkpoint.load_train_state(tmp_path / "output" / "train_state.pth")
    assert state["optimizer"] is None and state["deepspeed_tag"] == last and state["world_size"] == 1
    assert state["deepspeed_files"] == {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 1}
    tensors, _ = checkpoint.load_adapter(tmp_path / "output" / "rwkv-1.pth")
    want = prep.method.adapter_state_dict(prep.model)
    key = "blocks.0.att.key.lora_B"
    torch.testing.assert_close(tensors[key], want[key].float() + 1000)   # the master, not the working copy

    spread.load_optimizer(opt, state, tmp_path / "output")
    assert spread.engine.loaded == [last]
    from trainer import resume                      # a partition file cut short: resume refuses it
    (tmp_path / "output" / DS_DIR / last / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(UserError, match="incomplete"):
        resume._check_deepspeed_files(state, tmp_path / "output")
    with pytest.raises(UserError, match="spread over 1 GPUs, this one over 2"):
        Spread(dataclasses.replace(c, GPU_COUNT=2)).load_optimizer(opt, state, tmp_path / "output")
    with pytest.raises(UserError, match="used DeepSpeed"):
        Spread(dataclasses.replace(c, STRATEGY="auto")).load_optimizer(opt, state, tmp_path / "output")
    ddp_state = {"optimizer": opt.state_dict()}
    with pytest.raises(UserError, match="did not use DeepSpeed"):
        spread.load_optimizer(opt, ddp_state, tmp_path / "output")


def test_deepspeed_backward_sets_the_boundary_and_leaves_clipping_to_deepspeed():
    spread = Spread(cfg(STRATEGY="deepspeed_stage_1"))
    spread.engine = FakeEngine()
    calls = []

    class FakeFabric:
        def backward(self, loss, **kw):
            calls.append(("backward", float(loss), kw))

        def clip_gradients(self, *a, **kw):
            raise AssertionError("DeepSpeed clips inside its step")

    class FakeOpt:
        def step(self):
            calls.append(("step",))

        def zero_grad(self, set_to_none):
            calls.append(("zero_grad",))

    for boundary in (False, True):
        spread.backward(FakeFabric(), None, torch.tensor(6.0), 3, boundary)
    spread.step(FakeFabric(), None, FakeOpt())
    assert spread.engine.boundaries == [False, True]
    assert calls == [("backward", 2.0, {"scale_wrt_gas": False})] * 2 + [("step",), ("zero_grad",)]


def test_the_optimizer_is_fused_adamw_on_a_gpu_only():
    """The fused AdamW (one kernel, no step buffer, which memory.py no longer counts) where every trained
    tensor is on a GPU and DeepSpeed does not wrap the optimizer; foreach elsewhere."""
    cpu = [torch.nn.Parameter(torch.ones(3))]
    opt = Spread(cfg(STRATEGY="auto")).optimizer(cpu, 1e-3, print)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
    groups = [{"params": cpu}]
    assert not Spread(cfg(STRATEGY="auto")).optimizer(groups, 1e-3, print).defaults.get("fused")
    if torch.cuda.is_available():
        gpu = [torch.nn.Parameter(torch.ones(3, device="cuda"))]
        assert Spread(cfg(STRATEGY="auto")).optimizer(gpu, 1e-3, print).defaults["fused"] is True
        assert Spread(cfg(STRATEGY="auto")).optimizer([{"params": gpu}], 1e-3, print).defaults["fused"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_steps_like_foreach_on_a_gpu():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    b = torch.nn.Parameter(a.detach().clone())
    fused = Spread(cfg(STRATEGY="auto")).optimizer([a], 1e-2, print)
    plain = torch.optim.AdamW([b], lr=1e-2, betas=fused.defaults["betas"], eps=fused.defaults["eps"],
                              weight_decay=0.0, foreach=True)
    for _ in range(5):
        g = torch.randn(1000, device="cuda")
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ AdamW's settings, weight decay's groups
def _tiny(mode, parts=()):
    """A one-layer RWKV-7 (64 wide, vocabulary 100) with ``mode`` applied: its trained tensors, in order."""
    from trainer.peft import get_method
    model = random_model(7, 1, 64, vocab_size=100, seed=0)
    settings = {"lora": {"r": 8, "alpha": 16}, "bone": {"r": 32}, "bat": {"r": 32}}.get(mode, {})
    get_method(mode)(settings).apply(model, train_parts=parts)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


_LN = ["blocks.0.ln0.weight", "blocks.0.ln0.bias", "blocks.0.ln1.weight", "blocks.0.ln1.bias",
       "blocks.0.ln2.weight", "blocks.0.ln2.bias"]
_TIME = [f"blocks.0.att.{n}" for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a",
                                       "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2", "r_k")]
_LINEARS = ["att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"]


def test_weight_decay_takes_the_matrices_only():
    """strategy.decays on a tiny RWKV-7: LoRA with TRAIN_PARTS="emb head ln time" decays the embedding, the head
    and LoRA's A and B, not the norms, the time-mix vectors ([1, 1, C]), RWKV-7's low-rank time-mix matrices
    (w1, a1, ...: not .weight, as in RWKV-LM) or r_k; state tuning decays nothing (time_state is [H, N, N]);
    full fine-tuning decays the embedding, the head and the linear layers' weights; Bone and Bat their blocks."""
    def split(named):
        return [n for n, p in named if decays(n, p)], [n for n, p in named if not decays(n, p)]

    lora_ab = [f"blocks.0.{t}.lora_{ab}" for t in _LINEARS for ab in "AB"]
    yes, no = split(_tiny("lora", ("emb", "head", "ln", "time")))
    assert yes == ["emb.weight", *lora_ab, "head.weight"]
    assert no == [*_LN, *_TIME, "blocks.0.att.ln_x.weight", "blocks.0.att.ln_x.bias", "blocks.0.ffn.x_k",
                  "ln_out.weight", "ln_out.bias"]
    assert split(_tiny("state")) == ([], ["blocks.0.att.time_state"])
    yes, no = split(_tiny("full"))
    assert yes == ["emb.weight", *[f"blocks.0.{t}.weight" for t in _LINEARS], "head.weight"]
    assert no == [*_LN, *_TIME, "blocks.0.att.ln_x.weight", "blocks.0.att.ln_x.bias", "blocks.0.ffn.x_k",
                  "ln_out.weight", "ln_out.bias"]
    for mode in ("bone", "bat"):
        assert split(_tiny(mode)) == ([f"blocks.0.{t}.disha" for t in _LINEARS], [])
    # by name, whatever the shape: a state is never decayed, a [1, 1, C] vector neither
    assert not decays("blocks.3.att.time_state", torch.zeros(2, 32, 32))
    assert not decays("blocks.3.att.x_r", torch.zeros(1, 1, 64)) and decays("head.weight", torch.zeros(9, 4))


def test_adamw_groups_carry_the_settings_and_decay_only_the_matrices():
    """The torch path on the CPU: WEIGHT_DECAY > 0 makes two groups (decayed, then the rest, each in the model's
    order), both with BETA1/BETA2/ADAM_EPS; a step with zero gradients moves only the decayed tensors, by exactly
    lr × WEIGHT_DECAY of themselves. WEIGHT_DECAY=0: one group of everything, as before; state tuning: one group."""
    named = _tiny("lora", ("emb", "head", "ln", "time"))
    spread = Spread(cfg(WEIGHT_DECAY=0.25, BETA1=0.8, BETA2=0.95, ADAM_EPS=1e-6))
    opt = spread.optimizer(spread.groups(named), 0.1, print)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    decayed = [p for n, p in named if decays(n, p)]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in decayed]
    assert len(opt.param_groups[1]["params"]) == len(named) - len(decayed)
    for g, wd in zip(opt.param_groups, (0.25, 0.0)):
        assert (g["weight_decay"], g["betas"], g["eps"]) == (wd, (0.8, 0.95), 1e-6)
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in named:
        want = before[n] * (1 - 0.1 * 0.25) if decays(n, p) else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
    one = Spread(cfg())
    opt = one.optimizer(one.groups(named), 0.1, print)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for _, p in named]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["eps"] == 1e-8
    state = Spread(cfg(WEIGHT_DECAY=0.25))
    assert [g["weight_decay"] for g in state.groups(_tiny("state"))] == [0.0]


def _fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_deepspeed_and_8bit_optimizers_carry_the_settings(monkeypatch):
    """DeepSpeed without offload steps torch's AdamW (its client optimizer) with the groups; with offload, its CPU
    Adam gets the groups, betas and eps (faked: DeepSpeed is not installed here); bitsandbytes' AdamW8bit too."""
    named = _tiny("lora", ("head", "ln"))
    kw = dict(WEIGHT_DECAY=0.1, BETA1=0.85, BETA2=0.97, ADAM_EPS=1e-7)
    spread = Spread(cfg(STRATEGY="deepspeed_stage_2", **kw))
    opt = spread.optimizer(spread.groups(named), 1e-3, print)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [(0.1, (0.85, 0.97), 1e-7),
                                                                                      (0.0, (0.85, 0.97), 1e-7)]

    class Recorder(torch.optim.Optimizer):
        def __init__(self, params, lr, betas, eps, weight_decay, **more):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **more))

    _fake_module(monkeypatch, "deepspeed")
    _fake_module(monkeypatch, "deepspeed.ops")
    _fake_module(monkeypatch, "deepspeed.ops.adam", DeepSpeedCPUAdam=Recorder)
    spread = Spread(cfg(STRATEGY="deepspeed_stage_2_offload", **kw))
    opt = spread.optimizer(spread.groups(named), 1e-3, print)
    assert type(opt) is Recorder and opt.defaults["adamw_mode"] is True
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [(0.1, (0.85, 0.97), 1e-7),
                                                                                      (0.0, (0.85, 0.97), 1e-7)]
    bnb = _fake_module(monkeypatch, "bitsandbytes", optim=types.SimpleNamespace(AdamW8bit=Recorder))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", bnb.optim)
    spread = Spread(cfg(OPTIMIZER="adamw8bit", **kw))
    opt = spread.optimizer(spread.groups(named), 1e-3, print)
    assert isinstance(opt, Recorder) and opt.defaults["min_8bit_size"] == 4096
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [(0.1, (0.85, 0.97), 1e-7),
                                                                                      (0.0, (0.85, 0.97), 1e-7)]


def _stepped(spread, named, steps=2):
    opt = spread.optimizer(spread.groups(named), 1e-2, print)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("before,after", [(0.0, 0.1), (0.1, 0.0), (0.1, 0.2)])
def test_resume_lays_the_saved_state_out_in_this_runs_groups(tmp_path, before, after):
    """RESUME=1 with WEIGHT_DECAY changed (0 → 0.1: one group → two, and back; and between two values) and the
    betas and eps changed: every tensor keeps its saved running means, and the groups take this run's settings
    (a loaded state dict brings the saved run's)."""
    named = _tiny("lora", ("emb", "ln"))
    saved = _stepped(Spread(cfg(WEIGHT_DECAY=before)), named)
    sd = saved.state_dict()
    spread = Spread(cfg(WEIGHT_DECAY=after, BETA1=0.7, BETA2=0.9, ADAM_EPS=1e-5))
    opt = spread.optimizer(spread.groups(named), 1e-2, print)
    spread.load_optimizer(opt, {"optimizer": sd}, tmp_path)
    assert len(opt.param_groups) == (2 if after else 1)
    assert [g["weight_decay"] for g in opt.param_groups] == ([after, 0.0] if after else [0.0])
    assert all(g["betas"] == (0.7, 0.9) and g["eps"] == 1e-5 for g in opt.param_groups)
    for _, p in named:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], saved.state[p][key]), key
    with pytest.raises(UserError, match="does not fit"):       # another set of tensors is still refused
        spread.load_optimizer(opt, {"optimizer": _stepped(Spread(cfg()), _tiny("state")).state_dict()}, tmp_path)


def test_relaid_keeps_each_tensors_state():
    saved = {"state": {0: "a", 1: "b", 3: "d"}, "param_groups": [{"lr": 1, "params": [0, 1, 2, 3]}]}
    out = relaid(saved, [[0, 1, 2, 3]], [[1, 3], [0, 2]])
    assert out["state"] == {0: "b", 1: "d", 2: "a"}
    assert [g["params"] for g in out["param_groups"]] == [[0, 1], [2, 3]] and out["param_groups"][1]["lr"] == 1
    assert relaid(out, [[1, 3], [0, 2]], [[0, 1, 2, 3]])["state"] == saved["state"]
    assert relaid(saved, [[0, 1, 2]], [[0], [1, 2]]) is saved          # counts differ: loading refuses it


def test_deepspeed_resume_refuses_weight_decay_between_zero_and_not():
    c = cfg(STRATEGY="deepspeed_stage_2", WEIGHT_DECAY=0.1)
    line = deepspeed_regroup_refusal({"WEIGHT_DECAY": "0.0"}, c)
    assert line.startswith("WEIGHT_DECAY 0.0 → 0.1") and "DeepSpeed" in line
    assert deepspeed_regroup_refusal({"WEIGHT_DECAY": "0.05"}, c) is None             # between two: fine
    assert deepspeed_regroup_refusal({"WEIGHT_DECAY": "0"}, cfg(WEIGHT_DECAY=0.1)) is None    # no DeepSpeed


# ------------------------------------------------------------------ OPTIMIZER=adamw8bit
@pytest.mark.parametrize("kw,words", [
    (dict(STRATEGY="deepspeed_stage_2"), ["OPTIMIZER=adamw8bit with STRATEGY=deepspeed_stage_2", "OPTIMIZER=adamw"]),
    (dict(ACCELERATOR="cpu"), ["needs an NVIDIA GPU", "OPTIMIZER=adamw to train on the CPU"]),
])
def test_adamw8bit_refusals_name_the_setting_and_the_fix(kw, words):
    problems = strategy_problems(cfg(OPTIMIZER="adamw8bit", **kw), wsl=False)
    assert len(problems) == 1
    for w in words:
        assert w in " ".join(problems[0])
    assert strategy_problems(cfg(OPTIMIZER="adamw", **kw), wsl=False) == []
    with pytest.raises(UserError) as e:                  # the config refuses it when training.sh is read
        TrainConfig.from_env(dict(MODEL="m.pth", DATA="d", OPTIMIZER="adamw8bit", **kw))
    assert words[0] in e.value.message
    with pytest.raises(UserError, match="OPTIMIZER='adam8'"):
        TrainConfig.from_env(dict(MODEL="m.pth", DATA="d", OPTIMIZER="adam8"))


def test_adamw8bit_needs_a_gpu_and_bitsandbytes_and_says_so(monkeypatch):
    with pytest.raises(UserError) as e:
        Spread(cfg(OPTIMIZER="adamw8bit")).check_device(torch.device("cpu"))
    assert "needs an NVIDIA GPU" in e.value.message and "OPTIMIZER=adamw" in e.value.fix
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)         # import bitsandbytes: ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(UserError) as e:
        Spread(cfg(OPTIMIZER="adamw8bit")).check_device(torch.device("cuda"))
    assert "not installed" in e.value.message and "pip install bitsandbytes" in e.value.fix
    Spread(cfg(OPTIMIZER="adamw")).check_device(torch.device("cuda"))      # the default needs nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw8bit_steps_like_adamw_on_a_gpu():
    """bitsandbytes' 8-bit AdamW with the trainer's settings: 1-byte states for a tensor of 4096 numbers or
    more, fp32 states below; ten steps move the weights as the exact AdamW does, within 2 %."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    big, small = torch.randn(64, 1024, device="cuda"), torch.randn(4095, device="cuda")
    exact_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    eight_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    exact = Spread(cfg()).optimizer(exact_p, 1e-3, print)
    eight = Spread(cfg(OPTIMIZER="adamw8bit")).optimizer(eight_p, 1e-3, print)
    assert type(eight).__name__ == "AdamW8bit"
    for _ in range(10):
        grads = [torch.randn_like(p) * 1e-2 + 3e-3 for p in exact_p]
        for a, b, g in zip(exact_p, eight_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        exact.step()
        eight.step()
    assert eight.state[eight_p[0]]["state1"].dtype == torch.uint8
    assert eight.state[eight_p[1]]["state1"].dtype == torch.float32
    for a, b, start in zip(exact_p, eight_p, (big, small)):
        moved, moved8 = a.detach() - start, b.detach() - start
        assert moved.norm() > 2e-3 * start.numel() ** 0.5           # it moved (10 steps of up to lr)
        assert (moved8 - moved).norm() < 0.02 * moved.norm()
    # the trainer's step (bitsandbytes' per-tensor update without its wait after each) gives its stock step's bits
    import bitsandbytes as bnb
    stock_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    ours_p = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())]
    stock = bnb.optim.AdamW8bit(stock_p, lr=1e-3, betas=eight.defaults["betas"], eps=eight.defaults["eps"],
                                weight_decay=0.0)
    ours = Spread(cfg(OPTIMIZER="adamw8bit")).optimizer(ours_p, 1e-3, print)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in stock_p]
        for a, b, g in zip(stock_p, ours_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        stock.step()
        ours.step()
    for a, b in zip(stock_p, ours_p):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the real thing, on a GPU
needs_deepspeed = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None,
    reason="needs a CUDA GPU and DeepSpeed")


@pytest.mark.gpu
@needs_deepspeed
@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
                                      "deepspeed_stage_2_offload"])
def test_deepspeed_trains_like_one_gpu_and_resumes(tmp_path, monkeypatch, strategy):
    """On one GPU, bf16: DeepSpeed's losses follow the plain run's within bf16 noise, the adapter file
    is the usual single file, and an interrupted DeepSpeed run resumes to the same losses."""
    from trainer.data.binidx import BinIdx
    from trainer.inference import evaluate_loss
    from trainer.loop import train
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    kw = dict(PRECISION="bf16", OP="chunk", EPOCH_STEPS=4, EPOCH_COUNT=2, MINI_BSZ=2, ACCELERATOR="cuda")
    plain = train(config(OUTPUT="plain", **kw), progress=False, log=lambda *_: None)
    ds = train(config(OUTPUT="ds", STRATEGY=strategy, **kw), progress=False, log=lambda *_: None)
    assert len(ds.losses) == len(plain.losses) == 4
    np.testing.assert_allclose(ds.losses, plain.losses, rtol=0.02)
    a, meta = checkpoint.load_adapter(tmp_path / "ds" / "rwkv-1.pth")
    b, _ = checkpoint.load_adapter(tmp_path / "plain" / "rwkv-1.pth")
    assert set(a) == set(b)
    # saved from DeepSpeed's fp32 masters, not from its bf16 working copy of the weights
    assert any(not torch.equal(t, t.bfloat16().float()) for k, t in a.items() if k.endswith("lora_B"))
    # Adam's element-wise updates of near-zero gradients differ in sign between bf16 runs, so compare
    # what matters: the trained models' losses on the data
    losses = []
    for out in ("ds", "plain"):
        model = checkpoint.load_model("model/tiny.pth", dtype=torch.float32)
        model.op = "chunk"
        checkpoint.attach_adapter(model, f"{out}/rwkv-1.pth", "model/tiny.pth")
        data = BinIdx("data/toy")
        losses.append(evaluate_loss(model, [data[i] for i in range(len(data))])["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=0.02), losses
    # interrupted after 3 micro steps (1 optimizer step), then resumed: the same losses
    part = train(config(OUTPUT="ds2", STRATEGY=strategy, **kw), progress=False, log=lambda *_: None,
                 max_steps=3)
    assert part.interrupted and (tmp_path / "ds2" / DS_DIR).is_dir()
    rest = train(config(OUTPUT="ds2", STRATEGY=strategy, RESUME=1, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_allclose(part.losses + rest.losses, ds.losses, rtol=1e-3)
