"""./demo.sh: the whole workflow on a tiny model made on the spot, on the CPU, in about a minute.

1. make a tiny random RWKV-7 (model/demo.pth)           -- what tools.make_model does (every method learns on it)
2. tokenize data/sample.jsonl (data/sample.bin + .idx)   -- ./make_tokenize.sh sample.jsonl 2
3. fine-tune it with LoRA (output/demo/)                 -- what ./training.sh does, same config object
4. merge epoch 2 into the base (merge/demo/)             -- what ./merge.sh does
5. generate text from the merged model with the official `rwkv` package
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.errors import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEMO_TRAINING = {                      # the training.sh variables of the demo run
    "MODEL": "demo.pth", "DATA": "sample", "OUTPUT": "output/demo",
    "FINETUNE_MODE": "lora", "LORA_R": "32", "LORA_ALPHA": "64",
    # A random model knows no words yet: LoRA alone would learn them slowly, so the demo also trains the
    # embeddings and the head. On a real base model LoRA alone is the usual choice.
    "TRAIN_PARTS": "emb head",
    "CTX_LEN": "192", "DATALOAD": "pad", "LOSS_MASK": "pad",
    # a tenth of the texts held out (both copies) to see whether it learns more than those it trains on
    "VALID_FRACTION": "0.1",
    "MICRO_BSZ": "8", "EPOCH_STEPS": "10", "EPOCH_COUNT": "3",    # 80 items left = 8 x 10: one pass per epoch
    "LR_INIT": "2e-2", "LR_FINAL": "5e-3", "WARMUP_STEPS": "2",
    "PRECISION": "auto", "ACCELERATOR": "cpu", "OP": "auto", "GRAD_CP": "0", "SEED": "42",
    "SAMPLE_PROMPT": "User: What is RWKV?\n\nAssistant:",
    "OVERWRITE": "1",                  # output/demo is the demo's own: each run of the demo replaces the last
}
PROMPT = "User: What is RWKV?\n\nAssistant:"


def say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./demo.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=int(DEMO_TRAINING["EPOCH_COUNT"]), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    t0 = time.time()

    import torch
    from trainer import checkpoint
    from trainer.config import TrainConfig
    from trainer.data.binidx import BinIdx
    from trainer.inference import evaluate_loss
    from trainer.loop import train
    from trainer.model import FINETUNE_OUTPUT_GAIN

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    say("1/5  a tiny random RWKV-7: 2 layers, 128 wide, the full 65536-token vocabulary -> model/demo.pth")
    cfg = checkpoint.config_from_sizes(7, 2, 128)
    # small random output projections (RWKV-LM starts them at zero): every method learns on this model
    model = checkpoint.init_model(cfg, seed=0, output_gain=FINETUNE_OUTPUT_GAIN)
    checkpoint.save_atomic(model.state_dict(), "model/demo.pth")

    say("2/5  ./make_tokenize.sh sample.jsonl 2")
    subprocess.run(["bash", "make_tokenize.sh", "sample.jsonl", "2"], check=True)

    say("3/5  fine-tune with LoRA (the training.sh variables are in tools/demo.py)")
    env = dict(DEMO_TRAINING, EPOCH_COUNT=str(args.epochs))
    tcfg = TrainConfig.from_env(env)
    data = BinIdx(tcfg.data_prefix)
    docs = [data[i] for i in range(20)]

    def loss_of(model) -> float:
        return evaluate_loss(model, docs)["loss"]

    base = checkpoint.load_model("model/demo.pth", dtype=torch.float32)
    base.op = "chunk"
    before = loss_of(base)
    result = train(tcfg, progress=sys.stderr.isatty())
    last = tcfg.EPOCH_COUNT - 1
    tuned = checkpoint.load_model("model/demo.pth", dtype=torch.float32)
    tuned.op = "chunk"
    checkpoint.attach_adapter(tuned, f"{tcfg.OUTPUT}/rwkv-{last}.pth", "model/demo.pth")
    after = loss_of(tuned)
    n = max(1, len(result.losses) // 5)
    print(f"training loss: first {n} steps {sum(result.losses[:n]) / n:.2f} -> last {n} steps "
          f"{sum(result.losses[-n:]) / n:.2f}   (plot: {tcfg.OUTPUT}/loss.png)")
    print(f"loss on the first 20 items (python -m tools.evaluate): base {before:.2f} -> with the adapter "
          f"{after:.2f}")
    print("validation loss, on texts it never trained on (VALID_FRACTION=0.1): "
          + ", ".join(f"{v:.2f} (step {s})" for s, v in result.valid_losses)
          + f"; the best is kept as {tcfg.OUTPUT}/rwkv-best.pth")

    say(f"4/5  ./merge.sh {last}   (OUTPUT=output/demo MERGE_DIR=merge/demo)")
    res = checkpoint.merge_epoch(last, output_dir=tcfg.OUTPUT, model_dir="model", merge_dir="merge/demo",
                                 dtype="fp32", overwrite=True)     # merge/demo is the demo's own
    print(f"merged model: {res.model}")

    say("5/5  the merged model in the official rwkv package (what RWKV-Runner and Ai00 load)")
    snippet = (
        "import os; os.environ['RWKV_V7_ON'] = '1'; os.environ['RWKV_JIT_ON'] = '0'\n"
        "from rwkv.model import RWKV\n"
        "from rwkv.utils import PIPELINE, PIPELINE_ARGS\n"
        f"model = RWKV(model={str(res.model.with_suffix(''))!r}, strategy='cpu fp32')\n"
        "pipe = PIPELINE(model, 'rwkv_vocab_v20230424')\n"
        f"prompt = {PROMPT!r}\n"
        "out = pipe.generate(prompt, token_count=40, args=PIPELINE_ARGS(temperature=1.0, top_p=0.3))\n"
        "print(repr(prompt + out))\n"
    )
    subprocess.run([sys.executable, "-c", snippet], check=True)
    print(f"\ndone in {time.time() - t0:.0f} s. With your own data: put FILE.jsonl in data/, run "
          "./make_tokenize.sh FILE.jsonl, put a base model in model/, edit training.sh, run ./training.sh, "
          "then ./merge.sh EPOCH (see README.md).")
    return 0


if __name__ == "__main__":
    run_cli(main)
