#!/usr/bin/env bash
# The whole workflow on a built-in demo, on the CPU, in about a minute:
# make a tiny random RWKV-7 model, tokenize data/sample.jsonl, fine-tune it with LoRA and watch the loss
# fall, then merge the adapter and generate text from the merged model with the official `rwkv` package.
# Nothing of yours is touched: the demo writes model/demo.pth, data/sample.bin/.idx, output/demo/, merge/demo/.
set -euo pipefail
cd "$(dirname "$0")" && exec python3 -m tools.demo "$@"
