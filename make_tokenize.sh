#!/usr/bin/env bash
# Step 1 of 3: turn your training data into tokens.
#
#   ./make_tokenize.sh FILE.jsonl [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S]
#
# FILE.jsonl   your data, in the data/ folder next to this script. One JSON object per line:
#                {"text": "User: ...\n\nAssistant: ..."}                    (the RWKV convention)
#                {"messages": [{"role": "user", "content": "..."}, ...]}   (roles system/user/assistant)
#                {"instruction": "...", "input": "...", "output": "..."}   (Alpaca)
#              The result is data/FILE.bin + data/FILE.idx (give their path, without the ending,
#              to training.sh).
# REPEAT       write the data this many times, each copy freshly shuffled (default 1).
# MAX_TOKENS   drop items longer than this many tokens (end token included); the count is printed.
# --no-eof     do not end each item with token 0 (the end-of-document token). Keep it unless you
#              know why: the model learns from it where an answer stops.
# --seed S     the shuffle seed (default 42); the same seed gives the same files.
#
# Afterwards it prints what training.sh needs: item and token counts, lengths, a suggested CTX_LEN,
# and a table of MICRO_BSZ / EPOCH_STEPS that make one epoch cover every item exactly once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then
    echo "error: no FILE.jsonl given (the .jsonl files in data/:" $(cd "$HERE/data" 2>/dev/null && ls *.jsonl 2>/dev/null)")." \
         "Fix: ./make_tokenize.sh FILE.jsonl [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S]" >&2
    exit 2
fi
# PYTHON: the interpreter of your environment (override with PYTHON=/path/to/python ./make_tokenize.sh ...)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m tools.make_tokenize "$@" --data-dir "$HERE/data"
