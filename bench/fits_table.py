"""Which RWKV-7 G1 model fits which GPU: the trainer's own plan and memory estimate for every size × method ×
card, and a measurement where one ran the same plan. No GPU needed (seconds on a CPU).

    python bench/fits_table.py                 # the markdown tables (README, "Which model fits which GPU")
    python bench/fits_table.py --json          # one JSON object per cell instead
    python bench/fits_table.py --measured FILE # measured rows (default bench/memory_measured.jsonl)

A cell is what ./training.sh would do on that card: training.sh's defaults (trainer/envfile.training_fields:
GRAD_CP=auto, OFFLOAD_BLOCKS=auto, COMPILE=auto, OP=auto, PRECISION=auto, AdamW, LoRA r 64 / alpha 128, no
TRAIN_PARTS) with CTX_LEN=1024, MICRO_BSZ=1 and the method's FINETUNE_MODE and QUANT, resolved by
trainer/plan.resolve on a Machine whose free memory is the card's usable memory, as the trainer's pre-flight
resolves it (the GRAD_CP=auto and OFFLOAD_BLOCKS=auto searches against trainer/memory.estimate, CUDA graphs left
out where memory is tight). The figure is the estimate's total: the process's peak as nvidia-smi would show it
(the allocator's peak + CUDA_CONTEXT, the driver's thread-stack reserve given back; memory.py's docstring).

Usable memory (Card.usable): what CUDA reports as the card's total (torch's "total capacity"), which is
nvidia-smi's total less the driver's own reserve, and what an idle card with no display attached has free.
A display, or another program, takes from it. Linux: under WSL2 the estimate adds the allocator's slack.

Verdict: "fits" where the estimate is within FIT_FRACTION of the usable memory (the margin the trainer's own
searches keep); "tight" where it is within the usable memory but not that margin (the trainer prints "close to
the limit"); "no" above it (the trainer warns that the run will probably run out of memory). A measured cell
(a row of the jsonl whose settings give, term by term, the same estimate as the cell's plan: same shape,
method, trained parts, quantisation, batch, optimizer, checkpointed and streamed blocks, CUDA graphs) shows
the measured peak instead (nvidia-smi less the idle baseline, as bench/calibrate_memory.py reads it) and fits
where that is within the usable memory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import calibrate_memory  # noqa: E402
import train_speed  # noqa: E402
from trainer.memory import FIT_FRACTION, GiB  # noqa: E402
from trainer.plan import HOST_FRACTION  # noqa: E402

MEASURED = ROOT / "bench" / "memory_measured.jsonl"
CTX, BSZ = 1024, 1
# RWKV-7 "G1" sizes (vocabulary 65536, head size 64), named as BlinkDL/rwkv7-g1 names its files; shapes from
# train_speed.SIZES. 13.3B = 61 × 4096: a public RWKV-PEFT state-tuning script for
# rwkv7-g1i-13.3b-20260805-ctx16384.pth passes --n_layer 61 --n_embd 4096 and expects 61 state tensors;
# trainer/counts.py gives that shape 13.19 B parameters (RWKV-6 14B had the same 61 × 4096).
G1 = ("0.1B", "0.4B", "1.5B", "2.9B", "7.2B", "13.3B")
METHODS = {"QLoRA (nf4)": {"FINETUNE_MODE": "lora", "QUANT": "nf4"},
           "LoRA (bf16)": {"FINETUNE_MODE": "lora"},
           "state tuning": {"FINETUNE_MODE": "state"},
           "full fine-tuning": {"FINETUNE_MODE": "full"}}


@dataclass(frozen=True)
class Card:
    gb: int               # the memory it is sold with
    usable: float         # bytes CUDA reports as its total (torch's "total capacity")
    example: str
    source: str           # where that figure was seen


# torch's out-of-memory message quotes the CUDA total; each figure is one public report of it (Linux). The 48 GB
# class: the Ada cards with ECC on (RTX 6000 Ada, L40S) have 44.4 GiB, an RTX A6000 or RTX 8000 about 47.5.
CARDS = (
    Card(8, 7.78 * GiB, "RTX 3070", "github.com/akshitac8/OW-DETR/issues/46"),
    Card(12, 11.75 * GiB, "RTX 3060 12 GB", "github.com/Kunhao-Liu/StyleGaussian/issues/12"),
    Card(16, 15.61 * GiB, "RTX A4000", "github.com/DengKaiCQ/VGGT-Long/issues/6"),
    Card(24, 23.64 * GiB, "RTX 4090", "github.com/ali-vilab/VGen/issues/104"),
    Card(48, 44.43 * GiB, "RTX 6000 Ada", "github.com/DINGYANB/MTVCrafter/issues/21"),
    Card(80, 85017493504, "H100 80GB HBM3", "bench/memory_measured.jsonl: gpu_total_bytes of its H100 rows"),
)


# ------------------------------------------------------------------------------------------ one cell
def settings(method: str, **extra: str):
    """A TrainConfig of training.sh's defaults with the method's settings, ctx CTX × BSZ, and ``extra``."""
    from trainer.config import TrainConfig
    from trainer.envfile import training_fields
    env = {f.name: f.default for f in training_fields()}
    env.update(METHODS[method], CTX_LEN=str(CTX), MICRO_BSZ=str(BSZ), **extra)
    return TrainConfig.from_env(env)


def sizes_of(size: str):
    """The ModelConfig of an RWKV-7 size name of train_speed.SIZES (or LxC)."""
    from trainer.checkpoint import config_from_sizes
    return config_from_sizes(7, *train_speed.parse_size(size))


def plan_on(cfg, sizes, card: Card):
    """The plan the trainer makes for ``cfg`` on an idle ``card`` (its CPU memory not limiting)."""
    from trainer.plan import Machine, resolve
    return resolve(cfg, sizes, Machine(name=card.example, free=card.usable))


def verdict(gib_bytes: float, usable: float, measured: bool = False) -> str:
    if measured:
        return "fits" if gib_bytes <= usable else "no"
    return "fits" if gib_bytes <= FIT_FRACTION * usable else "tight" if gib_bytes <= usable else "no"


def same_run(plan, sizes, run) -> bool:
    """Whether a measured row (calibrate_memory.Compared) ran this plan: the same shape and, term by term, the
    same estimate (method, parts, quantisation, batch, optimizer, tiers, streamed blocks, CUDA graphs)."""
    row_sizes = train_speed.row_sizes(run.row)
    if (row_sizes.version, row_sizes.n_layer, row_sizes.n_embd, row_sizes.vocab_size) != \
            (sizes.version, sizes.n_layer, sizes.n_embd, sizes.vocab_size) or run.used is None:
        return False
    mine, theirs = plan.estimate, run.est
    return (math.isclose(mine.total, theirs.total, rel_tol=1e-9)
            and mine.terms.keys() == theirs.terms.keys()
            and all(math.isclose(mine.terms[k], theirs.terms[k], rel_tol=1e-9, abs_tol=1.0) for k in mine.terms))


def cell(size: str, method: str, card: Card, runs: list) -> dict:
    """One cell: the plan on the card, its estimate, the measurement of the same plan if any, the verdict."""
    from trainer.plan import offload_host_bytes
    cfg, sizes = settings(method), sizes_of(size)
    plan = plan_on(cfg, sizes, card)
    est = plan.estimate
    hits = sorted((r for r in runs if same_run(plan, sizes, r)), key=lambda r: r.row.get("date", ""))
    measured = hits[-1] if hits else None
    figure = measured.used if measured else est.total
    L = sizes.n_layer
    return {"size": size, "n_layer": L, "n_embd": sizes.n_embd, "method": method, "card_gb": card.gb,
            "card": card.example, "usable_gib": card.usable / GiB, "gib": figure / GiB,
            "kind": "measured" if measured else "estimated", "estimate_gib": est.total / GiB,
            "verdict": verdict(figure, card.usable, measured is not None),
            "checkpointed": (L - plan.plain_top) if plan.checkpointing else 0, "layers": L,
            "keep_products": plan.keep_products, "offload": plan.offload,
            "host_gib": plan.offload * offload_host_bytes(cfg, sizes, plan.precision) / GiB,
            "cudagraphs": plan.cudagraphs, "op": plan.op, "peak_at": est.peak_at,
            "measured_row": measured.row.get("command") if measured else None}


def cells(runs: list) -> list[dict]:
    return [cell(size, method, card, runs) for size in G1 for method in METHODS for card in CARDS]


# ------------------------------------------------------------------------------------------ measured rows
def measured_runs(path: Path = MEASURED) -> list:
    """The measured GPU rows with their estimates (calibrate_memory.compare_rows), none where no file."""
    return calibrate_memory.compare_rows(calibrate_memory.load_rows(path))


def runs_as_today(runs: list) -> list:
    """The rows that ran as the trainer runs their settings today (the embedding and the FFN's pieces where
    the plan puts them now: rows from before sessions 12-13 did not): their estimate is today's plan's."""
    from trainer.plan import nominal
    out = []
    for run in runs:
        r = run.row
        now = nominal(train_speed.row_config(r), train_speed.row_sizes(r), op=r.get("op_resolved") or r.get("op"),
                      tiers=(int(r.get("plain_top") or 0), int(r.get("keep_products") or 0)))
        if math.isclose(now.estimate.total, run.est.total, rel_tol=1e-9):
            out.append(run)
    return out


def neighbours(runs: list) -> list[dict]:
    """Today's measured RWKV-7 rows at ctx CTX × BSZ of the table's sizes with the default optimizer, the latest
    of each setting: what was measured near the table's cells (RWKV-PEFT's settings: + ln, GRAD_CP=1)."""
    names = {train_speed.parse_size(s): s for s in G1}
    latest: dict = {}
    for run in runs_as_today(runs):
        r = run.row
        shape = (r["n_layer"], r["n_embd"])
        if (r["version"], r["ctx"], r["bsz"]) != (7, CTX, BSZ) or shape not in names or run.used is None \
                or (r.get("optimizer") or "adamw") != "adamw":
            continue
        key = (shape, r["method"], r.get("train_parts") or "", str(r["grad_cp"]), int(r.get("offload") or 0),
               str(r.get("compile")))
        if key not in latest or r["date"] > latest[key].row["date"]:
            latest[key] = run
    return [{"size": names[k[0]], "method": k[1], "train_parts": k[2], "grad_cp": k[3], "offload": k[4],
             "compile": k[5], "measured_gib": run.used / GiB, "estimate_gib": run.est.total / GiB,
             "date": run.row["date"], "fits": {c.gb: run.used <= c.usable for c in CARDS}}
            for k, run in sorted(latest.items(), key=lambda kv: (G1.index(names[kv[0][0]]), kv[0][1:]))]


def accuracy(runs: list) -> dict:
    """The estimate's total against the measured nvidia-smi figure: (lowest, highest) of estimate / measured - 1,
    over the RWKV-7 rows and over all rows."""
    def span(rs):
        errs = [r.est.total / r.used - 1 for r in rs if r.used]
        return (min(errs), max(errs), len(errs)) if errs else (0.0, 0.0, 0)
    return {"rwkv7": span([r for r in runs if r.row["version"] == 7]), "all": span(runs)}


# ------------------------------------------------------------------------------------------ output
MARK = {"fits": "✓", "tight": "⚠", "no": "✗"}


def cell_text(c: dict) -> str:
    s = f"{MARK[c['verdict']]} {c['gib']:.1f} ({'m' if c['kind'] == 'measured' else 'e'})"
    if c["verdict"] == "no":
        return s
    if c["offload"]:
        return s + f", offload {c['offload']} ({c['host_gib']:.1f} GiB CPU)"
    if c["checkpointed"]:
        s += ", ckpt all" if c["checkpointed"] == c["layers"] else f", ckpt {c['checkpointed']}/{c['layers']}"
    return s + (f", {c['keep_products']} kp" if c["keep_products"] else "")


def table(rows: list[dict]) -> list[str]:
    head = "| model | method | " + " | ".join(f"{c.gb} GB ({c.usable / GiB:.1f} GiB)" for c in CARDS) + " |"
    out = [head, "|" + "---|" * (2 + len(CARDS))]
    for size in G1:
        for method in METHODS:
            mine = {c["card_gb"]: c for c in rows if c["size"] == size and c["method"] == method}
            out.append(f"| {size} | {method} | " + " | ".join(cell_text(mine[c.gb]) for c in CARDS) + " |")
    return out


def neighbour_table(rows: list[dict]) -> list[str]:
    out = ["| model | measured settings (ctx 1024 × 1) | measured | estimate | "
           + " | ".join(f"{c.gb} GB" for c in CARDS) + " |", "|" + "---|" * (4 + len(CARDS))]
    for n in rows:
        base, quant = train_speed.parse_method(n["method"])
        what = base + (f", QUANT={quant}" if quant != "none" else "") + (
            f", TRAIN_PARTS={n['train_parts']}" if n["train_parts"] else "") + f", GRAD_CP={n['grad_cp']}"
        what += f", OFFLOAD_BLOCKS={n['offload']}" if n["offload"] else ""
        what += ", COMPILE=0" if n["compile"] == "0" else ""
        out.append(f"| {n['size']} | {what} | {n['measured_gib']:.2f} (m) | {n['estimate_gib']:.2f} (e) | "
                   + " | ".join("✓" if n["fits"][c.gb] else "✗" for c in CARDS) + " |")
    return out


def report(rows: list[dict], near: list[dict], acc: dict) -> list[str]:
    lo7, hi7, n7 = acc["rwkv7"]
    lo, hi, n = acc["all"]
    measured = sum(c["kind"] == "measured" for c in rows)
    lines = table(rows)
    lines += ["", f"GiB at the training process's peak as nvidia-smi would show it; (e) the trainer's pre-flight "
              f"estimate, (m) measured on an H100 with the same plan ({measured} of {len(rows)} cells). "
              f"✓ within {100 * FIT_FRACTION:.0f} % of the card's usable memory (CUDA's total, in brackets), "
              "⚠ within it but not that margin (\"close to the limit\"), ✗ over it. ckpt k/L: GRAD_CP=auto "
              "checkpoints k of L blocks (none named: none); offload N: OFFLOAD_BLOCKS=auto streams N blocks' frozen "
              f"weights, held in page-locked CPU memory (at most {100 * HOST_FRACTION:.0f} % of what is "
              "available). Estimate against the "
              f"measured nvidia-smi figure: {100 * lo7:+.0f} % to {100 * hi7:+.0f} % on the {n7} RWKV-7 rows, "
              f"{100 * lo:+.0f} % to {100 * hi:+.0f} % on all {n} (bench/calibrate_memory.py)."]
    if near:
        lines += ["", "Measured on an H100 near these settings (today's code paths; ✓ where the measured peak is "
                  "within the card's usable memory):", ""] + neighbour_table(near)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/fits_table.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per cell instead of the tables")
    ap.add_argument("--measured", type=Path, default=MEASURED, help="measured rows (train_speed.py --json)")
    args = ap.parse_args(argv)
    runs = measured_runs(args.measured)
    rows = cells(runs)
    if args.json:
        for c in rows:
            print(json.dumps(c))
        return 0
    print("\n".join(report(rows, neighbours(runs), accuracy(runs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
