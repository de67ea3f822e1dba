"""What a validation pass costs: the trainer run as training.sh runs it, with VALID_DATA, timed from its own log.

    python3 bench/valid_cost.py --size 1.5B --ctx 1024 --bsz 1 --items 100 --steps 12 --valid-every 4

Makes (once, cached in --model-dir) random RWKV-7 weights of the size, a training binidx and a validation binidx
of --items items of CTX_LEN + 1 random tokens each (full length: the dearest case per item), trains LoRA (+ ln)
for --steps optimizer steps with VALID_EVERY=--valid-every, and prints one JSON line: the training speed
(median step, from loss.csv's rows), each validation's seconds and tokens as the trainer logged them, and what
one validation costs in training steps. The first validation includes compiling the blocks for a forward pass
without gradients (once per run); the later ones are the steady cost. Also the seconds of the sample written at
the save (``sample_s``: 64 tokens from training.sh's default prompt).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LINE = re.compile(r"validation after optimizer step (\d+): loss (\S+) over ([\d,]+) tokens \(([\d.]+) s\)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--bsz", type=int, default=1)
    ap.add_argument("--items", type=int, default=100, help="validation items")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--valid-every", type=int, default=4)
    ap.add_argument("--grad-cp", default="auto")
    ap.add_argument("--model-dir", default="/tmp/models")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--json", default=None, help="also append the record to this .jsonl file")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import train_speed as ts
    from trainer.config import TrainConfig
    from trainer.data.binidx import write_binidx
    from trainer.loop import train

    layers, width = ts.parse_size(args.size)
    model = ts.ensure_model(7, layers, width, args.vocab, Path(args.model_dir), timeout=1800)
    work = Path(tempfile.mkdtemp(prefix="valid_cost_"))
    rng = np.random.default_rng(0)
    top = min(args.vocab, 65535)
    write_binidx(work / "train", [rng.integers(1, top, size=args.ctx + 1) for _ in range(args.steps * args.bsz)])
    write_binidx(work / "valid", [rng.integers(1, top, size=args.ctx + 1) for _ in range(args.items)])
    env = ts.row_env(dict(method="lora", ctx=args.ctx, bsz=args.bsz, grad_cp=args.grad_cp, train_parts="ln"),
                     str(model), str(work / "train"), str(work / "out"), args.steps - 1, 0)
    env.update(DATALOAD="pad", EPOCH_STEPS=str(args.steps), VALID_DATA=str(work / "valid"),
               VALID_EVERY=str(args.valid_every), SAMPLE_PROMPT="User: Hello, who are you?\n\nAssistant:")
    logs: list[str] = []
    from trainer.runfiles import RunFiles
    sample, sample_s = RunFiles.sample, []

    def timed_sample(self, *a, **kw):        # the sample written at each save (issue 32's wait), timed
        t = time.perf_counter()
        try:
            return sample(self, *a, **kw)
        finally:
            sample_s.append(round(time.perf_counter() - t, 3))
    RunFiles.sample = timed_sample
    t0 = time.perf_counter()
    train(TrainConfig.from_env(env), log=logs.append, progress=False)
    wall = time.perf_counter() - t0
    import csv
    with open(work / "out" / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    speeds = [float(r["tokens_per_s"]) for r in rows[2:]] or [float(r["tokens_per_s"]) for r in rows]
    step_tokens = args.ctx * args.bsz
    step_s = step_tokens / statistics.median(speeds)
    valids = [dict(step=int(m[1]), loss=float(m[2]), tokens=int(m[3].replace(",", "")), seconds=float(m[4]))
              for m in (LINE.search(ln) for ln in logs) if m]
    later = [v["seconds"] for v in valids[1:]] or [v["seconds"] for v in valids]
    out = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "size": args.size, "ctx": args.ctx, "bsz": args.bsz, "items": args.items, "steps": args.steps,
        "valid_every": args.valid_every, "train_tokens_per_s_median": round(statistics.median(speeds)),
        "train_step_s": round(step_s, 4), "validations": valids,
        "valid_s_steady": round(statistics.median(later), 3) if later else None,
        "valid_tokens_per_s_steady": round(valids[-1]["tokens"] / statistics.median(later)) if later else None,
        "valid_in_train_steps": round(statistics.median(later) / step_s, 1) if later else None,
        "sample_s": sample_s, "wall_s": round(wall, 1), "commit": ts._git("rev-parse", "--short", "HEAD"),
        "said": [ln for ln in logs if ln.startswith(("validation", "Estimated", "GRAD_CP"))][:6],
    }
    print(json.dumps(out))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
