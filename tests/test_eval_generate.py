"""tools.evaluate gives the loss computed by hand from the logits; sampling and tools.generate."""
import json
import math

import numpy as np
import pytest
import torch

from rwkv_ref import random_model
from tools import evaluate as evaluate_tool
from tools import generate as generate_tool
from tools import make_model
from trainer.checkpoint import save_atomic
from trainer.data.binidx import write_binidx
from trainer.errors import run_cli
from trainer.inference import evaluate_loss, generate, sample_logits

VOCAB = 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, VOCAB, size=n), 0).astype(np.uint16) for n in (30, 5, 0, 44, 12)]
    write_binidx(d / "data", docs)                         # the 3rd document is just the end token
    model = random_model(7, 2, 128, VOCAB, seed=2)
    save_atomic(model.state_dict(), d / "m.pth")
    return d, docs, model.eval()


def by_hand(model, docs, ctx_len=None):
    total, n = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor(doc[:ctx_len].astype(np.int64))
            if len(ids) < 2:
                continue
            logits = model(ids[None, :-1])[0]
            logp = torch.log_softmax(logits.double(), -1)
            total -= logp[torch.arange(len(ids) - 1), ids[1:]].sum().item()
            n += len(ids) - 1
    return total / n, n


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("items,ctx_len", [(None, None), (3, 20), (4, 8)])
def test_evaluate_cli_equals_loss_by_hand(setup, capsys, items, ctx_len):
    d, docs, model = setup
    argv = ["--model", str(d / "m.pth"), "--data", str(d / "data"), "--op", "torch"]
    argv += ["--items", str(items)] if items else []
    argv += ["--ctx-len", str(ctx_len)] if ctx_len else []
    assert evaluate_tool.main(argv) == 0
    got = last_json(capsys.readouterr().out)
    loss, n = by_hand(model, docs[:items], ctx_len)
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_evaluate_loss_in_chunks_equals_whole(setup):
    _, docs, model = setup
    whole = evaluate_loss(model, docs)
    pieces = evaluate_loss(model, docs, chunk_len=7)
    assert pieces["tokens"] == whole["tokens"] == sum(len(x) - 1 for x in docs if len(x) > 1)
    assert pieces["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_evaluate_cli_errors(setup, capsys):
    d, _, _ = setup
    for argv, words in (
        (["--model", str(d / "m.pth"), "--data", str(d / "nothing")], ["nothing"]),
        (["--model", str(d / "none.pth"), "--data", str(d / "data"), "--op", "torch"], ["none.pth"]),
        (["--model", str(d / "m.pth"), "--data", str(d / "data"), "--ctx-len", "1"], ["--ctx-len"]),
        (["--model", str(d / "m.pth"), "--data", str(d / "data"), "--op", "nonsense"], ["nonsense"]),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli(evaluate_tool.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err


def test_sample_logits():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, temperature=0) == 0
    assert sample_logits(logits, top_p=0.01, generator=g) == 0
    counts = np.bincount([sample_logits(logits, 1.0, 1.0, g) for _ in range(4000)], minlength=4) / 4000
    assert np.abs(counts - [0.4, 0.3, 0.2, 0.1]).max() < 0.03
    nucleus = {sample_logits(logits, 1.0, 0.5, g) for _ in range(300)}
    assert nucleus == {0, 1}                                    # 0.4 + 0.3 reach 0.5; 0.2 and 0.1 cut
    sharp = np.bincount([sample_logits(logits, 0.25, 1.0, g) for _ in range(2000)], minlength=4) / 2000
    want = np.array([0.4, 0.3, 0.2, 0.1]) ** 4
    assert np.abs(sharp - want / want.sum()).max() < 0.03


def test_greedy_generation_equals_argmax_of_full_forward(setup):
    _, _, model = setup
    prompt = [5, 17, 300, 2]
    out = generate(model, prompt, max_tokens=8, temperature=0, stop_token=None, vocab_limit=None)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    # vocab_limit keeps ids above it from being drawn; stop_token ends generation
    capped = generate(model, prompt, max_tokens=20, temperature=5.0, top_p=1.0, seed=1, vocab_limit=10,
                      stop_token=None)
    assert max(capped) < 10 and len(capped) == 20
    stop = generate(model, prompt, max_tokens=50, temperature=0, vocab_limit=1)   # only token 0 allowed
    assert stop == [0]
    assert generate(model, prompt, 6, seed=3) == generate(model, prompt, 6, seed=3)


def test_generate_cli(tmp_path, capsys):
    m = tmp_path / "world.pth"
    make_model.main(["--version", "6", "--layers", "1", "--width", "64", "--out", str(m), "--dtype", "fp32"])
    capsys.readouterr()
    argv = ["--model", str(m), "--prompt", "Hello\\nworld", "--tokens", "12", "--op", "torch", "--seed", "5"]
    assert generate_tool.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Hello\nworld")
    generate_tool.main(argv)
    assert capsys.readouterr().out == first                                # same seed, same text
    with pytest.raises(SystemExit) as e:
        run_cli(generate_tool.main, argv + ["--top-p", "0"])
    assert e.value.code == 2 and "--top-p" in capsys.readouterr().err
