"""The chunked head + cross-entropy (trainer/head_loss.py) equals the plain head and F.cross_entropy, in
value and in both gradients, across chunk boundaries, in fp32 and under bf16 autocast; with L2Wrap, the plain
one plus a hand-written L2Wrap (the model's and infctx's losses too)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from trainer import head_loss
from trainer.head_loss import head_ce_sum
from trainer.loop import masked_loss

from rwkv_ref import random_model


def _plain(h, w, t, m, autocast):
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = h @ w.T
    return (F.cross_entropy(logits.float(), t, reduction="none") * m).sum()


class _L2WrapReference(torch.autograd.Function):
    """RWKV-LM's L2Wrap written out on whole logits [..., V]: the loss passes through unchanged; the backward
    adds, at each position's largest logit, 1e-4 / (the mask's sum) × that logit × the position's mask, times
    the incoming gradient."""

    @staticmethod
    def forward(ctx, loss, logits, mask):
        ctx.save_for_backward(logits, mask)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        logits, mask = ctx.saved_tensors
        top = logits.float().max(dim=-1)
        extra = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        extra.scatter_(-1, top.indices.unsqueeze(-1), (top.values * mask * 1e-4 / mask.sum()).unsqueeze(-1))
        return grad, (extra * grad).to(logits.dtype), None


def _wrapped_reference(h, w, t, m):
    """Whole logits, F.cross_entropy's masked mean, L2Wrap by the reference above."""
    logits = h @ w.T
    loss = (F.cross_entropy(logits, t, reduction="none") * m).sum() / m.sum()
    return _L2WrapReference.apply(loss, logits, m)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_equals_the_plain_head_and_cross_entropy(monkeypatch, autocast, train_head):
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 1000 * 64)       # 64 tokens a chunk at V = 1000
    g = torch.Generator().manual_seed(0)
    N, C, V = 300, 32, 1000                                          # 5 chunks, the last one short
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.2
    t, m = torch.randint(0, V, (N,), generator=g), (torch.rand(N, generator=g) > 0.3).float()
    results = []
    for fn in (head_ce_sum, lambda *a: _plain(*a, autocast)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(train_head)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w, t, m)
        (loss * 0.7).backward()
        results.append((loss.item(), h.grad, w.grad))
    (la, gha, gwa), (lb, ghb, gwb) = results
    tol = 1e-2 if autocast else 1e-5          # bf16: rounded once (scaled before or after the cast)
    assert la == pytest.approx(lb, rel=tol / 10)
    assert ((gha - ghb).abs().max() / ghb.abs().max()).item() < tol
    if train_head:
        assert ((gwa - gwb).abs().max() / gwb.abs().max()).item() < tol
    else:
        assert gwa is None


def test_l2wrap_adds_its_gradient_and_leaves_the_loss(monkeypatch):
    """head_ce_sum(..., l2wrap=True) / mask sum: the loss value of the plain one, bit for bit, and the input's
    and the head weight's gradients of F.cross_entropy's masked mean with the hand-written L2Wrap (fp32, chunks,
    masked-out positions); without l2wrap those gradients differ from them by far more than the tolerance."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 1000 * 64)       # 64 tokens a chunk at V = 1000
    g = torch.Generator().manual_seed(4)
    N, C, V = 300, 32, 1000                                          # 5 chunks, the last one short
    h0, w0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 2     # top logits around 35
    t, m = torch.randint(0, V, (N,), generator=g), (torch.rand(N, generator=g) > 0.3).float()
    res = {}
    for name, fn in (("l2wrap", lambda h, w: head_ce_sum(h, w, t, m, l2wrap=True) / m.sum()),
                     ("plain", lambda h, w: head_ce_sum(h, w, t, m) / m.sum()),
                     ("reference", lambda h, w: _wrapped_reference(h, w, t, m))):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        (loss * 0.7).backward()
        res[name] = (loss.item(), h.grad, w.grad)
    assert res["l2wrap"][0] == res["plain"][0]
    assert res["l2wrap"][0] == pytest.approx(res["reference"][0], rel=1e-6)
    for k in (1, 2):                                                 # the input's gradient, the weight's
        assert _rel(res["l2wrap"][k], res["reference"][k]) < 1e-5
        assert _rel(res["plain"][k], res["reference"][k]) > 1e-3


def test_l2wrap_reaches_the_model_and_infctx_counts_the_whole_sequence():
    """Execution.l2wrap (the plan's L2WRAP) turns it on in the model's loss; infctx's chunks divide it by the whole
    sequence's count, as the loss: both give the gradients of the model's logits with the reference L2Wrap."""
    from trainer.infctx import infctx_loss
    model = random_model(7, 2, 64, vocab_size=500, seed=3)
    model.op = "chunk"
    with torch.no_grad():
        model.head.weight.mul_(8)                                    # large logits: a visible L2Wrap term
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, 500, (2, 30), generator=g), torch.randint(0, 500, (2, 30), generator=g)
    mask = (torch.rand(2, 30, generator=g) > 0.4).float()
    mask[:, 26:] = 0                                                 # trailing padding: infctx trims it
    params = (model.emb.weight, model.head.weight)

    def reference():
        logits = model(idx)
        return _L2WrapReference.apply(masked_loss(logits, tgt, mask), logits, mask)

    plain = torch.autograd.grad(model(idx, targets=tgt, mask=mask), params)
    ref = torch.autograd.grad(reference(), params)
    model.set_execution(dataclasses.replace(model.execution, l2wrap=True))
    assert model.execution.l2wrap
    for fn in (lambda: model(idx, targets=tgt, mask=mask), lambda: infctx_loss(model, idx, tgt, mask, chunk_len=8)):
        got = torch.autograd.grad(fn(), params)
        for a, b, p in zip(got, ref, plain):
            assert _rel(a, b) < 1e-5                                   # about 5e-7 here
            assert _rel(p, b) > 3e-4                                   # 8e-4 and 1.8e-3 here


def test_the_plan_hands_l2wrap_to_the_model(tmp_path, monkeypatch):
    from trainer import checkpoint
    from trainer.plan import nominal
    from test_train import config, make_project
    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, 7)
    sizes = checkpoint.detect_config(checkpoint.load_checkpoint(tmp_path / "model" / "tiny.pth"))
    assert nominal(config(), sizes).execution.l2wrap is True              # the default, as RWKV-LM's
    assert nominal(config(L2WRAP=0), sizes).execution.l2wrap is False


def test_model_loss_equals_masked_loss_of_its_logits():
    model = random_model(7, 2, 64, vocab_size=500, seed=3)
    model.op = "chunk"
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, 500, (2, 30), generator=g), torch.randint(0, 500, (2, 30), generator=g)
    mask = (torch.rand(2, 30, generator=g) > 0.5).float()
    a = model(idx, targets=tgt, mask=mask)
    b = masked_loss(model(idx), tgt, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    ga = torch.autograd.grad(a, model.emb.weight)[0]
    gb = torch.autograd.grad(b, model.emb.weight)[0]
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)


def test_one_chunk_of_logits_alive_at_a_time(monkeypatch):
    """Peak bytes of the forward (which also makes the gradients) stay at one chunk's: memory.HEAD_BYTES per
    logit of one chunk (its fp32 logits and logsumexp's temporary), plus the input's gradient; the chunk
    before is freed before the next one's logits are made."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from calibrate_memory import _LiveBytes
    from trainer.memory import HEAD_BYTES
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 1000 * 64)       # 64 tokens a chunk at V = 1000
    N, C, V = 300, 32, 1000
    h = torch.randn(N, C).requires_grad_()
    w, t, m = torch.randn(V, C) * 0.2, torch.randint(0, V, (N,)), torch.ones(N)
    live = _LiveBytes()
    with live.mode():
        loss = head_ce_sum(h, w, t, m)
    assert loss.item() > 0
    chunk = head_loss.chunk_tokens(V) * V
    assert live.peak <= HEAD_BYTES * chunk + 4 * N * C + 64 * 1024, (live.peak, HEAD_BYTES * chunk)
    assert live.peak >= (HEAD_BYTES - 1) * chunk          # and it does count the chunk


def _interpreted_kernel_errors() -> dict:
    """In a subprocess with TRITON_INTERPRET=1: the Triton cross-entropy against the PyTorch one."""
    from triton_interp import patch_interpreter_scalars
    patch_interpreter_scalars()
    out = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for V, block in ((1000, 4096), (5000, 2048)):        # one masked block; three, the last short
            n = 5
            logits = (torch.randn(n, V, generator=g) * 3).to(dtype)
            t = torch.randint(0, V, (n,), generator=g)
            t[0] = V - 1                                      # the target in the last (partial) block
            logits[3, V - 2] = 20                             # a top logit in the last (partial) block
            logits[4, 7] = logits[4, V // 2 + 1] = 20         # two equal top logits: the first one counts
            m = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0])
            # L2Wrap at 0.01 instead of 1e-4, so that its term shows above bf16's rounding
            for grad, l2 in ((False, 0.0), (True, 0.0), (True, 0.01)):
                a, b = logits.clone(), logits.clone()
                la = head_loss._ce_rows_triton(a, t, m, grad, block, l2=l2)
                lb = head_loss._ce_rows_reference(b, t, m, grad, l2)
                key = f"{dtype} V={V} grad={grad} l2={l2}"
                out[key + " loss"] = ((la - lb).abs().max() / lb.abs().max()).item()
                out[key + " logits"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    return out


def test_triton_cross_entropy_matches_pytorch_in_the_interpreter():
    """The GPU's kernel (run here by Triton's CPU interpreter): each row's loss times its mask, and the
    gradient written over the logits (with L2Wrap's term, and without), against the plain PyTorch code; fp32
    and bf16 logits, rows longer than one block, a target and a top logit in the last partial block, two equal
    top logits, a masked row."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton", reason="pip install triton: the interpreter test needs it, not a GPU")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errs) == 24
    for key, err in errs.items():
        # fp32: exp's rounding; bf16: the gradient rounded to bf16 (the interpreter truncates, 2^-7)
        assert err < (1e-5 if "float32" in key else 1e-2), (key, err)


def test_cross_entropy_kernel_compiles_for_an_h100():
    """No GPU here: the kernel compiled by Triton for sm_90 (types, the loop-carried top column, all checked by
    the real compiler, which the interpreter is not), with L2Wrap's term and without, fp32 and bf16 logits."""
    triton = pytest.importorskip("triton", reason="pip install triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sizes = {}
    for dtype, l2 in (("fp32", 0.0), ("bf16", 0.0), ("bf16", head_loss.L2WRAP_FACTOR)):
        sig = {"logits": f"*{dtype}", "targets": "*i64", "mask": "*fp32", "loss": "*fp32", "V": "i32",
               "stride": "i32", "BLOCK": "constexpr", "GRAD": "constexpr", "L2": "constexpr"}
        src = ASTSource(head_loss._ce_kernel(), sig, constexprs={"BLOCK": 4096, "GRAD": True, "L2": l2})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
        assert ".entry" in ptx
        sizes[dtype, l2] = len(ptx)
    assert sizes["bf16", head_loss.L2WRAP_FACTOR] > sizes["bf16", 0.0]      # the argmax and the term are in it


@pytest.mark.gpu
@pytest.mark.parametrize("l2wrap", [False, True])
def test_gpu_head_equals_the_reference_and_keeps_one_bf16_chunk(l2wrap):
    """On a GPU: the Triton cross-entropy and the fp32 in-place weight-gradient sum give the loss and both
    gradients of the plain PyTorch head (under bf16 autocast, in chunks; with L2Wrap, of the reference one),
    and a chunk costs its bf16 logits, not fp32 copies."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, V = 3000, 256, 65536
    h0 = torch.randn(N, C, device="cuda", generator=g)
    w0 = torch.randn(V, C, device="cuda", generator=g) * 0.05
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    m = (torch.rand(N, device="cuda", generator=g) > 0.3).float()

    def reference(h, w, t, m):
        if not l2wrap:
            return _plain(h, w, t, m, True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = h @ w.T
        mean = (F.cross_entropy(logits.float(), t, reduction="none") * m).sum() / m.sum()
        return _L2WrapReference.apply(mean, logits, m) * m.sum()      # the sum, with the mean's L2Wrap term
    res = []
    for fn in (lambda *a: head_ce_sum(*a, l2wrap=l2wrap), reference):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, t, m)
        (loss * 0.7).backward()
        res.append((loss.item(), h.grad, w.grad))
    (la, gha, gwa), (lb, ghb, gwb) = res
    assert la == pytest.approx(lb, rel=1e-3)
    assert ((gha - ghb).abs().max() / ghb.abs().max()).item() < 1e-2
    assert ((gwa - gwb).abs().max() / gwb.abs().max()).item() < 1e-2
    h = h0.clone().requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        head_ce_sum(h, w0, t, m)
    chunk = head_loss.chunk_tokens(V) * V
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * chunk + V * C * 2 + 4 * N * C + 2 ** 20, (extra, chunk)   # bf16 logits, bf16 weight


@pytest.mark.gpu
def test_gpu_kernel_l2wrap_term_equals_the_reference():
    """On a GPU, fp32 logits: the compiled kernel's gradient rows with L2Wrap's term (at 0.01, well above
    fp32's rounding) equal the PyTorch code's, rows of several blocks included."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(2)
    n, V = 64, 65536
    logits = torch.randn(n, V, device="cuda", generator=g) * 3
    logits[1, V - 5] = 30                                          # a top logit in the last block
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    m = (torch.rand(n, device="cuda", generator=g) > 0.3).float()
    rows = []
    for l2 in (0.0, 0.01):
        a, b = logits.clone(), logits.clone()
        la = head_loss._ce_rows_triton(a, t, m, True, l2=l2)
        lb = head_loss._ce_rows_reference(b, t, m, True, l2)
        assert _rel(la, lb) < 1e-5 and _rel(a, b) < 1e-5, l2
        rows.append(a)
    assert _rel(rows[0], rows[1]) > 1e-2                           # the term is there


if __name__ == "__main__":
    import json
    import sys
    if sys.argv[1:] == ["--interpret"]:
        print(json.dumps(_interpreted_kernel_errors()))
