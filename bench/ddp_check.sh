#!/usr/bin/env bash
# On a machine with 2 GPUs: the same training on one GPU (MICRO_BSZ=4) and on two (MICRO_BSZ=2 each, DDP),
# which see the same items at every step; prints both loss curves and their largest relative difference.
# Usage: bash bench/ddp_check.sh
set -euo pipefail
ROOT=$(pwd); W=$(mktemp -d); mkdir -p $W/model $W/data; cp data/sample.jsonl $W/data/
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m tools.make_model --version 7 --layers 4 --width 512 --out $W/model/m.pth >/dev/null
cd $W && python3 -m tools.make_tokenize sample.jsonl 8 >/dev/null
common="MODEL=m.pth DATA=sample CTX_LEN=192 EPOCH_STEPS=22 EPOCH_COUNT=2 LR_INIT=1e-3 LR_FINAL=1e-4 OP=${OP:-chunk} PRECISION=bf16 TRAIN_PARTS=ln SEED=1"
env $common OUTPUT=one MICRO_BSZ=4 GPU_COUNT=1 python3 -m tools.train --no-progress | grep -E "training|saved"
env $common OUTPUT=two MICRO_BSZ=2 GPU_COUNT=2 python3 -m tools.train --no-progress | grep -E "training|saved"
python3 - <<'PY'
import csv
one = [float(r["loss"]) for r in csv.DictReader(open("one/loss.csv"))]
two = [float(r["loss"]) for r in csv.DictReader(open("two/loss.csv"))]
print("step  1 GPU x4   2 GPUs x2")
for i, (a, b) in enumerate(zip(one, two)):
    if i % 4 == 0 or i == len(one) - 1:
        print(f"{i + 1:4d}  {a:8.4f}  {b:8.4f}")
print(f"steps {len(one)} / {len(two)}; largest relative difference {max(abs(a - b) / a for a, b in zip(one, two)):.2e}")
print(f"mean of the last 10: {sum(one[-10:]) / 10:.4f} vs {sum(two[-10:]) / 10:.4f}")
PY
