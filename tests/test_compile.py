"""COMPILE: torch.compile of the blocks gives the eager model's loss and gradients, compiles a few graphs
whatever the depth (not one per layer: RWKV-PEFT's compiled block hit dynamo's recompile limit), and the
Triton WKV op is traced without a graph break. CPU tests use dynamo's "aot_eager" backend (the same graphs
and autograd, no code generation) and one inductor run; the GPU test compares inductor in bf16."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import config_from_sizes
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.model import RWKV, init_weights_
from trainer.peft import get_method
from trainer.plan import Machine, compile_choice

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
VOCAB = 300
GPU = Machine(device="cuda", capability=(9, 0), triton=True)          # a GPU with everything installed
CPU = Machine(device="cpu", name="cpu", capability=(0, 0), bf16=False, native_bf16=False, cxx=False, probed=True)


def tiny(version=7, layers=3, width=128, mode="lora", op="chunk", seed=1, device="cpu"):
    """A small model whose every path carries signal: non-zero output projections, LoRA B and parts."""
    torch.manual_seed(seed)
    m = init_weights_(RWKV(config_from_sizes(version, layers, width, vocab_size=VOCAB)), seed=seed)
    with torch.no_grad():
        for blk in m.blocks:
            blk.att.output.weight.normal_(0, 0.02)
            blk.ffn.value.weight.normal_(0, 0.02)
    if mode in ("lora", "dora"):
        get_method(mode)({"r": 8, "alpha": 16}).apply(m, train_parts=("time", "ln"))
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.data.normal_(0, 0.05)
    else:
        get_method(mode)({}).apply(m)
    m.op, m.grad_cp = op, True
    return m.to(device).train()


def loss_and_grads(model, idx, autocast_dtype=None):
    with torch.autocast(idx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def twins(**kw):
    eager, compiled = tiny(**kw), tiny(**kw)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def assert_grads_close(ga, gb, rtol):
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        scale = ga[n].abs().max().item() + 1e-12
        err = (ga[n] - gb[n]).abs().max().item() / scale
        assert err <= rtol, f"{n}: relative gradient error {err:.2e} > {rtol}"


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("mode", ["lora", "dora", "full"])
def test_compiled_blocks_equal_eager_and_share_graphs(fresh_dynamo, mode):
    counters = fresh_dynamo
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    graphs = {}
    for layers in (2, 5):
        eager, compiled = twins(layers=layers, mode=mode)
        compiled.compile_blocks(backend="aot_eager")
        la, ga = loss_and_grads(eager, idx)
        lb, gb = loss_and_grads(compiled, idx)
        assert lb == pytest.approx(la, rel=1e-6)
        assert_grads_close(ga, gb, 1e-5)
        graphs[layers] = counters["stats"]["unique_graphs"]
        loss_and_grads(compiled, idx)                     # a second step compiles nothing new
        assert counters["stats"]["unique_graphs"] == graphs[layers]
        torch._dynamo.reset()
        counters.clear()
    # the chunk op runs between two graphs per block; layer 0 (ln0, no v_first) and the rest differ:
    # the count does not grow with depth
    assert graphs[2] == graphs[5] <= 6, graphs


def test_generating_from_compiled_blocks_compiles_nothing(fresh_dynamo):
    """The sample at each save generates from the trained, compiled model: it runs the blocks eagerly (no graph
    for the prompt's length, none for the one-token steps) and gives the uncompiled model's tokens."""
    from trainer.inference import generate
    counters = fresh_dynamo
    eager, compiled = twins(layers=2)
    compiled.compile_blocks(backend="aot_eager")
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    loss_and_grads(compiled, idx)                               # a training step compiles the training graphs
    trained = counters["stats"]["unique_graphs"]
    assert trained > 0
    prompt = [5, 17, 99, 3, 42]
    got = generate(compiled, prompt, max_tokens=12, top_p=0.9, seed=3, stop_token=None, vocab_limit=None)
    want = generate(eager, prompt, max_tokens=12, top_p=0.9, seed=3, stop_token=None, vocab_limit=None)
    assert got == want and len(got) == 12
    assert counters["stats"]["unique_graphs"] == trained and compiled.training
    loss_and_grads(compiled, idx)                               # training goes on compiled, with its graphs
    assert counters["stats"]["unique_graphs"] == trained


def test_compiled_ffn_in_pieces_equals_eager(fresh_dynamo):
    """The FFN over pieces of the tokens (RWKV.ffn_piece_tokens, set by the trainer under checkpointing),
    compiled with the checkpointed block, gives the eager whole FFN's loss and gradients."""
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    eager, compiled = twins(layers=2)
    compiled.ffn_piece_tokens = 16                        # 80 tokens: 4 pieces of 20
    compiled.compile_blocks(backend="aot_eager")
    la, ga = loss_and_grads(eager, idx)
    lb, gb = loss_and_grads(compiled, idx)
    assert lb == pytest.approx(la, rel=1e-6)
    assert_grads_close(ga, gb, 1e-5)


@pytest.mark.parametrize("tables", ["trained", "held"])
def test_compiled_7a_blocks_equal_eager(fresh_dynamo, tables_elsewhere, tables):
    """RWKV-7a, checkpointed blocks compiled: each block's s_emb rows are an input of its graph, looked up before
    it. The eager loss and gradients with the tables trained (TRAIN_PARTS=deepembed: s_emb's gradient too) or held
    in CPU memory (their rows gathered as on one GPU: the gathering stays out of the graph); a second step compiles
    nothing new."""
    from rwkv_ref import random_model_7a
    from trainer.tables import hold_tables
    counters = fresh_dynamo
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    models = []
    for _ in range(2):
        m = random_model_7a(3, 128, VOCAB, seed=2)
        get_method("lora")({"r": 8, "alpha": 16}).apply(m, train_parts=("deepembed",) if tables == "trained" else ())
        if tables == "held":
            hold_tables(m, emb=True, deep_embed=True)
        m.op, m.grad_cp = "chunk", True
        models.append(m.train())
    eager, compiled = models
    compiled.load_state_dict(eager.state_dict())          # LoRA's A drawn alike
    compiled.compile_blocks(backend="aot_eager")
    la, ga = loss_and_grads(eager, idx)
    lb, gb = loss_and_grads(compiled, idx)
    assert lb == pytest.approx(la, rel=1e-6)
    assert_grads_close(ga, gb, 1e-5)
    assert ("blocks.2.ffn.s_emb.weight" in gb) == (tables == "trained")
    assert len(tables_elsewhere) == (2 * 4 if tables == "held" else 0)       # emb + 3 tables, each model once
    graphs = counters["stats"]["unique_graphs"]
    loss_and_grads(compiled, idx)
    assert counters["stats"]["unique_graphs"] == graphs > 0


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_blocks_compile_whole(fresh_dynamo, quant):
    """QUANT: the quantised layers' product is one custom op (trainer/quant.py), so a compiled QLoRA block is
    one graph (not split at each of its 6 quantised layers) and equals the eager block, gradients included."""
    from trainer.quant import quantize_model
    counters = fresh_dynamo
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    eager, compiled = twins(layers=3, mode="lora")
    for m in (eager, compiled):
        quantize_model(m, quant)
    compiled.compile_blocks(backend="aot_eager")
    la, ga = loss_and_grads(eager, idx)
    lb, gb = loss_and_grads(compiled, idx)
    assert lb == pytest.approx(la, rel=1e-6)
    assert_grads_close(ga, gb, 1e-5)
    # the chunk op splits each block in two; layer 0 and the rest differ: as without QUANT
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    assert all("_wkv" in reason for reason in counters["graph_break"]), dict(counters["graph_break"])


@pytest.mark.parametrize("compiled", [False, True])
def test_partly_checkpointed_blocks_equal_all_and_none(fresh_dynamo, monkeypatch, compiled):
    """GRAD_CP=auto's plan (model.plain_top): the top blocks run without checkpointing, the others with it;
    loss and gradients equal those with every block checkpointed and with none, eager and compiled; eager,
    torch's checkpoint runs for exactly the bottom blocks."""
    import trainer.model as model_mod
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = tiny(layers=4, mode="lora")
    ref.grad_cp = False
    l0, g0 = loss_and_grads(ref, idx)
    calls = []
    real = model_mod.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)
    if not compiled:
        monkeypatch.setattr(model_mod, "checkpoint", counting)
    for top in (0, 1, 3, 4, 9):
        m = tiny(layers=4, mode="lora")
        m.load_state_dict(ref.state_dict())
        m.plain_top = top
        if compiled:
            m.compile_blocks(backend="aot_eager")
        calls.clear()
        loss, grads = loss_and_grads(m, idx)
        assert loss == pytest.approx(l0, rel=1e-6)
        assert_grads_close(g0, grads, 1e-5)
        if not compiled:
            assert calls == list(m.blocks)[:max(4 - top, 0)], top   # the bottom blocks, in order
        torch._dynamo.reset()


def run_interpreted(code: str, timeout: int, **env: str) -> str:
    """Run ``code`` in a subprocess with our Triton op in Triton's interpreter (TRITON_INTERPRET must be set
    before Triton loads) and tests/ importable; its stdout, after checking that it exited cleanly."""
    preamble = '''
import torch
from triton_interp import patch_interpreter_scalars
patch_interpreter_scalars()
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env)
    res = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs on the CPU)")
def test_triton_op_is_traced_without_a_graph_break():
    """In a subprocess (TRITON_INTERPRET must be set before Triton loads): the block with our Triton WKV
    op compiles to one graph per kind of block, no graph break, and equals the eager model."""
    code = r'''
import test_compile as tc
from torch._dynamo.utils import counters
eager, compiled = tc.twins(layers=3, width=128, op="triton")
compiled.compile_blocks(backend="aot_eager")
idx = torch.randint(0, tc.VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
la, ga = tc.loss_and_grads(eager, idx)
lb, gb = tc.loss_and_grads(compiled, idx)
assert abs(la - lb) <= 1e-6 * abs(la), (la, lb)
tc.assert_grads_close(ga, gb, 1e-5)
print("GRAPHS", counters["stats"]["unique_graphs"], "BREAKS", len(counters["graph_break"]))
'''
    out = run_interpreted(code, timeout=600)
    assert "GRAPHS 2 BREAKS 0" in out, out


@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="inductor on the CPU needs g++")
def test_inductor_on_the_cpu_equals_eager(fresh_dynamo):
    """What COMPILE=1 on a CPU runs: inductor's generated C++ kernels, fp32, LoRA with gradient checkpointing."""
    eager, compiled = twins(layers=2, width=64)
    compiled.compile_blocks()
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    la, ga = loss_and_grads(eager, idx)
    lb, gb = loss_and_grads(compiled, idx)
    assert lb == pytest.approx(la, rel=1e-5)
    assert_grads_close(ga, gb, 1e-3)


@pytest.mark.skipif(not HAS_TRITON or not (shutil.which("g++") or shutil.which("c++")),
                    reason="needs triton (its interpreter) and g++ (inductor on the CPU)")
def test_compiled_checkpoint_forward_skips_the_saves_only_its_backward_would_read():
    """With the checkpoint compiled with the block, the forward graph's WKV call writes no chunk
    checkpoints and S·a (save=False: its backward graph recomputes with a saving call), the backward graph's
    call still saves, and the model equals eager (inductor's C++ code, our op in Triton's interpreter)."""
    code = r'''
import test_compile as tc
eager, compiled = tc.twins(layers=2, width=64, op="triton")
compiled.compile_blocks()
pass_ = torch._inductor.config.post_grad_custom_post_pass
seen, call = [], type(pass_).__call__
def spy(self, graph):
    fwd = lambda: [n.args[7] for n in graph.nodes if n.target is torch.ops.rwkv_peft.wkv7_fwd.default]
    before = fwd()
    call(self, graph)
    seen.append((before, fwd()))
type(pass_).__call__ = spy
idx = torch.randint(0, tc.VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
la, ga = tc.loss_and_grads(eager, idx)
lb, gb = tc.loss_and_grads(compiled, idx)
assert abs(la - lb) <= 1e-5 * abs(la), (la, lb)
tc.assert_grads_close(ga, gb, 1e-4)
print("SEEN", sorted(seen))
'''
    out = run_interpreted(code, timeout=900, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")  # a cached graph skips passes
    # two kinds of block (layer 0, the rest): two forward graphs switched off, two backward graphs saving
    assert "SEEN [([True], [False]), ([True], [False]), ([True], [True]), ([True], [True])]" in out, out


@pytest.mark.skipif(not HAS_TRITON or not (shutil.which("g++") or shutil.which("c++")),
                    reason="needs triton (its interpreter) and g++ (inductor on the CPU)")
def test_blocks_keeping_their_products_equal_eager():
    """GRAD_CP=auto's three tiers in one model (from the top: not checkpointed, keeping its matrix products,
    checkpointed): loss and gradients equal the eager model's (inductor's C++ code, our op interpreted); the
    middle block's backward graph recomputes no product (every mm there is a gradient's)."""
    code = r'''
import test_compile as tc
eager, compiled = tc.twins(layers=3, width=64, op="triton")
compiled.compile_blocks()
for m in (eager, compiled):
    m.grad_cp = True
compiled.plain_top, compiled.keep_products = 1, 1
counts = []
import torch._inductor.config as ic
old = ic.post_grad_custom_post_pass
class Count(type(old)):
    def __call__(self, graph):
        counts.append(sum(n.target is torch.ops.aten.mm.default for n in graph.nodes))
        old(graph)
ic.post_grad_custom_post_pass = Count()
idx = torch.randint(0, tc.VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
la, ga = tc.loss_and_grads(eager, idx)
lb, gb = tc.loss_and_grads(compiled, idx)
assert abs(la - lb) <= 1e-5 * abs(la), (la, lb)
tc.assert_grads_close(ga, gb, 1e-4)
print("MM", counts)
'''
    out = run_interpreted(code, timeout=900, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    # graphs in the order they run: 3 forward, then the backward of the plain, the keeping and the
    # checkpointed block: the keeping one multiplies only what the plain one does (46 at this size: gradients),
    # the checkpointed one also recomputes products
    counts = [int(n) for n in out.split("MM [")[1].split("]")[0].split(",")]
    assert len(counts) == 6 and counts[3] == counts[4] < counts[5], out


def _cfg(**kw):
    env = dict(MODEL="m.pth", DATA="d", PRECISION="fp32")
    env.update(kw)
    return TrainConfig.from_env(env)


def test_compile_setting_is_checked_and_resolved(monkeypatch):
    with pytest.raises(UserError, match="COMPILE='yes' is not one of: auto | 1 | 0"):
        _cfg(COMPILE="yes")
    cpu = Machine.probe("cpu", memory_too=False)                        # this machine's CPU, as the trainer sees it
    assert compile_choice(_cfg(), cpu) == (False, None)                 # auto: eager on the CPU
    assert compile_choice(_cfg(COMPILE="0"), cpu) == (False, None)
    on, note = compile_choice(_cfg(QUANT="nf4"), GPU)                   # auto with QUANT too (session 8)
    assert on and "torch.compile" in note
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    on, note = compile_choice(_cfg(COMPILE="1"), Machine.probe("cpu", memory_too=False))
    assert on and "torch.compile" in note
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler") as err:
        compile_choice(_cfg(COMPILE="1"), Machine.probe("cpu", memory_too=False))
    assert "COMPILE=0" in err.value.fix


def test_compile_auto_without_triton_on_a_gpu_says_so():
    no_triton = Machine(device="cuda", triton=False)                    # a GPU where triton is not installed
    on, note = compile_choice(_cfg(), no_triton)
    assert not on and "pip install triton" in note
    with pytest.raises(UserError, match="needs Triton"):
        compile_choice(_cfg(COMPILE="1"), no_triton)


def test_the_trainer_compiles_when_asked(tmp_path, monkeypatch):
    """loop.prepare calls compile_blocks exactly when plan.compile_choice says so."""
    from test_train import config, make_project
    from trainer import loop
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    calls = []
    monkeypatch.setattr(RWKV, "compile_blocks", lambda self, **kw: calls.append(self))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    logs = []
    loop.prepare(config(COMPILE="1", ACCELERATOR="cpu"), log=logs.append)      # on the CPU, also on a GPU host
    assert len(calls) == 1 and any("COMPILE" in ln for ln in logs)
    loop.prepare(config(COMPILE="auto", ACCELERATOR="cpu"), log=logs.append)
    assert len(calls) == 1


def test_cuda_graphs_only_where_the_shapes_and_the_process_allow():
    """plan.use_cudagraphs: one CUDA GPU, fixed shapes, not infctx; never on the CPU."""
    from test_train import config
    from trainer.plan import use_cudagraphs as plan_graphs

    def use_cudagraphs(cfg, machine, n_embd):       # with the method the plan builds from cfg
        cls = get_method(cfg.FINETUNE_MODE)
        return plan_graphs(cfg, machine, n_embd, cls(cls.settings_from(cfg)))
    gpu, C = GPU, 2048
    assert use_cudagraphs(config(), gpu, C)
    assert use_cudagraphs(config(GRAD_CP="1", FINETUNE_MODE="full", CTX_LEN="1024", MICRO_BSZ="2"), gpu, C)
    assert not use_cudagraphs(config(), CPU, C)
    for kw in (dict(GPU_COUNT="2"), dict(NODES="2"), dict(STRATEGY="deepspeed_stage_1"),
               dict(DATALOAD="only", MICRO_BSZ="1"), dict(TRAIN_TYPE="infctx", CTX_LEN="64", CHUNK_CTX="32"),
               dict(INITIAL_CTX_LEN="16", CTX_WARMUP_STEPS="10"),
               dict(MINI_BSZ="2"),                                            # gradients accumulate
               dict(LORA_DROPOUT="0.1"),
               dict(CTX_LEN="4096", MICRO_BSZ="8"), dict(CTX_LEN="1024", MICRO_BSZ="4")):   # GPU-bound steps
        assert not use_cudagraphs(config(**kw), gpu, C), kw


def test_no_cuda_graphs_when_memory_is_tight(tmp_path, monkeypatch):
    """prepare: where the plan finds the estimate within 15 % of the free memory, the blocks compile without
    CUDA graphs (their pool is about 0.2 GiB), and the log says why. (No GPU here: the plan's CUDA-graph choice
    and estimate are those of a GPU with that much free memory, the rest this machine's, where the model is
    built.)"""
    import dataclasses

    from test_train import config, make_project
    from trainer import loop
    from trainer import plan as planning
    from trainer.memory import Estimate
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    calls = []
    monkeypatch.setattr(RWKV, "compile_blocks", lambda self, **kw: calls.append(kw))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(planning, "use_cudagraphs", lambda cfg, machine, n_embd, method: True)
    monkeypatch.setattr("trainer.memory.estimate",
                        lambda plan, sizes: Estimate({}, 1e9, 0.0, 1e9, 1e9, "backward pass", free=plan.free))
    real = planning.resolve
    for free, graphs in ((10e9, True), (1.1e9, False)):
        def on_a_gpu(cfg, sizes, machine, free=free, **kw):
            gpu = real(cfg, sizes, dataclasses.replace(GPU, free=free), **kw)
            here = real(cfg, sizes, machine, **kw)
            return dataclasses.replace(here, cudagraphs=gpu.cudagraphs, graphs_note=gpu.graphs_note,
                                       estimate=gpu.estimate)
        monkeypatch.setattr(planning, "resolve", on_a_gpu)
        logs = []
        loop.prepare(config(COMPILE="1"), log=logs.append)
        assert calls[-1] == {"cudagraphs": graphs}
        assert any("not replaying the blocks as CUDA graphs" in ln for ln in logs) == (not graphs)
        assert any("replay as CUDA graphs" in ln for ln in logs) == graphs


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad_cp,top,kp", [(True, 0, 0), (False, 0, 0), (True, 2, 0), (True, 1, 1)])
def test_cuda_graph_blocks_equal_eager_over_replays(fresh_dynamo, grad_cp, top, kp):
    """compile_blocks(cudagraphs=True): the first calls record, the later ones replay; every step's loss and
    gradients are those of the same compiled blocks without CUDA graphs (the same kernels: equal but for
    the order of the WKV gradient's atomic-free sums, i.e. equal), with and without checkpointing, with
    the top 2 of 3 blocks not checkpointed, and with one of each tier (GRAD_CP=auto)."""
    plain, graphs = twins(layers=3, width=256, mode="lora", op="triton", device="cuda")
    for m in (plain, graphs):
        m.grad_cp, m.plain_top, m.keep_products = grad_cp, top, kp
        for p in m.parameters():
            p.data = p.data.float() if p.requires_grad else p.data.bfloat16()
    plain.compile_blocks()
    graphs.compile_blocks(cudagraphs=True)
    assert graphs.cudagraphs and not plain.cudagraphs
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randint(0, VOCAB, (2, 128), generator=gen).cuda()
        la, ga = loss_and_grads(plain, idx, torch.bfloat16)
        torch.compiler.cudagraph_mark_step_begin()
        lb, gb = loss_and_grads(graphs, idx, torch.bfloat16)
        assert lb == pytest.approx(la, rel=1e-5)
        assert_grads_close(ga, gb, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad_cp,quant", [("1", "none"), ("0", "none"), ("auto", "none"), ("1", "nf4")])
def test_trainer_with_cuda_graphs_equals_it_without(tmp_path, monkeypatch, grad_cp, quant):
    """The whole trainer: the same losses with the CUDA graphs as without, step by step (GRAD_CP 1, 0, and
    auto with one block checkpointed and one not; and QLoRA, whose compiled blocks hold the quantised
    product as a custom op)."""
    if quant != "none":
        pytest.importorskip("bitsandbytes", reason="QUANT on a GPU needs bitsandbytes")
    from test_train import config, make_project
    from trainer import loop
    from trainer import plan as planning
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    make_project(tmp_path, 7, items=[list(rng.integers(1, 200, size=40)) + [0] for _ in range(16)])
    if grad_cp == "auto":    # the plan: 1 of the 2 blocks without checkpointing (the GPU would take both)
        real = planning.resolve
        monkeypatch.setattr(planning, "resolve", lambda cfg, sizes, machine, op=None, tiers=None:
                            real(cfg, sizes, machine, op=op, tiers=(1, 0)))
    results = []
    for graphs in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(planning, "use_cudagraphs", lambda cfg, machine, n_embd, method, g=graphs: g)
        cfg = config(ACCELERATOR="cuda", OP="triton", PRECISION="bf16", COMPILE="1", GRAD_CP=grad_cp, QUANT=quant,
                     MICRO_BSZ="2", EPOCH_STEPS="6", CTX_LEN="32", OUTPUT=f"out{int(graphs)}", LR_INIT="1e-3",
                     LR_FINAL="1e-3")
        results.append(loop.train(cfg, log=lambda *_: None, progress=False).losses)
    plain, graphs = results
    assert len(plain) == len(graphs) == 6
    assert graphs == pytest.approx(plain, rel=2e-3), (plain, graphs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["lora", "dora", "full"])
def test_inductor_on_the_gpu_equals_eager_in_bf16(fresh_dynamo, mode):
    """The training set-up on a GPU: bf16 autocast, fp32 trained tensors, our Triton op, checkpointing.
    Full fine-tuning trains the [1, 1, C] mixing vectors that inductor's mix-order reduction broke."""
    eager, compiled = twins(layers=3, width=256, mode=mode, op="triton", device="cuda")
    for m in (eager, compiled):
        for p in m.parameters():
            p.data = p.data.float() if p.requires_grad else p.data.bfloat16()
    compiled.compile_blocks()
    idx = torch.randint(0, VOCAB, (4, 256), generator=torch.Generator().manual_seed(0)).cuda()
    la, ga = loss_and_grads(eager, idx, torch.bfloat16)
    lb, gb = loss_and_grads(compiled, idx, torch.bfloat16)
    assert lb == pytest.approx(la, rel=1e-2)
    assert_grads_close(ga, gb, 5e-2)
    assert fresh_dynamo["stats"]["unique_graphs"] <= 2 and not fresh_dynamo["graph_break"]


def test_compiled_code_is_kept_in_the_users_cache_folder(tmp_path, monkeypatch):
    """keep_compiled (called before the blocks compile) puts inductor's cache under $XDG_CACHE_HOME or ~/.cache,
    not inductor's default under /tmp that Ubuntu empties at boot; a folder the user chose stays; where the cache
    folder cannot be made, the default stays. Inductor reads the folder from the environment (checked through its
    own cache_dir())."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from trainer.device import keep_compiled
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    want = tmp_path / "xdg" / "rwkv-peft-simple" / "torchinductor"
    assert keep_compiled() == str(want) and want.is_dir()
    assert cache_dir() == str(want)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert keep_compiled() == str(tmp_path / "mine") and cache_dir() == str(tmp_path / "mine")
    env = {"HOME": str(tmp_path / "home")}
    assert keep_compiled(env) == str(tmp_path / "home" / ".cache" / "rwkv-peft-simple" / "torchinductor")
    (tmp_path / "file").write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "file")}           # not a folder: nothing set
    assert keep_compiled(env) is None and "TORCHINDUCTOR_CACHE_DIR" not in env
