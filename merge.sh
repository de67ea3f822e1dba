#!/usr/bin/env bash
# Step 3 of 3: turn a training checkpoint into a model (or a state file) the RWKV tools run.
#
#   ./merge.sh EPOCH          EPOCH: the number of a checkpoint in OUTPUT (rwkv-EPOCH.pth), "interrupted", or
#                             "best" (rwkv-best.pth: the lowest validation loss, when training had VALID_DATA/_FRACTION)
#                             OUTPUT: the one set in training.sh, so the folder training used is found by itself
#
# Everything else is read from the checkpoint itself: the method (lora, pissa, bone, bat, state, full), its
# settings, TRAIN_PARTS and the base model (looked up in model/ by name, and checked to be the very model
# training used). Writes, in MERGE_DIR:
#   <base>-<method>-EPOCH.pth   a complete model in the official layout (RWKV-Runner, Ai00, the rwkv package)
#   <base>-state-EPOCH.pth      for state tuning: the tuned state alone, used together with the base model
# and prints how to use it. Nothing is written unless every check passes; a file is never half-written.
# The variables below can also be given on the command line, e.g.  DTYPE=fp32 ./merge.sh 2
set -euo pipefail

DTYPE="${DTYPE:-bf16}"          # bf16 (what released models use) | fp16 | fp32 (exact, twice the size)
OUTPUT="${OUTPUT:-}"            # the folder of the checkpoints; empty: the OUTPUT set in training.sh (its line is
                                # read, the script is not run), else output
MERGE_DIR="${MERGE_DIR:-merge}" # where the merged model / state file goes
BASE="${BASE:-}"                # empty: the base model named in the checkpoint, from model/. Set it only if that
                                # file moved or was renamed (it is still checked to be the same weights)
STATE_MODEL="${STATE_MODEL:-0}" # state tuning: 1 = also write <base>-state-EPOCH-model.pth, the base model with the
                                # state inside (the rwkv package reads it for RWKV-5/6; for RWKV-7 it ignores it)
OVERWRITE="${OVERWRITE:-0}"     # 1 = replace a file in MERGE_DIR merged from another checkpoint (merging the same
                                # checkpoint again always replaces its own files)
# RWKV-PEFT's files (OUTPUT=its run's folder BASE=the model it trained ./merge.sh N) record neither of these:
LORA_ALPHA="${LORA_ALPHA:-}"    # its LoRA file: the lora_alpha it was trained with (RWKV-PEFT's default is 32)
PISSA_INIT="${PISSA_INIT:-}"    # its PiSSA file: the init_pissa.pth it wrote into that folder (the initial A and B)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
EXTRA=()
case "$STATE_MODEL" in
    1) EXTRA+=(--state-model) ;;
    0|"") ;;
    *) echo "error: STATE_MODEL=$STATE_MODEL is not 0 or 1. Fix: STATE_MODEL=1 ./merge.sh EPOCH, or leave it out" >&2
       exit 2 ;;
esac
case "$OVERWRITE" in
    1) EXTRA+=(--overwrite) ;;
    0|"") ;;
    *) echo "error: OVERWRITE=$OVERWRITE is not 0 or 1. Fix: OVERWRITE=1 ./merge.sh EPOCH, or leave it out" >&2
       exit 2 ;;
esac
[ -n "$OUTPUT" ] && EXTRA+=(--output "$OUTPUT")
[ -n "$LORA_ALPHA" ] && EXTRA+=(--lora-alpha "$LORA_ALPHA")
[ -n "$PISSA_INIT" ] && EXTRA+=(--pissa-init "$PISSA_INIT")
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
# no EPOCH: tools.merge says how to call it and lists the checkpoints (exit 2)
exec "${PYTHON:-python3}" -m tools.merge "$@" --dtype "$DTYPE" --merge-dir "$MERGE_DIR" \
    --model-dir model --base "$BASE" "${EXTRA[@]+"${EXTRA[@]}"}"
