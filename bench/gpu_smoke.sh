#!/usr/bin/env bash
# On the GPU machine: the GPU tests (fla kernels vs the fp32 oracle) and a short bf16 training run of a
# tiny model with OP=fla, the way a user runs it. Usage: bash bench/gpu_smoke.sh OUT_DIR
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
echo "== GPU tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25
echo "== tiny training run on the GPU (bf16, OP=auto)"
W=$(mktemp -d); mkdir -p $W/model $W/data; cp data/sample.jsonl $W/data/
export PYTHONPATH=$PWD
python3 -m tools.make_model --version 7 --layers 2 --width 256 --out $W/model/demo.pth
(cd $W && python3 -m tools.make_tokenize sample.jsonl 4 | tail -3)
(cd $W && env MODEL=demo.pth DATA=sample CTX_LEN=256 MICRO_BSZ=4 EPOCH_STEPS=44 EPOCH_COUNT=2 \
  LR_INIT=1e-3 LR_FINAL=1e-4 TRAIN_PARTS="emb head" python3 -m tools.train --no-progress 2>&1 | tail -12)
(cd $W && python3 -m tools.evaluate --model model/demo.pth --data data/sample --items 20 2>&1 | tail -1)
(cd $W && python3 -m tools.evaluate --model model/demo.pth --adapter output/rwkv-1.pth --data data/sample --items 20 2>&1 | tail -1)
