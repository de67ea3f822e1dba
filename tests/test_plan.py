"""trainer/plan.py: one plan per run. The web page's memory panel, the dry run and the trainer show and run the same
plan; the estimate follows the plan's decisions (compiling as compile_choice decides it); the model gets the plan's
options in one call."""
import dataclasses

import pytest
import torch

from trainer import plan as planning
from trainer.checkpoint import config_from_sizes, init_model, save_atomic
from trainer.config import TrainConfig
from trainer.data.binidx import write_binidx
from trainer.memory import FIT_FRACTION, GiB
from trainer.plan import Machine, nominal, resolve

B15 = config_from_sizes(7, 24, 2048)           # RWKV-7 1.5B


def cfg_(**kw) -> TrainConfig:
    env = dict(MODEL="m.pth", DATA="d", FINETUNE_MODE="lora", CTX_LEN="4096", MICRO_BSZ="8", GRAD_CP="auto",
               PRECISION="bf16", OP="triton", COMPILE="auto")
    env.update({k: str(v) for k, v in kw.items()})
    return TrainConfig.from_env(env)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A model of 6 blocks × 256 (its matrices big enough to stream) and a little data, in a project folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    sizes = config_from_sizes(7, 6, 256, vocab_size=256)
    save_atomic(init_model(sizes).state_dict(), tmp_path / "model" / "m6.pth")
    (tmp_path / "data").mkdir()
    write_binidx(tmp_path / "data" / "toy", [list(range(1, 60)) + [0]] * 8)
    return sizes


class _Stop(Exception):
    pass


def test_the_web_page_shows_the_plan_the_trainer_runs_for_a_model_that_does_not_fit(project, monkeypatch):
    """OFFLOAD_BLOCKS=auto and GRAD_CP=auto on a GPU whose free memory holds the model only with 3 blocks streamed:
    the memory panel's plan (webui/actions.run_plan) is the one loop.prepare resolves and runs, and both print the
    same lines (the web page shows the trainer's report)."""
    from trainer import loop
    from webui import actions
    cfg = TrainConfig.from_env(dict(MODEL="m6.pth", DATA="toy", CTX_LEN="32", EPOCH_STEPS="2", OP="fla",
                                    OFFLOAD_BLOCKS="auto", GRAD_CP="auto", LORA_R="8", PRECISION="bf16"))
    sizes = project
    resident = nominal(cfg, sizes).estimate.total
    three = nominal(cfg, sizes, offload=3).estimate.total
    assert three < resident
    free = three / FIT_FRACTION * (1 + 1e-9)                # fits with 3 blocks streamed, not without
    gpu = Machine(device="cuda", name="a small GPU", free=free, host=None)
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls, device, memory_too=True: gpu))
    monkeypatch.setattr(planning, "device_for", lambda cfg: torch.device("cuda"))

    web = actions.run_plan(cfg)
    shown = actions.memory_estimate(cfg)
    assert web.offload == 3 and web.offload_blocks == [1, 2, 4]

    ran, real = {}, planning.resolve

    def recording(*args, **kwargs):
        ran["plan"] = real(*args, **kwargs)
        raise _Stop                                # the trainer's plan is made: stop before it loads to a GPU
    monkeypatch.setattr(planning, "resolve", recording)
    monkeypatch.setattr("trainer.quant.check_quant", lambda *a, **k: None)
    lines = []
    with pytest.raises(_Stop):
        loop.prepare(cfg, log=lines.append)
    trainer = ran["plan"]
    same = [f.name for f in dataclasses.fields(trainer) if f.name not in ("method", "estimate")]
    assert {n: getattr(trainer, n) for n in same} == {n: getattr(web, n) for n in same}
    assert trainer.estimate.terms == web.estimate.terms and trainer.estimate.total == web.estimate.total
    assert trainer.describe() == web.describe()
    from trainer.advice import report
    said = report(trainer)
    assert any(ln.startswith("OFFLOAD_BLOCKS=auto: 3 of 6 blocks") for ln in said)
    for ln in said + trainer.describe():
        assert ln in shown


def test_the_estimate_follows_the_compile_decision():
    """Where compile_choice refuses to compile (no Triton here), the plan is eager: its estimate is the COMPILE=0
    one, and GRAD_CP=auto searches on that figure, not on the compiled one's."""
    cfg = cfg_()
    free = 40 * GiB
    compiled = resolve(cfg, B15, Machine(free=free))
    no_triton = resolve(cfg, B15, Machine(free=free, triton=False))
    eager = resolve(cfg_(COMPILE="0"), B15, Machine(free=free))
    assert compiled.compiled and not no_triton.compiled and "Triton" in no_triton.compile_note
    assert no_triton.estimate.total == eager.estimate.total
    assert (no_triton.plain_top, no_triton.keep_products) == (eager.plain_top, eager.keep_products)
    assert (compiled.plain_top, compiled.keep_products) != (eager.plain_top, eager.keep_products)
    with pytest.raises(Exception, match="COMPILE=1"):
        resolve(cfg_(COMPILE="1"), B15, Machine(free=free, triton=False))


def test_the_model_gets_the_plans_options_in_one_call(project, monkeypatch):
    """loop.prepare hands the model plan.execution (RWKV.set_execution); the dry run prints the plan."""
    from trainer import loop
    cfg = TrainConfig.from_env(dict(MODEL="m6.pth", DATA="toy", CTX_LEN="32", EPOCH_STEPS="2", OP="chunk",
                                    GRAD_CP="1", LORA_R="8", PRECISION="fp32", SAMPLE_PROMPT="ab"))
    from trainer.model import RWKV
    calls, real = [], RWKV.set_execution
    monkeypatch.setattr(RWKV, "set_execution", lambda self, ex: (calls.append(ex), real(self, ex))[1])
    lines = []
    prep = loop.dry_run(cfg, log=lines.append)
    assert calls[-1] == prep.plan.execution == prep.model.execution
    assert prep.plan.execution.grad_cp and prep.plan.execution.op == "chunk"
    assert prep.plan.execution.ffn_piece_tokens == planning.FFN_PIECE_TOKENS
    for ln in prep.plan.describe():
        assert f"  {ln}" in lines


def test_a_plan_changed_is_estimated_again_and_keeps_its_tiers_possible():
    """RunPlan.but re-estimates and clamps GRAD_CP's tiers to what the plan allows (none when blocks stream)."""
    p = nominal(cfg_(), B15)
    q = p.but(plain_top=99)
    assert q.plain_top == 24 and q.estimate.total > p.estimate.total
    assert p.but(plain_top=5, offload=6).plain_top == 0
    assert nominal(cfg_(GRAD_CP="0"), B15).but(plain_top=3).plain_top == 0
    assert p.but(plain_top=0, keep_products=4).keep_products == 4          # triton, compiled, LoRA: it can
    assert p.but(keep_products=4, cudagraphs=True).keep_products == 0
