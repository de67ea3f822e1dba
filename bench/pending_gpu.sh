#!/usr/bin/env bash
# What waits for a GPU since session 19 (bench/RESULTS.md, "Session 19"), in one device call: the GPU tests no GPU
# has run yet, then the measurements the README and the issues ask for. Each step has its own time limit, so one
# that hangs does not take the others with it; each writes its log (and JSON rows) under OUT.
# Usage, on the device machine after installing the carried wheels:  OUT=/path bash bench/pending_gpu.sh [STEP ...]
# STEPs (default: all, in this order): tests valid dora   (valid also times the sample written at the save: its
# record's sample_s, issue 32's wait). Also: quick (the GPU tests that need no fla kernels: no autotuning),
# fp8 (QUANT=fp8 against bf16 and int8 at 1.5B), de (a 1.5B RWKV-7a: s_emb tables in CPU memory or not). Time limits: T_TESTS T_VALID T_DORA T_QUICK T_FP8 T_DE (seconds).
set -uo pipefail
OUT=${OUT:-/tmp/pending_gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODELS=${MODELS:-/tmp/models}
step() {   # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s: $(grep -E '(passed|failed|skipped|error|tokens/s|valid_s_steady)' "$OUT/$name.log" | tail -1 | cut -c1-300)"
}
want() { [ $# -eq 0 ] || [[ " $* " == *" $STEP "* ]]; }
for STEP in tests quick valid dora fp8 de; do
    [ $# -eq 0 ] && [[ $STEP == quick || $STEP == fp8 || $STEP == de ]] && continue
    want "$@" || continue
    case $STEP in
    tests)   # issue 28's moved code, issue 29's validation pass, issue 30's L2WRAP kernel and optimizer paths
        step tests "${T_TESTS:-420}" python3 -m pytest -o addopts= -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests.xml" \
            tests/test_offload.py tests/test_strategy.py tests/test_quant.py tests/test_infctx.py \
            tests/test_head_loss.py tests/test_validate.py ;;
    valid)   # issue 29: what a validation pass costs at 1.5B (the README states it)
        step valid "${T_VALID:-420}" python3 bench/valid_cost.py --size 1.5B --ctx 1024 --bsz 1 --items 100 --steps 12 \
            --valid-every 4 --model-dir "$MODELS" --json "$OUT/valid_cost.jsonl" ;;
    dora)    # issue 30: DoRA at most 5 % slower than LoRA (both with L2WRAP on, the default)
        step dora "${T_DORA:-480}" python3 bench/train_speed.py --version 7 --size 1.5B --method lora dora --ctx 1024 --bsz 1 \
            --train-parts ln --grad-cp 1 --steps 5 --warmup 2 --peak-tflops 989 --model-dir "$MODELS" --json "$OUT/speed.jsonl" ;;
    quick)   # issue 29's validation pass compiled, the L2WRAP kernel, QUANT=fp8 on RWKV-7 (no fla: nothing autotunes)
        step quick "${T_QUICK:-150}" python3 -m pytest -o addopts= -v -m gpu -p no:cacheprovider --durations=0 \
            tests/test_head_loss.py tests/test_validate.py tests/test_quant.py -k "not quant or fp8-7 or kernels_equal" ;;
    fp8)     # issue 30: QUANT=fp8's speed and memory against bf16 (lora) and int8 at 1.5B
        step fp8 "${T_FP8:-300}" python3 bench/train_speed.py --version 7 --size 1.5B --method lora+fp8 lora+int8 \
            --ctx 1024 --bsz 1 --train-parts ln --grad-cp 1 --steps 5 --warmup 2 --peak-tflops 989 \
            --model-dir "$MODELS" --json "$OUT/speed.jsonl" ;;
    de)      # issue 31: a 1.5B RWKV-7a, its s_emb tables in CPU memory (the default) against on the GPU
        step de "${T_DE:-300}" bash -c 'for where in cpu gpu; do TRAIN_SPEED_DEEP_EMBED=$where python3 \
            bench/train_speed.py --version 7 --size 1.5B --deep-embed 32 --method lora --ctx 1024 --bsz 1 --grad-cp 1 \
            --steps 5 --warmup 2 --peak-tflops 989 --model-dir "$0" --json "$1/de_$where.jsonl"; done' "$MODELS" "$OUT" ;;
    esac
done
