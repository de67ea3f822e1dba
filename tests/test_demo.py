"""./demo.sh, the README's first command, runs the whole workflow and the loss falls; every method learns on
the kind of random base model the demo (and tools.make_model) makes."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_workflow():
    out = subprocess.run(["bash", "demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    base, tuned = map(float, re.search(r"base ([\d.]+) -> with the adapter ([\d.]+)", text).groups())
    assert base > 10 and tuned < base - 3, text[-2000:]
    valid = [float(v) for v in re.findall(r"([\d.]+) \(step \d+\)", text.split("validation loss, on texts")[1])]
    assert len(valid) == 3 and valid[-1] < base - 1.5, text[-2000:]   # the held-out texts: it learned the words
    assert (ROOT / "output" / "demo" / "rwkv-best.pth").is_file()
    assert (ROOT / "merge" / "demo" / "demo-lora-2.pth").is_file()
    assert "Loading merge/demo/demo-lora-2" in text          # the official rwkv package loaded it
    assert "'User: What is RWKV?\\n\\nAssistant:" in text


# measured on this base (RWKV-5/6/7 alike; tools.make_model's and the demo's recipe) with the settings below:
# the loss fell 1.95-2.07 (lora), 1.74-1.90 (pissa), 0.60-0.89 (bone), 1.53-1.65 (bat), 0.30-0.38 (state),
# 3.04-3.14 (full); asserted: about half of the least
MIN_DROP = {"lora": 1.0, "pissa": 0.9, "bone": 0.3, "bat": 0.75, "state": 0.15, "full": 1.5}
LR = {"lora": "1e-2", "pissa": "1e-2", "bone": "1e-2", "bat": "1e-2", "state": "1", "full": "1e-3"}


@pytest.mark.parametrize("version", [5, 6, 7])
@pytest.mark.parametrize("mode", list(MIN_DROP))
def test_every_method_learns_on_the_demos_kind_of_base(tmp_path, monkeypatch, mode, version):
    """A random model made as the demo makes its base (small random output projections: FINETUNE_OUTPUT_GAIN)
    lets every method learn: 8 steps on 8 items (2 steps an epoch, 4 epochs, constant LR) on the CPU, and the
    mean loss of the last epoch is below the first's by MIN_DROP. (On RWKV-LM's zero projections state tuning
    and PiSSA are refused: test_train, test_peft.)"""
    from trainer import checkpoint
    from trainer.config import TrainConfig
    from trainer.data.binidx import write_binidx
    from trainer.loop import train
    from trainer.model import FINETUNE_OUTPUT_GAIN
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(1)
    write_binidx(tmp_path / "data" / "toy", [list(rng.integers(1, 256, size=rng.integers(20, 32))) + [0]
                                             for _ in range(8)])
    model = checkpoint.init_model(checkpoint.config_from_sizes(version, 2, 128, 256), seed=0,
                                  output_gain=FINETUNE_OUTPUT_GAIN)
    checkpoint.save_atomic(model.state_dict(), tmp_path / "model" / "tiny.pth")
    cfg = TrainConfig.from_env(dict(
        MODEL="tiny.pth", DATA="toy", FINETUNE_MODE=mode, LORA_R="8", LORA_ALPHA="16", PISSA_R="8", DISHA_R="32",
        CTX_LEN="32", MICRO_BSZ="4", EPOCH_STEPS="2", EPOCH_COUNT="4", EPOCH_SAVE="9", LR_INIT=LR[mode],
        LR_FINAL=LR[mode], LR_SCHEDULE="const", ACCELERATOR="cpu", OP="chunk", GRAD_CP="0", SAMPLE_PROMPT="ab"))
    losses = train(cfg, progress=False, log=lambda *_: None).losses
    assert len(losses) == 8
    drop = np.mean(losses[:2]) - np.mean(losses[-2:])
    assert drop > MIN_DROP[mode], losses
