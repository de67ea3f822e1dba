"""bench/train_speed.py on the CPU: one tiny row end to end through the trainer (its own subprocess), the
JSON record, the FLOPs formulas by hand, the named grids and the out-of-memory path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_speed  # noqa: E402
from trainer.checkpoint import config_from_sizes  # noqa: E402


def test_one_tiny_row_on_the_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "bench/train_speed.py", "--size", "tiny", "--method", "lora", "--ctx", "32", "--bsz", "2",
           "--steps", "2", "--warmup", "1", "--vocab", "512", "--peak-tflops", "1", "--model-dir", str(tmp_path),
           "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "MFU peak: 1.0 TFLOP/s" in p.stdout and "tokens/s" in p.stdout
    table_row = [ln for ln in p.stdout.splitlines() if ln.startswith("7  tiny lora")]
    assert len(table_row) == 1 and table_row[0].endswith("| ok"), p.stdout
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "ok" and r["op_resolved"] == "chunk" and r["device"] == "cpu"
    assert (r["version"], r["n_layer"], r["n_embd"], r["vocab"], r["ctx"], r["bsz"], r["grad_cp"]) == \
        (7, 2, 128, 512, 32, 2, 1)
    assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["tokens_per_s_median"] > 0
    assert len(r["step_tokens_per_s"]) == 3                                        # warm-up included
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"], rel=1e-2)
    # LoRA r 64 on RWKV-7 2 × 128: att r/k/v/o 64·256 each, ffn key and value 64·640 each, per layer
    assert r["params_trained"] == 2 * (4 * 64 * 256 + 2 * 64 * 640)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token_model"] / 1e12, rel=1e-2, abs=1e-4)
    assert r["hfu"] >= r["mfu"] and r["flops_per_token_hw"] > r["flops_per_token_model"]
    assert r["est_total_bytes"] > r["est_alloc_bytes"] > 0 and "head" in r["est_terms"]
    assert "peak_alloc_bytes" not in r and "peak_used_bytes" not in r          # no GPU: no GPU columns
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert r["commit"] == head and r["versions"]["torch"] == torch.__version__
    assert "--size tiny" in r["command"] and "--method lora" in r["command"] and "--vocab 512" in r["command"]
    assert (tmp_path / "rwkv7-2x128-v512.pth").is_file()          # the random model is cached for the next rows


def _tiny(vocab=512):
    return config_from_sizes(7, 2, 128, vocab_size=vocab)


def _cfg(**kw):
    row = dict(version=7, size="tiny", method="lora", ctx=64, bsz=2, grad_cp=1, op="chunk", infctx=0,
               train_parts="", vocab=512)
    row.update(kw)
    return train_speed.row_config(row)


def test_flops_by_hand():
    C, V, N = 128, 512, 64
    d = 32 + 32 + 64                                     # w, a, g low-rank widths of 2 × 128 (v: 32, layer 1 only)
    n_mm = 2 * (12 * C * C + 2 * C * d) + 2 * C * 32 + V * C
    W = 2 * 9 * C * N
    full = train_speed.flops_per_token(_cfg(method="full", grad_cp=0), _tiny())
    assert full["n_mm"] == n_mm and full["wkv"] == W
    assert full["model"] == full["hardware"] == 6 * n_mm + 3 * W
    full_cp = train_speed.flops_per_token(_cfg(method="full", grad_cp=1), _tiny())
    assert full_cp["model"] == 6 * n_mm + 3 * W
    assert full_cp["hardware"] == full_cp["model"] + 2 * (n_mm - V * C) + W
    lora = train_speed.flops_per_token(_cfg(method="lora", grad_cp=1), _tiny())
    adp = 2 * (4 * 64 * 2 * C + 2 * 64 * 5 * C)          # r·(in+out) per adapted layer
    assert lora["n_adapter"] == adp and lora["n_trained_mm"] == adp
    assert lora["model"] == 4 * (n_mm + adp) + 3 * W + 2 * adp
    assert lora["hardware"] == lora["model"] + 2 * (n_mm - V * C + adp) + W
    state = train_speed.flops_per_token(_cfg(method="state", grad_cp=0), _tiny())
    assert state["model"] == state["hardware"] == 4 * n_mm + 3 * W          # no weight gradients at all


def test_a_slow_step_in_the_window_is_flagged():
    row = dict(version=7, size="1.5B", method="lora", ctx=1024, bsz=1, grad_cp="auto", op="auto", infctx=0)
    rates = [47, 101, 10795, 12860, 1281, 12898, 12570, 12461, 12735]           # measured, session 8
    res = dict(status="ok", tokens_per_s=7295.0, step_s=0.14, step_tokens_per_s=rates, tokens_per_s_median=12665.5,
               measured_steps=6)
    assert "median step 12,666 tok/s: a slow step in the window" in train_speed.format_row(row, res)
    res.update(tokens_per_s=12500.0)
    assert train_speed.format_row(row, res).endswith("| ok")


def test_named_grids():
    rows, _ = train_speed.named_grid("peft-table")
    assert len(rows) == 8
    assert all((r["ctx"], r["bsz"], r["grad_cp"]) == (1024, 1, 1) for r in rows)
    assert {(r["version"], r["size"], r["method"]) for r in rows} == {
        (7, s, m) for s in ("1.5B", "3B") for m in ("state", "lora", "lora+nf4")} | {
        (6, "7B", "lora"), (6, "7B", "lora+nf4")}
    assert train_speed.named_grid("mfu")[0] == [dict(version=7, size="1.5B", method="full", ctx=4096, bsz=8,
                                                     grad_cp=cp, op="auto", infctx=0, compile="auto",
                                                     train_parts="", stream="auto") for cp in (1, "auto")]
    memfit, defaults = train_speed.named_grid("memfit")
    assert defaults == {"steps": 3, "warmup": 2} and len(memfit) >= 20
    for grid in ("peft-table", "anchors", "mfu", "memfit"):      # every row is a valid training config
        for row in train_speed.named_grid(grid)[0]:
            cfg = train_speed.row_config(row)
            assert cfg.FINETUNE_MODE == train_speed.parse_method(row["method"])[0]
    p = subprocess.run([sys.executable, "bench/train_speed.py", "--grid", "peft-table", "--list"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.count("bench/train_speed.py") == 8


def test_grad_cp_values_of_a_row():
    """--grad-cp: 0, 1, auto, or a forced plan of auto (what the bench runs as GRAD_CP=auto): top:N (N blocks
    not checkpointed), kp:M (M keeping their products), or both; anything else is refused."""
    got = [train_speed._cp_value(v) for v in ("0", "1", "auto", "top:8", "kp:12", "top:1,kp:23", 1, True)]
    assert got == [0, 1, "auto", "top:8", "kp:12", "top:1,kp:23", 1, 1]
    for bad in ("top:x", "kp:", "top:1,xx:2", "keep:3"):
        with pytest.raises(ValueError):
            train_speed._cp_value(bad)
    row = train_speed._row(7, "1.5B", "full", 4096, 8, "top:8")
    assert train_speed._forced_plan(row) == (8, 0) and train_speed.row_config(row).GRAD_CP == "auto"
    assert train_speed._forced_plan(train_speed._row(7, "1.5B", "full", 4096, 8, "top:1,kp:23")) == (1, 23)
    assert train_speed._forced_plan(train_speed._row(7, "1.5B", "full", 4096, 8, "auto")) is None


def test_method_and_size_names():
    assert train_speed.parse_method("lora+nf4") == ("lora", "nf4")
    assert train_speed.parse_method("qlora") == ("lora", "nf4")
    assert train_speed.parse_method("state") == ("state", "none")
    assert train_speed.parse_method("dora+fp8") == ("dora", "fp8")
    assert train_speed.parse_size("7B") == (32, 4096) and train_speed.parse_size("4x256") == (4, 256)
    with pytest.raises(SystemExit):
        train_speed.parse_method("lora+fp4")


def test_a_7a_row_makes_its_model_with_make_models_code_and_trains(tmp_path, monkeypatch, capsys):
    """--deep-embed R: a row's model is an RWKV-7a one of rank R, made by tools.make_model's code (its DeepEmbed
    drawn: the gate is not 1), cached under a name of its own; the row's sizes (what the estimate and the
    calibration read) are the file's; the row trains through the trainer, its estimate without the s_emb tables
    (in CPU memory on one GPU); its command repeats the option; RWKV-6 rows are refused."""
    from tools.make_model import new_model
    from trainer import device as gpu
    from trainer import loop
    from trainer import plan as planning
    from trainer.checkpoint import detect_config, load_checkpoint
    from trainer.counts import param_table
    for name in ("RunFiles", "learning_rate"):                     # run_row replaces these: restored afterwards
        monkeypatch.setattr(loop, name, getattr(loop, name))
    monkeypatch.setattr(planning, "resolve", planning.resolve)
    monkeypatch.setattr(gpu, "trim_thread_stack", gpu.trim_thread_stack)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # make_model_file's: the tests keep one
    path = tmp_path / "rwkv7a8-2x128-v512.pth"
    train_speed.make_model_file(7, 2, 128, 512, str(path), 8)
    assert train_speed.ensure_model(7, 2, 128, 512, tmp_path, 1, deep_embed=8) == path   # made: not again
    row = dict(train_speed._row(7, "tiny", "lora", 16, 2, 1, op="chunk", deep_embed=8), vocab=512)
    sd, sizes = load_checkpoint(path), train_speed.row_sizes(row)
    assert detect_config(sd) == sizes and sizes.deep_embed == 8
    made = new_model(sizes, output_gain=0.0).state_dict()
    assert sd.keys() == made.keys() and all(torch.equal(sd[k], made[k].bfloat16()) for k in sd)
    assert sd["blocks.1.ffn.s_emb.weight"].abs().max() > 0 and (sd["blocks.1.ffn.s0"] != 1).any()
    train_speed.make_data(tmp_path / "data", 512, 4096)
    res = train_speed.run_row(dict(row, model_path=str(path), data_prefix=str(tmp_path / "data"),
                                   output=str(tmp_path / "out"), steps=1, warmup=1, precision="bf16", lora_r=8,
                                   lora_alpha=16.0, peak_tflops=None))
    assert res["status"] == "ok" and res["deep_embed_on_cpu"] is False and res["loss_last"] > 0
    t = param_table(train_speed.row_config(row), sizes)
    assert res["params_total"] == sum(v.numel() for v in sd.values()) == t.total
    tables = 512 * 128 + 2 * 512 * 8 ** 2                          # emb + s_emb: the GPU plan keeps them on the CPU
    assert res["est_terms"]["weights"] == (t.frozen + t.buffers - tables) * 2
    assert train_speed.format_row(row, res).startswith("7a  tiny lora")
    assert train_speed.main(["--size", "tiny", "--deep-embed", "8", "--list"]) == 0
    assert "--deep-embed 8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="RWKV-7a, an RWKV-7 model, not RWKV-6"):
        train_speed.main(["--version", "6", "--size", "tiny", "--deep-embed", "32", "--list"])


def test_out_of_memory_is_a_row_status(tmp_path, monkeypatch):
    from trainer import loop
    monkeypatch.setattr(loop, "RunFiles", loop.RunFiles)          # run_row replaces it: restore afterwards

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(loop, "train", oom)
    spec = dict(version=7, size="tiny", method="lora", ctx=64, bsz=1, grad_cp=1, op="chunk", infctx=0, train_parts="",
                model_path=str(tmp_path / "m.pth"), data_prefix=str(tmp_path / "d"), output=str(tmp_path / "o"),
                steps=2, warmup=1, precision="fp32", lora_r=8, lora_alpha=16.0, vocab=512, peak_tflops=None)
    res = train_speed.run_row(spec)
    assert res["status"] == "OOM" and "Tried to allocate" in res["error"]
    assert "OOM" in train_speed.format_row(spec, res)


def test_valid_cost_on_the_cpu(tmp_path):
    """bench/valid_cost.py: the trainer with VALID_DATA, each validation's time and tokens read from its log."""
    out = tmp_path / "v.jsonl"
    cmd = [sys.executable, "bench/valid_cost.py", "--size", "2x64", "--vocab", "512", "--ctx", "32", "--items", "6",
           "--steps", "4", "--valid-every", "2", "--model-dir", str(tmp_path), "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [v["step"] for v in r["validations"]] == [2, 4] and r["device"] == "cpu"
    assert all(v["tokens"] == 6 * 32 and v["seconds"] > 0 for v in r["validations"])
    assert r["valid_s_steady"] == r["validations"][1]["seconds"] and r["valid_in_train_steps"] > 0
    assert len(r["sample_s"]) == 1 and r["sample_s"][0] > 0        # the one save's sample, timed
