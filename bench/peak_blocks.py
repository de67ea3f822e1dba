"""What was allocated at the peak of a CUDA allocator snapshot (bench/train_speed.py with
TRAIN_SPEED_MEMORY_SNAPSHOT=FILE): replays the allocation events, finds the moment of the largest total and
prints the live blocks there grouped by where they were allocated (the innermost frames of our code).

    python bench/peak_blocks.py FILE [--frames 3] [--top 30]
"""
from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

MiB = 2 ** 20


def _where(frames: list[dict], depth: int) -> str:
    ours = [f for f in frames if any(s in f.get("filename", "") for s in ("/trainer/", "/bench/"))]
    chosen = (ours or frames)[:depth]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in chosen) or "?"


def peak_blocks(snapshot: dict, depth: int = 3) -> tuple[int, dict[str, tuple[int, int]]]:
    """(peak bytes, {where: (bytes, count)}) of the live allocations at the peak of device 0's trace."""
    events = snapshot["device_traces"][0]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", []), depth))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] in ("free_requested", "free") and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    # allocations made before the history started are not in the trace: the segments hold them
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        groups[where][0] += size
        groups[where][1] += 1
    return peak, {k: (v[0], v[1]) for k, v in groups.items()}


def pools(snapshot: dict) -> dict[str, tuple[int, int, int]]:
    """{pool: (reserved, allocated, segments)} of the snapshot's segments (taken after training): the
    default pool is "default", a CUDA graph's private pool is named by its id."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for seg in snapshot.get("segments", []):
        pid = tuple(seg.get("segment_pool_id") or (0, 0))
        name = "default" if pid == (0, 0) else f"graph pool {pid}"
        out[name][0] += seg["total_size"]
        out[name][1] += seg["allocated_size"]
        out[name][2] += 1
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.snapshot, "rb") as f:
        snap = pickle.load(f)
    peak, groups = peak_blocks(snap, args.frames)
    print(f"peak of the traced allocations: {peak / MiB:.1f} MiB (allocations before tracing began not counted)")
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{size / MiB:9.1f} MiB {n:5d}x  {where}")
    print("memory pools at the snapshot (after training): reserved / allocated MiB, segments")
    for name, (res, alloc, n) in sorted(pools(snap).items()):
        print(f"{res / MiB:9.1f} {alloc / MiB:9.1f} {n:5d}  {name}")


if __name__ == "__main__":
    main()
