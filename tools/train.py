"""python -m tools.train [--dry-run]: train with the variables training.sh exported."""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Run as a script: with several GPUs, Lightning starts one process per GPU by re-running this file.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.errors import run_cli


def host_report() -> str:
    import torch
    parts = []
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"host RAM {pages * size / 2**30:.1f} GiB")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            parts.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of "
                         f"{total / 2**30:.1f} GiB free")
    else:
        parts.append("no CUDA GPU (training on the CPU)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="training.sh", description=__doc__)
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config, show two decoded samples with the loss mask, and stop")
    ap.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    ap.add_argument("--config", metavar="FILE", help="a config saved by the web page (output/NAME.env): its "
                    "NAME='value' lines replace the variables at the top of training.sh")
    args = ap.parse_args(argv)
    if args.config:
        from trainer.envfile import read_env_file
        os.environ.update(read_env_file(args.config))

    from trainer.config import TrainConfig
    from trainer.loop import dry_run, train

    cfg = TrainConfig.from_env()
    print(host_report(), flush=True)
    if args.dry_run:
        dry_run(cfg)                   # the plan and its memory estimate, term by term, among the rest
        return 0
    result = train(cfg, max_steps=args.max_steps, progress=not args.no_progress and sys.stderr.isatty())
    return 130 if result.interrupted and not result.stopped_early and args.max_steps is None else 0


if __name__ == "__main__":
    run_cli(main)
