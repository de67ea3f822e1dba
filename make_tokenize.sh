#!/usr/bin/env bash
# Step 1 of 3: turn your training data into tokens.
#
#   ./make_tokenize.sh FILE [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S] [--column NAME] [--valid F]
#
# FILE         your data, in the data/ folder next to this script: a file, or a folder of files.
#              The result is data/FILE.bin + data/FILE.idx beside it (give their path, without the
#              ending, to training.sh). Each item is one of these shapes (fields):
#                {"text": "User: ...\n\nAssistant: ..."}                    (the RWKV convention)
#                {"messages": [{"role": "user", "content": "..."}, ...]}   (roles system/user/assistant)
#                {"conversations": [{"from": "human", "value": "..."}, ...]}
#                                         (ShareGPT; from system/human/user/gpt/assistant)
#                {"instruction": "...", "input": "...", "output": "..."}   (Alpaca)
#              The kinds of file, by their ending:
#                .jsonl      one JSON object per line
#                .json       a list of objects: [{...}, {...}]
#                .csv        a header line naming the fields (text, or instruction,input,output, ...), then
#                            one row per item; a messages/conversations cell holds its list as JSON
#                .parquet    one row per item, the same fields (needs: pip install pyarrow)
#                .arrow      a shard written by the datasets library (needs: pip install datasets)
#                .txt .md    the whole file is one item, used as written
#                a folder    every such file in it and its subfolders, in sorted order; or a folder
#                            written by datasets' save_to_disk (its train split; needs datasets)
#              Nothing is downloaded: the files are read from this disk only.
# REPEAT       write the data this many times, each copy freshly shuffled (default 1).
# MAX_TOKENS   drop items longer than this many tokens (end token included); the count is printed.
# --no-eof     do not end each item with token 0 (the end-of-document token). Keep it unless you
#              know why: the model learns from it where an answer stops.
# --seed S     the shuffle seed (default 42); the same seed gives the same files.
# --valid F    hold this share of the items out for validation (see VALID_FRACTION below).
#
# Afterwards it prints what training.sh needs: item and token counts, lengths, a suggested CTX_LEN,
# and a table of MICRO_BSZ / EPOCH_STEPS that make one epoch cover every item exactly once.
set -euo pipefail

# COLUMN       the field that holds the text when it is none of the shapes above, e.g. COLUMN=content
#              (a string is used as written; a list of messages in either chat shape becomes dialogue).
#              Empty: found from the shape. For one run: COLUMN=content ./make_tokenize.sh x.parquet
#              (or --column content, which wins over this variable).
COLUMN="${COLUMN:-}"

# VALID_FRACTION  the share of the items held out for a validation loss, e.g. VALID_FRACTION=0.05 (5 %).
#              They are chosen by the seed before REPEAT, copies of one item together, and written once each
#              to data/FILE.valid.bin + .idx, never into data/FILE.bin; put VALID_DATA="FILE.valid" in
#              training.sh. Empty: nothing held out. For one run: VALID_FRACTION=0.05 ./make_tokenize.sh x.jsonl
#              (or --valid 0.05, which wins over this variable).
VALID_FRACTION="${VALID_FRACTION:-}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then
    echo "error: no FILE given (the data in data/:" $(cd "$HERE/data" 2>/dev/null && ls -d -- *.jsonl *.json *.csv *.parquet *.arrow *.txt *.md 2>/dev/null)")." \
         "Fix: ./make_tokenize.sh FILE [REPEAT] [MAX_TOKENS] [--no-eof] [--seed S] [--column NAME] [--valid F]" >&2
    exit 2
fi
# PYTHON: the interpreter of your environment (override with PYTHON=/path/to/python ./make_tokenize.sh ...)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m tools.make_tokenize ${COLUMN:+--column "$COLUMN"} \
    ${VALID_FRACTION:+--valid "$VALID_FRACTION"} "$@" --data-dir "$HERE/data"
