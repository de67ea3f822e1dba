"""The chunked head + cross-entropy (trainer/head_loss.py) equals the plain head and F.cross_entropy, in
value and in both gradients, across chunk boundaries, in fp32 and under bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

from trainer import head_loss
from trainer.head_loss import head_ce_sum
from trainer.loop import masked_loss

from rwkv_ref import random_model


def _plain(h, w, t, m, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = h @ w.T
    return (F.cross_entropy(logits.float(), t, reduction="none") * m).sum()


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
