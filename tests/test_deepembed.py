"""RWKV-7a (DeepEmbed in every FFN) against the `rwkv` package run with RWKV_DE_VERSION=1; RWKV-7b refused."""
import pytest
import torch

from rwkv_ref import random_model_7a, run_rwkv_package
from trainer.checkpoint import detect_config, load_model, save_atomic
from trainer.errors import UserError

VOCAB, T, SPLIT = 1024, 48, 19
TOKENS = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(17)).tolist()
TOKENS[7] = 0


def _close(a, b, atol=1e-5):
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("de") / "v7a.pth"
    save_atomic(random_model_7a(2, 128, VOCAB, seed=3).state_dict(), path)
    out = run_rwkv_package("7a", [dict(model=str(path), tokens=TOKENS, split=SPLIT)])[0]
    return path, out


def test_logits_and_state_match_rwkv_package(ref):
    path, r = ref
    model = load_model(path)
    assert model.cfg.version == 7 and model.cfg.deep_embed == 32
    idx = torch.tensor([TOKENS])
    with torch.no_grad():
        logits, state = model.forward_with_state(idx)
        l1, s1 = model.forward_with_state(idx[:, :SPLIT])
        l2, s2 = model.forward_with_state(idx[:, SPLIT:], s1)
        assert logits.std() > 0.3
        _close(logits[0], r["logits"])
        _close(torch.cat([l1, l2], 1)[0], r["logits"])           # two parts, the state carried
        _close(r["logits_split"], r["logits"])
        for ours, theirs in zip(state, r["state"]):
            for a, b in zip(ours, theirs):
                _close(a[0], b)
        for a, b in zip(s2, state):
            for x, y in zip(a, b):
                _close(x, y)
        # the DeepEmbed gate matters: the same model with the gate at 1 gives other logits
        for blk in model.blocks:
            blk.ffn.s2.zero_()
            blk.ffn.s0.fill_(1.0)
        assert (model(idx) - logits).abs().max() > 0.05


def test_ffn_in_pieces_and_batch_equal_whole():
    model = random_model_7a(2, 128, 256, seed=5).eval()
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(idx)
        model.ffn_piece_tokens = 6
        _close(model(idx), whole)
        model.ffn_piece_tokens = 0
        _close(model(idx[1:]), whole[1:])


def test_detected_from_keys_and_sizes_checked(tmp_path):
    sd = random_model_7a(1, 128, 256, seed=1, rank=8).state_dict()
    cfg = detect_config(sd)
    assert (cfg.version, cfg.deep_embed, cfg.ffn_dim) == (7, 8, 512)
    bad = dict(sd)
    bad["blocks.0.ffn.s_emb.weight"] = torch.zeros(256, 32)
    with pytest.raises(UserError, match="s_emb.weight' has shape"):
        detect_config(bad)
    part = {k: v for k, v in sd.items() if not k.endswith("ffn.s2")}
    with pytest.raises(UserError, match="missing 'blocks.0.ffn.s2'"):
        detect_config(part)


def test_7b_is_refused_in_one_line(tmp_path, capsys):
    sd = random_model_7a(1, 128, 256, seed=1).state_dict()
    sd["blocks.0.qkv.qq.weight"] = torch.zeros(256, 128)
    sd["blocks.0.qkv.k_emb.weight"] = torch.zeros(256, 256)
    path = tmp_path / "v7b.pth"
    save_atomic(sd, path)
    with pytest.raises(UserError) as e:
        load_model(path)
    text = str(e.value)
    assert "RWKV-7b" in text and "grows with the text" in text and "RWKV-7a" in text and "\n" not in text
