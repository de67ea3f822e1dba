#!/usr/bin/env bash
# The web page for the whole workflow: tokenize, train (live loss chart, Stop = Ctrl+C), merge, chat.
#   ./webui.sh          then open the address it prints (http://127.0.0.1:7860/) in your browser
# Needs Gradio:  pip install -e ".[webui]"
# Everything it does is what the shell scripts do, with the same checks; a training run started from the
# page is saved as output/NAME.env and can be repeated with  ./training.sh --config output/NAME.env

HOST="${HOST:-127.0.0.1}"   # 127.0.0.1: only this machine can open the page. 0.0.0.0 lets every machine that
                            #   reaches yours in (no password: only on a network you trust; a warning is printed)
PORT="${PORT:-7860}"        # the port in the address
MAX_UPLOAD_MB="${MAX_UPLOAD_MB:-1024}"  # the largest .jsonl the page takes as an upload, in MB (a larger one is
                            #   refused with a message; copy it into data/ yourself, or raise this)
# The page refuses requests made by a page of another site (a foreign Origin), also with HOST=0.0.0.0.
# Ctrl+C (or SIGTERM, e.g. from systemd or `kill`) stops the server; a training job it started first saves
# output/.../rwkv-interrupted.pth, as Ctrl+C in training.sh does (the server waits up to 5 minutes for that).

cd "$(dirname "$0")" && exec "${PYTHON:-python3}" -m tools.webui --host "$HOST" --port "$PORT" \
    --max-upload-mb "$MAX_UPLOAD_MB" "$@"
