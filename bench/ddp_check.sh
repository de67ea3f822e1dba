#!/usr/bin/env bash
# On a machine with 2 GPUs: the same training on one GPU (MICRO_BSZ=4) and on two (MICRO_BSZ=2 each) with
# DDP and with DeepSpeed ZeRO stage 2 (and whatever STRATEGIES lists), which all see the same items at every
# step; then a DeepSpeed run stopped after 20 micro steps and resumed on 2 GPUs. Prints the loss curves and
# their largest relative difference to the 1-GPU curve.
# Usage: bash bench/ddp_check.sh   (STRATEGIES="deepspeed_stage_2 deepspeed_stage_1" OP=chunk; each run takes
# 30-60 s, give it 8 minutes)
set -euo pipefail
ROOT=$(pwd); W=$(mktemp -d); mkdir -p $W/model $W/data; cp data/sample.jsonl $W/data/
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STRATEGIES=${STRATEGIES:-deepspeed_stage_2}
python3 -m tools.make_model --version 7 --layers 4 --width 512 --out $W/model/m.pth >/dev/null
cd $W && python3 -m tools.make_tokenize sample.jsonl 8 >/dev/null
common="MODEL=m.pth DATA=sample CTX_LEN=192 EPOCH_STEPS=22 EPOCH_COUNT=2 LR_INIT=1e-3 LR_FINAL=1e-4 OP=${OP:-chunk} PRECISION=bf16 TRAIN_PARTS=ln SEED=1"
run() { local out=$1; shift; echo "== $out: $*"; env $common OUTPUT=$out "$@" python3 -m tools.train --no-progress 2>&1 | grep -E "training|saved|stopped|resuming|rror" || true; }
run one MICRO_BSZ=4 GPU_COUNT=1
run ddp MICRO_BSZ=2 GPU_COUNT=2
for s in $STRATEGIES; do run $s MICRO_BSZ=2 GPU_COUNT=2 STRATEGY=$s; done
first=${STRATEGIES%% *}
env $common OUTPUT=resumed MICRO_BSZ=2 GPU_COUNT=2 STRATEGY=$first python3 -m tools.train --no-progress --max-steps 20 2>&1 | grep -E "stopped" || true
run resumed MICRO_BSZ=2 GPU_COUNT=2 STRATEGY=$first RESUME=1
ls resumed resumed/deepspeed 2>/dev/null | tr '\n' ' '; echo
STRATEGIES="$STRATEGIES" FIRST=$first python3 - <<'PY'
import csv, os
def curve(d): return [float(r["loss"]) for r in csv.DictReader(open(f"{d}/loss.csv"))]
names = ["one", "ddp"] + os.environ["STRATEGIES"].split()
curves = {n: curve(n) for n in names}
print("step " + " ".join(f"{n:>18s}" for n in names))
n = len(curves["one"])
for i in range(n):
    if i % 4 == 0 or i == n - 1:
        print(f"{i + 1:4d} " + " ".join(f"{curves[k][i]:18.4f}" for k in names))
for k in names[1:]:
    c = curves[k]
    print(f"{k}: steps {len(c)}; largest relative difference to 1 GPU {max(abs(a - b) / a for a, b in zip(curves['one'], c)):.2e}; "
          f"mean of the last 10 {sum(c[-10:]) / 10:.4f} (1 GPU {sum(curves['one'][-10:]) / 10:.4f})")
full, res = curves[os.environ["FIRST"]], curve("resumed")
print(f"stopped + resumed {os.environ['FIRST']}: {len(res)} steps; largest relative difference to the uninterrupted run "
      f"{max(abs(a - b) / a for a, b in zip(full, res)):.2e}")
PY
