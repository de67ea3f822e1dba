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


# ------------------------------------------------------------------------------------------ training
def _project(root):
    import numpy as np

    from trainer.data.binidx import write_binidx
    (root / "model").mkdir(parents=True, exist_ok=True)
    save_atomic(random_model_7a(2, 128, 256, seed=2).state_dict(), root / "model" / "tiny7a.pth")
    rng = np.random.default_rng(1)
    write_binidx(root / "data" / "toy", [list(rng.integers(1, 256, size=rng.integers(12, 30))) + [0]
                                          for _ in range(8)])


def _config(**kw):
    """test_train's tiny run on the 7a model, over 3 epochs."""
    from test_train import config
    return config(**{"MODEL": "tiny7a.pth", "EPOCH_COUNT": 3, **kw})


def _is_de(k):
    from trainer.deepembed import is_deep_embed
    return is_deep_embed(k)


@pytest.mark.parametrize("mode", ["lora", "dora", "pissa", "bone", "miss", "bat", "state", "full"])
def test_every_method_trains_a_7a_model_deep_embed_frozen(tmp_path, monkeypatch, mode):
    import numpy as np

    from trainer import checkpoint
    from trainer.loop import train
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    lr = "0.5" if mode == "state" else ("2e-3" if mode == "full" else "1e-2")
    res = train(_config(FINETUNE_MODE=mode, LR_INIT=lr, LR_FINAL=lr, GRAD_CP=int(mode == "state")),
                progress=False, log=lambda *_: None)
    assert len(res.losses) == 12 and not res.interrupted
    assert np.mean(res.losses[-4:]) < np.mean(res.losses[:4]) - 0.05, res.losses
    tensors, _ = checkpoint.load_adapter(tmp_path / "output" / "rwkv-2.pth")
    base = checkpoint.load_checkpoint(tmp_path / "model" / "tiny7a.pth")
    de = [k for k in tensors if _is_de(k)]
    if mode == "full":                    # the whole model is saved, its DeepEmbed as it was
        assert len(de) == 10 and all(torch.equal(tensors[k], base[k]) for k in de)
    else:
        assert not de


def test_train_parts_deepembed_trains_them(tmp_path, monkeypatch):
    from trainer import checkpoint
    from trainer.loop import train
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    res = train(_config(TRAIN_PARTS="deepembed time", EPOCH_COUNT=1), progress=False, log=lambda *_: None)
    assert not res.interrupted
    tensors, meta = checkpoint.load_adapter(tmp_path / "output" / "rwkv-0.pth")
    base = checkpoint.load_checkpoint(tmp_path / "model" / "tiny7a.pth")
    de = sorted(k for k in tensors if _is_de(k))
    assert len(de) == 10 and all(not torch.equal(tensors[k], base[k]) for k in de)
    assert "blocks.0.ffn.x_k" in tensors                      # time: the other FFN vectors, not s0/s1/s2 twice


def test_parts_rules_and_param_table():
    import dataclasses

    from trainer.checkpoint import config_from_sizes
    from trainer.counts import param_table
    from trainer.peft.base import part_names, part_of
    names = ["blocks.0.ffn.s1", "blocks.0.ffn.s0", "blocks.0.ffn.x_k", "blocks.3.ffn.s_emb.weight",
             "blocks.3.ffn.s_emb_x.weight", "blocks.0.ffn.key.weight"]
    assert part_names(names, ("time",)) == ["blocks.0.ffn.x_k"]
    assert part_names(names, ("deepembed",)) == [names[0], names[1], names[3], names[4]]
    assert [part_of(n) for n in names] == ["deepembed", "deepembed", "time", "deepembed", "deepembed", None]
    plain = config_from_sizes(7, 12, 768, 65536)
    sizes = dataclasses.replace(plain, deep_embed=32)
    de_per_layer = 65536 * 1024 + 1024 * 768 + 768 * 32 + 32 * 3072 + 3072
    for mode, parts in (("lora", ""), ("full", ""), ("lora", "deepembed"), ("full", "deepembed")):
        cfg = _config(FINETUNE_MODE=mode, TRAIN_PARTS=parts)
        a, b = param_table(cfg, plain), param_table(cfg, sizes)
        assert b.total - a.total == 12 * de_per_layer               # 0.8B numbers on a 0.1B model
        trained = 12 * de_per_layer if parts else 0
        assert b.trained - a.trained == trained
        assert b.frozen - a.frozen == 12 * de_per_layer - trained


# ------------------------------------------------------------------------------------------ merge
MERGE_RUNS = {"lora": ("lora", "ln"), "dora": ("dora", ""), "pissa": ("pissa", ""), "bone": ("bone", ""),
              "bat": ("bat", ""), "full": ("full", ""), "lora-de": ("lora", "deepembed time")}
MERGE_TOKENS = [t % 256 for t in TOKENS[:12]]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every method trained 2 steps on a 7a model, merged in fp32, run in the package with RWKV_DE_VERSION=1."""
    import os

    from trainer import checkpoint
    from trainer.loop import train
    root = tmp_path_factory.mktemp("de_merge")
    (root / "data").mkdir()
    cwd = os.getcwd()
    os.chdir(root)
    res, jobs = {}, []
    try:
        _project(root)
        for name, (mode, parts) in MERGE_RUNS.items():
            lr = "2e-3" if mode == "full" else "1e-2"
            train(_config(FINETUNE_MODE=mode, OUTPUT=f"out-{name}", TRAIN_PARTS=parts, EPOCH_STEPS=2, EPOCH_COUNT=1,
                          LR_INIT=lr, LR_FINAL=lr), progress=False, log=lambda *_: None)
            r = checkpoint.merge_epoch(0, output_dir=f"out-{name}", merge_dir=f"merge-{name}", dtype="fp32")
            model = checkpoint.load_model("model/tiny7a.pth", dtype=torch.float32)
            model.op = "chunk"
            with torch.no_grad():
                base = model(torch.tensor([MERGE_TOKENS]))[0]
            checkpoint.attach_adapter(model, f"out-{name}/rwkv-0.pth", "model/tiny7a.pth")
            with torch.no_grad():
                ours = model(torch.tensor([MERGE_TOKENS]))[0]
            res[name] = {"result": r, "ours": ours, "base": base, "job": len(jobs)}
            jobs.append({"model": str(root / r.model), "tokens": MERGE_TOKENS})
    finally:
        os.chdir(cwd)
    out = run_rwkv_package("7a", jobs)
    for e in res.values():
        e["pkg"] = out[e["job"]]["logits"]
    return res, root


@pytest.mark.parametrize("name", list(MERGE_RUNS))
def test_merged_7a_in_rwkv_package_equals_adapter(merged, name):
    from trainer.checkpoint import load_checkpoint
    res, root = merged
    e = res[name]
    assert (e["ours"] - e["base"]).abs().max() > 1e-3, "training changed nothing: the test would prove nothing"
    _close(e["pkg"], e["ours"], atol=1e-4)
    sd = load_checkpoint(root / e["result"].model)
    base = load_checkpoint(root / "model" / "tiny7a.pth")
    assert set(sd) == set(base)                   # the released layout: s_emb and s_emb_x as stored, unfolded
    assert tuple(sd["blocks.1.ffn.s_emb.weight"].shape) == (256, 1024)
    assert torch.equal(sd["blocks.1.ffn.s_emb_x.weight"], base["blocks.1.ffn.s_emb_x.weight"]) == (name != "lora-de")


def test_printed_snippet_sets_de_version_and_matches(merged):
    import json
    import os
    import subprocess
    import sys

    from tools import merge as merge_tool
    res, root = merged
    e = res["lora"]
    text = merge_tool.usage_text(e["result"])
    assert 'os.environ["RWKV_DE_VERSION"] = "1"' in text and "RWKV-7a" in text
    code = text.split("the rwkv package (pip install rwkv):\n")[1]
    code = "\n".join(line[4:] for line in code.splitlines() if line.startswith("    "))
    code = code.replace("[token ids]", str(MERGE_TOKENS)).replace('"cuda fp16"', '"cpu fp32"')
    code += "\nimport json; print('LOGITS', json.dumps([float(x) for x in logits]))"
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RWKV_V7_ON", None)
    env.pop("RWKV_DE_VERSION", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, code + "\n" + p.stdout[-2000:] + p.stderr[-2000:]
    got = torch.tensor(json.loads(p.stdout.split("LOGITS ")[-1]))
    _close(got, e["ours"][-1], atol=1e-4)


def test_make_model_deep_embed_makes_a_7a_the_rwkv_package_runs(tmp_path, capsys):
    """tools.make_model --deep-embed: an RWKV-7a file (rank 32) detected as such, whose logits are the rwkv
    package's (RWKV_DE_VERSION=1); its gate near 1 but not 1 (token by token); the rest the plain RWKV-7's."""
    from tools import make_model
    from trainer.checkpoint import load_checkpoint
    from trainer.deepembed import deep_embed_inputs, deep_gate, deep_mix, deep_rows
    from trainer.errors import run_cli
    path, plain = tmp_path / "v7a.pth", tmp_path / "v7.pth"
    common = ["--version", "7", "--layers", "2", "--width", "128", "--vocab", str(VOCAB), "--dtype", "fp32",
              "--seed", "5"]
    assert make_model.main(common + ["--out", str(path), "--deep-embed"]) == 0
    assert "RWKV-7a (DeepEmbed rank 32)" in capsys.readouterr().out
    make_model.main(common + ["--out", str(plain)])
    sd, sd7 = load_checkpoint(path), load_checkpoint(plain)
    cfg = detect_config(sd, path)
    assert cfg.version == 7 and cfg.deep_embed == 32 and sd["blocks.1.ffn.s_emb.weight"].shape == (VOCAB, 1024)
    assert {k for k in sd if k not in sd7} == {f"blocks.{i}.ffn.{n}" for i in range(2) for n in
                                               ("s_emb.weight", "s_emb_x.weight", "s1", "s2", "s0")}
    assert all(torch.equal(sd7[k], sd[k]) for k in sd7)
    model = load_model(path)
    idx = torch.tensor([TOKENS])
    with torch.no_grad():
        x = model.emb(idx)
        ffn, blk = model.blocks[0].ffn, model.blocks[0]          # block 0's FFN input, its attention left out
        gate = deep_gate(ffn, deep_mix(ffn, blk.ln2(blk.ln0(x)), deep_rows(ffn, deep_embed_inputs(model, idx, x))))
        logits = model(idx)[0]
    by_token = (gate - gate.mean(1, keepdim=True)).std().item()
    assert abs(gate.mean().item() - 1) < 0.05 and 0.05 < gate.std().item() < 0.5 and by_token > 0.05, \
        (gate.mean(), gate.std(), by_token)
    out = run_rwkv_package("7a", [dict(model=str(path), tokens=TOKENS, split=SPLIT)])[0]
    _close(logits, out["logits"])
    with pytest.raises(SystemExit) as e:
        run_cli(make_model.main, ["--version", "6", "--layers", "1", "--width", "64", "--out", str(plain),
                                  "--deep-embed"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "use --version 7 --deep-embed" in err


def test_a_rank_the_rwkv_package_cannot_run_is_noted_not_refused(tmp_path, monkeypatch):
    """Our model runs any DeepEmbed rank, the rwkv package 32 only: training's log and merge's notes say so in one
    line for rank 8, and nothing for the released rank 32."""
    from trainer import checkpoint
    from trainer.loop import prepare
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)                                                     # rank 32
    save_atomic(random_model_7a(2, 128, 256, seed=2, rank=8).state_dict(), tmp_path / "model" / "r8.pth")
    for name, rank in (("tiny7a.pth", 32), ("r8.pth", 8)):
        said = []
        prep = prepare(_config(MODEL=name, EPOCH_COUNT=1), log=said.append)
        assert prep.model.cfg.deep_embed == rank
        notes = [s for s in said if "rwkv package" in s and "DeepEmbed rank" in s]
        assert notes == ([] if rank == 32 else [f"note: model/r8.pth is an RWKV-7a model with DeepEmbed rank 8: "
                                                "this toolkit runs it, but the rwkv package (RWKV_DE_VERSION=1) "
                                                "runs rank 32 only, so it cannot run this model or what is merged "
                                                "from it"]), said
    torch.save({"blocks.0.att.receptance.lora_A": torch.zeros(4, 128),
                "blocks.0.att.receptance.lora_B": torch.zeros(128, 4)}, "rwkv-0.pth")
    res = checkpoint.merge_checkpoint("rwkv-0.pth", "model", "merged", "fp32", base="r8.pth", lora_alpha=8)
    assert sum("runs rank 32 only" in n for n in res.notes) == 1


# ------------------------------------------------------------------------------ tables in CPU memory
def _lora_7a(train_parts=("time", "ln"), seed=4):
    """A tiny 7a model with LoRA (B moved off zero) and ``train_parts``, training, checkpointing off."""
    from trainer.peft import get_method
    model = random_model_7a(2, 128, 256, seed=seed)
    get_method("lora")({"r": 8, "alpha": 16}).apply(model, train_parts=train_parts)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    model.op = "chunk"
    return model.train()


def _logits_and_grads(model, idx):
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("grad_cp", [False, True])
def test_tables_held_in_cpu_memory_give_the_same_logits_and_gradients(tables_elsewhere, grad_cp):
    """The frozen embedding and DeepEmbed tables held in CPU memory (tables.hold_tables, as on one GPU), their
    rows gathered where they are and copied (forced: every table is on the CPU here): the logits and every
    gradient exactly those of the tables in place, checkpointed or not. One lookup per table and forward pass:
    a checkpointed block's recompute looks nothing up (the rows are its input)."""
    from trainer.tables import held, hold_tables
    model = _lora_7a()
    model.grad_cp = grad_cp
    want_logits, want = _logits_and_grads(model, IDX)
    assert tables_elsewhere == [] and len(want) > 10
    keys = hold_tables(model, emb=True, deep_embed=True)
    assert keys == ["emb.weight", "blocks.0.ffn.s_emb.weight", "blocks.1.ffn.s_emb.weight"]
    assert {n for n, p in model.named_parameters() if held(p)} == set(keys)
    logits, got = _logits_and_grads(model, IDX)
    assert len(tables_elsewhere) == 3                                # emb + 2 layers' s_emb
    assert torch.equal(logits, want_logits) and got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    with torch.no_grad():                                            # inference's calls, the state carried
        whole, _ = model.forward_with_state(IDX)
        first, state = model.forward_with_state(IDX[:, :10])
        rest, _ = model.forward_with_state(IDX[:, 10:], state)
    _close(torch.cat([first, rest], 1), whole)
    _close(whole, want_logits)


def test_trained_tables_get_the_gradient_of_a_plain_lookup(monkeypatch, tables_elsewhere):
    """TRAIN_PARTS=deepembed: the s_emb rows looked up before each block carry the gradient to s_emb.weight, equal
    (1e-6 of its largest entry) to that of the table multiplied by the tokens' one-hot vectors (the lookup as a
    product), checkpointed or not; a trained table is refused by hold_on_cpu."""
    import torch.nn.functional as F

    from trainer import deepembed, tables
    model = _lora_7a(train_parts=("deepembed",))
    with pytest.raises(ValueError, match="frozen"):
        tables.hold_tables(model, emb=False, deep_embed=True)
    names = [f"blocks.{i}.ffn.s_emb.weight" for i in range(2)]
    runs = {}
    for cp in (False, True):
        model.grad_cp = cp
        runs[cp] = _logits_and_grads(model, IDX)[1]
    with monkeypatch.context() as m:
        m.setattr(deepembed, "lookup", lambda w, ids, device: (F.one_hot(ids, w.shape[0]).to(w.dtype) @ w).to(device))
        ref = _logits_and_grads(model, IDX)[1]
    for cp, got in runs.items():
        for n in names:
            scale = ref[n].abs().max().item()
            assert scale > 0 and (got[n] - ref[n]).abs().max().item() <= 1e-6 * scale, (cp, n)
        assert all((got[n] - ref[n]).abs().max() <= 1e-6 * ref[n].abs().max() for n in ref)
    assert tables_elsewhere == []                        # nothing held: a trained table stays where it is


def test_to_device_leaves_the_held_tables_where_they_are():
    """QLoRA's streaming and OFFLOAD_BLOCKS move a model's parts to the GPU with tables.to_device: every tensor
    goes (here to 'meta') but the held tables; offload never streams a DeepEmbed table (its rows are read before
    the block runs)."""
    from trainer import offload, tables
    model = _lora_7a()
    tables.hold_tables(model, emb=True, deep_embed=True)
    tables.to_device(model, "meta")
    where = {n: p.device.type for n, p in model.named_parameters()}
    assert {n for n, d in where.items() if d == "cpu"} == {"emb.weight", "blocks.0.ffn.s_emb.weight",
                                                           "blocks.1.ffn.s_emb.weight"}
    assert all(b.device.type == "meta" for b in model.buffers())
    streamed = offload.streamable(_lora_7a().blocks[1])
    assert "ffn.s_emb_x.weight" in streamed and "ffn.s_emb.weight" not in streamed


def test_a_run_holding_the_tables_trains_as_one_with_them_in_place(tmp_path, monkeypatch, tables_elsewhere):
    """What a one-GPU run does (plan.emb_on_cpu, plan.deep_embed_on_cpu; forced here, the lookups taking the other
    device's path): the loader leaves both kinds of table in the file, the trainer holds them in CPU memory, the
    plan says so, and the losses equal a run's with the tables in place, step by step."""
    import dataclasses

    from trainer import checkpoint
    from trainer import plan as planning
    from trainer.loop import prepare, train
    from trainer.tables import held
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    _project(tmp_path)
    cfg = dict(EPOCH_COUNT=1, GRAD_CP=1, TRAIN_PARTS="ln", OVERWRITE=1)
    want = train(_config(**cfg), progress=False, log=lambda *_: None).losses
    assert tables_elsewhere == []
    resolve, load, keeps = planning.resolve, checkpoint.load_model, []
    monkeypatch.setattr(planning, "resolve", lambda *a, **k: dataclasses.replace(
        resolve(*a, **k), emb_on_cpu=True, deep_embed_on_cpu=True))

    def loading(*a, keep_on_cpu=None, **k):
        keeps.append(keep_on_cpu)
        return load(*a, keep_on_cpu=keep_on_cpu, **k)
    monkeypatch.setattr(checkpoint, "load_model", loading)
    prep = prepare(_config(**cfg), log=lambda *_: None)
    assert {n for n, p in prep.model.named_parameters() if held(p)} == {
        "emb.weight", "blocks.0.ffn.s_emb.weight", "blocks.1.ffn.s_emb.weight"}
    assert len(keeps) == 1 and [keeps[0](n) for n in ("emb.weight", "blocks.1.ffn.s_emb.weight", "blocks.1.ffn.s_emb_x.weight",
                           "blocks.1.ffn.key.weight", "head.weight")] == [True, True, False, False, False]
    assert any("embedding in CPU memory; DeepEmbed tables (ffn.s_emb) in CPU memory" in ln
               for ln in prep.plan.describe())
    got = train(_config(**cfg), progress=False, log=lambda *_: None).losses
    assert len(got) == 4 and got == want and len(tables_elsewhere) >= 3 * 4
