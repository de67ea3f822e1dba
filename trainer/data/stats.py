"""What a user needs to fill in training.sh, computed from the item lengths (in tokens, end token included).

    lengths = np.array([...])             # one entry per item written
    print("\\n".join(report_lines(lengths)))

Pieces: ``summary`` (min / mean / p95 / max, max_length rounded up to 16, the next power of two),
``histogram_lines``, ``batch_table`` (for each item count within +-10 of the real one, the divisors
as MICRO_BSZ candidates with EPOCH_STEPS = count / MICRO_BSZ), ``suggest_ctx_len``, ``magic_prime``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def round_up(x: int, multiple: int = 16) -> int:
    return max(multiple, -(-int(x) // multiple) * multiple)


def next_power_of_two(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class Summary:
    items: int
    tokens: int
    min: int
    mean: float
    p95: int
    max: int
    max_length: int               # max rounded up to a multiple of 16
    max_length_power_of_two: int  # the smallest power of two >= max


def summary(lengths: np.ndarray) -> Summary:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no items")
    mx = int(lengths.max())
    return Summary(items=int(lengths.size), tokens=int(lengths.sum()), min=int(lengths.min()),
                   mean=float(lengths.mean()), p95=int(np.ceil(np.percentile(lengths, 95))), max=mx,
                   max_length=round_up(mx, 16), max_length_power_of_two=next_power_of_two(mx))


def histogram_lines(lengths: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    """A small text histogram: one line per length range with a bar of '#' and the count."""
    lengths = np.asarray(lengths, dtype=np.int64)
    lo, hi = int(lengths.min()), int(lengths.max())
    bins = max(1, min(bins, hi - lo + 1))
    edges = np.linspace(lo, hi + 1, bins + 1)
    edges = np.unique(np.ceil(edges).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, int(counts.max()))
    label_w = len(str(hi))
    lines = []
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        bar = "#" * (int(round(width * c / top)) if c else 0)
        if c and not bar:
            bar = "."
        lines.append(f"  {a:>{label_w}}..{b - 1:<{label_w}} | {bar:<{width}} {c}")
    return lines


def divisors(n: int) -> list[int]:
    import sympy
    return [int(d) for d in sympy.divisors(int(n))]


def batch_table(n: int, spread: int = 10) -> list[tuple[int, list[int]]]:
    """``[(count, divisors of count), ...]`` for count in n-spread .. n+spread (counts >= 1)."""
    return [(m, divisors(m)) for m in range(max(1, n - spread), n + spread + 1)]


def batch_table_lines(n: int, spread: int = 10, max_shown: int = 16, max_bsz: int = 128) -> list[str]:
    rows = batch_table(n, spread)
    w = len(str(rows[-1][0]))
    lines = ["MICRO_BSZ x EPOCH_STEPS = items, for item counts near yours (EPOCH_STEPS = items / MICRO_BSZ):"]
    for m, divs in rows:
        shown = [d for d in divs if d <= max_bsz][:max_shown]
        cells = "  ".join(f"{d}x{m // d}" for d in shown)
        more = f"  (+{len(divs) - len(shown)} more)" if len(divs) > len(shown) else ""
        mark = "->" if m == n else "  "
        tail = "   <- your data" if m == n else ""
        lines.append(f"  {mark} {m:>{w}} items: {cells}{more}{tail}")
    prime = " (a prime count: only 1 and itself divide it)" if len(divisors(n)) == 2 else ""
    lines.append(f"The row marked -> is your real item count, {n}{prime}: take MICRO_BSZ from it and "
                 f"EPOCH_STEPS = {n} / MICRO_BSZ, so that one epoch covers every item exactly once "
                 f"(with several GPUs divide by their number too). The other rows show which batch "
                 f"sizes adding or removing a few items would allow.")
    return lines


def suggest_ctx_len(lengths: np.ndarray) -> tuple[int, str]:
    """A CTX_LEN (multiple of 16) and why: every item whole, unless a few outliers would double it."""
    s = summary(lengths)
    full, p95 = s.max_length, round_up(s.p95, 16)
    if full <= 512 or full <= 1.5 * p95:
        return full, "every item fits whole"
    cut = int((np.asarray(lengths) > p95).sum())
    return p95, (f"{s.items - cut} of {s.items} items fit whole; the {cut} longer ones would be cut "
                 f"(use CTX_LEN={full} to keep them whole, or MAX_TOKENS={p95} to drop them)")


def magic_prime(tokens: int, ctx_len: int) -> int | None:
    """RWKV-LM's magic_prime for random-window training: the largest prime p <= tokens // ctx_len - 1
    with p % 3 == 2; None when there are fewer than 3 windows."""
    if tokens < 3 * ctx_len:
        return None
    import sympy
    p = tokens // ctx_len - 1
    while p >= 2:
        if p % 3 == 2 and sympy.isprime(p):
            return int(p)
        p -= 1
    return None


def report_lines(lengths: np.ndarray) -> list[str]:
    """The full report printed by make_tokenize (lengths: one per item written, end token included)."""
    s = summary(lengths)
    ctx, why = suggest_ctx_len(lengths)
    lines = [
        f"items:   {s.items}",
        f"tokens:  {s.tokens}",
        f"item length (tokens): min {s.min}  mean {s.mean:.1f}  p95 {s.p95}  max {s.max}",
        f"max_length:               {s.max_length}   (longest item, rounded up to a multiple of 16)",
        f"max_length_power_of_two:  {s.max_length_power_of_two}",
        "length histogram (tokens per item):",
        *histogram_lines(lengths),
        *batch_table_lines(s.items),
        f"suggested CTX_LEN: {ctx}   ({why})",
    ]
    p = magic_prime(s.tokens, ctx)
    if p is not None:
        lines.append(f"for random-window sampling with CTX_LEN={ctx}: magic_prime = {p}")
    return lines
