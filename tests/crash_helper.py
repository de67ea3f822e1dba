"""Run the trainer (``python -m tools.train``) and kill it, as ``kill -9`` or a power cut would, at one write.

    CRASH_AT=replace:N:before|after   just before / after the Nth rename of a finished temporary over its file
    CRASH_AT=append:N                 halfway through the Nth append (loss.csv, samples.txt): half of it written
    CRASH_AT=count                    no crash: print "WRITE <kind> <file>" for every write, to enumerate them

Used by tests/test_crash.py: the process ends with os._exit(137), so nothing after the write point runs (no
finally, no Ctrl+C handler, no flush), as with a real kill.
"""
import os
import sys

from trainer import files

spec = os.environ.get("CRASH_AT", "count")
kind, _, rest = spec.partition(":")
nth, _, when = rest.partition(":")
nth = int(nth) if nth else 0
seen = {"replace": 0, "append": 0}
real_replace, real_append = os.replace, files.append_text


def die() -> None:
    os._exit(137)


def replace(src, dst, *args, **kw):
    seen["replace"] += 1
    if kind == "count":
        print(f"WRITE replace {os.path.basename(str(dst))}", flush=True)
    hit = kind == "replace" and seen["replace"] == nth
    if hit and when == "before":
        die()
    real_replace(src, dst, *args, **kw)
    if hit and when == "after":
        die()


def append_text(path, text):
    seen["append"] += 1
    if kind == "count":
        print(f"WRITE append {os.path.basename(str(path))}", flush=True)
    if kind == "append" and seen["append"] == nth:
        with open(path, "a", encoding="utf-8") as fh:     # half of it reaches the disk, then the kill
            fh.write(text[: max(1, len(text) // 2)])
        die()
    real_append(path, text)


os.replace = replace
files.append_text = append_text

if __name__ == "__main__":
    from tools.train import main
    from trainer.errors import run_cli
    run_cli(main, sys.argv[1:])
