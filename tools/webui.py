"""python -m tools.webui [--host 127.0.0.1] [--port 7860] [--root .] [--max-upload-mb 1024]: the web page for the
whole workflow.

Serves Data (tokenize), Train (the training.sh form, live progress, Stop = Ctrl+C), Merge and Chat over the
project folder ROOT (data/, model/, output/, merge/). Only this machine can open it unless --host names
another address; then anyone who can reach that address can start training and read your files. A page of
another site is never let in. Ctrl+C or SIGTERM stops the server; a training job it started saves first, as
Ctrl+C does.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from trainer.errors import UserError, run_cli

LOCAL = ("127.0.0.1", "localhost", "::1")


def _check_port(host: str, port: int) -> None:
    """Refuse, before the page is built, an address this machine cannot listen on (a port already in use)."""
    import socket
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host} is not an address of this machine.",
                        "use 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server itself binds
        try:
            s.bind(addr)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} is in use (another web page, or another program).",
                                f"stop it, or pick another port: PORT={port + 1} ./webui.sh") from None
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}.",
                            "use --host 127.0.0.1 and a port above 1024, e.g. 7860") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="webui.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                    "only). Another address (e.g. 0.0.0.0) lets other machines in: a warning is printed")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--root", default=".", help="the project folder with data/ model/ output/ merge/ (default: here)")
    ap.add_argument("--max-upload-mb", type=float, default=1024.0, metavar="MB",
                    help="the largest .jsonl the page accepts as an upload, in MB (default 1024)")
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number.", "use e.g. --port 7860")
    if not 0 < args.max_upload_mb < float("inf"):
        raise UserError(f"--max-upload-mb {args.max_upload_mb:g} is not a size.",
                        "give the largest upload in MB, e.g. --max-upload-mb 1024")
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder.", "give the project folder (with data/ and model/)")

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("the web page needs Gradio, which is not installed.",
                        'pip install -e ".[webui]"') from None
    _check_port(args.host, args.port)
    for d in ("data", "model", "output", "merge"):
        if (root / d).exists() and not (root / d).is_dir():
            raise UserError(f"{root / d} is a file, but the project keeps its {d} files in a folder {d}/.",
                            f"move {root / d} away")
        try:
            (root / d).mkdir(exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot make the folder {root / d}: {err.strerror or err}.",
                            "run the page in a project folder you can write to (--root)") from None
    os.chdir(root)
    from webui.app import make_app, serve
    from webui.jobs import JobManager

    remote = args.host not in LOCAL
    if remote:
        print(f"WARNING: listening on {args.host}: other machines that reach this address can use the page, start "
              "training and download your models. There is no password. Use this only on a network you trust.",
              file=sys.stderr, flush=True)
    jobs = JobManager(root)
    app = make_app(allow_remote=remote, jobs=jobs, max_upload_mb=args.max_upload_mb)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"rwkv-peft-simple web page: http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else shown}:{args.port}/"
          f"  (project folder {root}; Ctrl+C stops the server, and a training job it started saves first)",
          flush=True)
    serve(app, args.host, args.port, jobs)    # Ctrl+C or SIGTERM: the training job saves, as Ctrl+C does, first
    return 0


if __name__ == "__main__":
    run_cli(main)
