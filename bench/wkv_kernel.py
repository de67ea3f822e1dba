"""Time the RWKV-7 WKV ops on a CUDA GPU: forward, forward + backward, peak memory, error vs the fp32 oracle.

    python bench/wkv_kernel.py                                   # every available op, the three shapes
    python bench/wkv_kernel.py --ops triton --shapes big --repeats 50
    python bench/wkv_kernel.py --ops triton --shapes big 4,2048,2048 --configs 64x4/64x4 16x1/64x8:128

Inputs as the model gives them: r, k, v, a, b in bf16, the log decay in fp32 (RWKV-7's range), an fp32
initial state; the loss gradient reaches y and the final state. The forward is also timed without an
initial state, as a model's forward calls it. Times are CUDA-event medians over
--repeats calls after --warmup calls (the first call, compilation included, is shown apart). Peak memory
is the allocator's peak during one forward + backward above what was allocated before (inputs, their
gradients from an earlier call freed). Errors: relative rms (as tests/test_ops.py) of y, the final state
and every gradient against the fp32 oracle on the first --check-T tokens of the same B and H (the oracle
is a Python loop over T), inputs rounded to bf16 for both.

Shapes (B, T, C), head size 64: big (8, 4096, 4096) is the published comparison (RWKV-LM's CUDA kernel
17 ms forward + backward on an H100); long (1, 32768, 4096); small (8, 1024, 768), a small model. The
chunk op (pure PyTorch) runs only at the small shape. --configs sweeps the triton op's launch
configuration: "fwdBVxWARPS[:MAXNREG]/bwdBVxWARPS[:MAXNREG]", "rBVxTPR/" for the Gluon rows forward (BV
value rows per program, TPR threads per row), "/rTPR[:MAXNREG]" for the Gluon rows backward with TPR threads
per row (see trainer/ops/triton_wkv7.py): 64x2/64x2 is the tile backward that was the default before,
64x2/r2 the rows backward, r64x1/r2 both rows kernels.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.ops import why_unavailable, wkv  # noqa: E402
from trainer.ops import triton_wkv7  # noqa: E402
from trainer.ops.reference import wkv7_reference  # noqa: E402

SHAPES = {"big": (8, 4096, 4096), "long": (1, 32768, 4096), "small": (8, 1024, 768)}
OPS = ("triton", "fla", "rwkvfla", "chunk")
GRADS = ("r", "k", "v", "logw", "a", "b", "state")


def versions() -> str:
    import importlib.metadata as md
    out = [f"torch {torch.__version__}"]
    for dist in ("triton", "pytorch-triton", "fla-core", "flash-linear-attention", "rwkv-fla"):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """RWKV-7-like inputs on the GPU: bf16 r, k, v, a, b; fp32 log decay in [-e^-0.5, 0]; fp32 state."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    bf = torch.bfloat16
    x = {"r": rnd(B, T, H, N).to(bf), "k": (rnd(B, T, H, N) * 0.5).to(bf), "v": rnd(B, T, H, N).to(bf),
         "logw": -math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N))}
    kk = F.normalize(rnd(B, T, H, N), dim=-1)
    x["a"] = (-kk).to(bf)
    x["b"] = (kk * torch.rand(B, T, H, N, device="cuda", generator=g)).to(bf)
    x["state"] = rnd(B, H, N, N) * 0.5
    return x


def call(op: str, x: dict, config=None):
    if op == "triton" and config is not None:
        return triton_wkv7.wkv7_triton(x["r"], x["k"], x["v"], x["logw"], x["a"], x["b"], x["state"], config=config)
    return wkv(x["r"], x["k"], x["v"], x["logw"], a=x["a"], b=x["b"], state=x["state"], op=op)


def cuda_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp(min=1e-30)).item()


def errors(op: str, x: dict, T: int, config=None) -> dict[str, float]:
    """Relative rms error of y, the final state and every gradient vs the fp32 oracle on tokens [0, T)."""
    part = {n: (t[:, :T] if n != "state" else t).detach() for n, t in x.items()}
    results = []
    for fn in ("oracle", op):
        leaves = {n: (t.float() if fn == "oracle" else t).clone().requires_grad_() for n, t in part.items()}
        if fn == "oracle":
            y, s = wkv7_reference(leaves["r"], leaves["k"], leaves["v"], leaves["logw"], leaves["a"], leaves["b"],
                                  leaves["state"])
        else:
            y, s = call(op, leaves, config)
        g = torch.Generator(device="cuda").manual_seed(1)
        dy = torch.randn(y.shape, device="cuda", generator=g)
        ds = torch.randn(s.shape, device="cuda", generator=g)
        torch.autograd.backward([y.float(), s], [dy, ds])
        out = {"y": y.float(), "S": s.float()}
        out.update({"d" + n: leaves[n].grad.float() for n in GRADS})
        results.append(out)
    ref, got = results
    return {n: rel_rms(got[n], ref[n]) for n in ref}


def bench(op: str, shape: str, args, config=None) -> None:
    B, T, C = shape_of(shape)
    N = args.head
    H = C // N
    label = op if config is None else f"triton {config_label(config)}"
    x = make_inputs(B, T, H, N)
    leaves = {n: t.requires_grad_() for n, t in x.items()}
    dy = torch.randn(B, T, H, N, device="cuda", dtype=torch.bfloat16)
    ds = torch.randn(B, H, N, N, device="cuda")

    def fwd():
        with torch.no_grad():
            call(op, x, config)

    x0 = dict(x, state=None)

    def fwd0():                   # as a model's forward gives it: no initial state
        with torch.no_grad():
            call(op, x0, config)

    def fwd_bwd():
        for t in leaves.values():
            t.grad = None
        y, s = call(op, leaves, config)
        torch.autograd.backward([y, s], [dy, ds])

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fwd_bwd()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms_fwd = cuda_ms(fwd, args.repeats, args.warmup)
    ms_fwd0 = cuda_ms(fwd0, args.repeats, args.warmup)
    ms_all = cuda_ms(fwd_bwd, args.repeats, args.warmup)
    for t in leaves.values():
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    err = "" if args.check_T <= 0 else "  ".join(f"{n} {e:.1e}" for n, e in errors(op, x, min(T, args.check_T), config).items())
    print(f"{label:28s} {shape:6s} B={B} T={T} C={C} | fwd {ms_fwd:8.2f} ms (no state {ms_fwd0:6.2f}) | fwd+bwd {ms_all:8.2f} ms | "
          f"peak +{peak:6.2f} GiB | first call {first:6.1f} s | err@T={min(T, args.check_T)}: {err}", flush=True)


def shape_of(name: str) -> tuple[int, int, int]:
    if name in SHAPES:
        return SHAPES[name]
    B, T, C = (int(v) for v in name.split(","))
    return B, T, C


def parse_config(text: str) -> dict:
    def one(part: str):
        main, _, reg = part.partition(":")
        if main.startswith("r") and "x" in main:   # the Gluon rows forward: BV rows, TPR threads per row
            bv, tpr = (int(v) for v in main[1:].split("x"))
            return ("rows", bv, tpr)
        if main.startswith("r"):   # the Gluon rows backward, TPR threads per row
            return ("rows", int(main[1:]), int(reg) if reg else None)
        bv, warps = (int(v) for v in main.split("x"))
        return (bv, warps, int(reg) if reg else None)
    fwd, bwd = text.split("/")
    return {"fwd": one(fwd), "bwd": one(bwd)}


def config_label(config: dict) -> str:
    fwd = config["fwd"]
    fwd = f"r{fwd[1]}x{fwd[2]}" if fwd[0] == "rows" else f"{fwd[0]}x{fwd[1]}" + (f":{fwd[2]}" if fwd[2] else "")
    bv, w, r = config["bwd"]
    bwd = f"r{w}" if bv == "rows" else f"{bv}x{w}"
    return fwd + "/" + bwd + (f":{r}" if r else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated, from " + ", ".join(OPS))
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="names (" + ", ".join(SHAPES) + ") or B,T,C")
    ap.add_argument("--head", type=int, default=64, help="head size N")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-T", type=int, default=256, help="tokens compared with the oracle (0: skip)")
    ap.add_argument("--configs", nargs="*", default=[], help="triton launch configs to sweep, e.g. 64x4/64x8:128")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} | {versions()}")
    print(f"RWKV-7 WKV, head size {args.head}, bf16 r/k/v/a/b, fp32 log decay and initial state; "
          f"median of {args.repeats} after {args.warmup} warm-up calls")
    for shape in args.shapes:
        for op in args.ops.split(","):
            if op == "chunk" and shape != "small":
                continue
            reason = why_unavailable(op, "cuda")
            if reason:
                print(f"{op:28s} {shape:6s} skipped: {reason}")
                continue
            configs = [parse_config(c) for c in args.configs] if op == "triton" and args.configs else [None]
            if op == "triton" and configs == [None]:
                B, T, C = shape_of(shape)
                print(f"{'':28s} triton default config here: "
                      f"{config_label(triton_wkv7.default_config(B, T, C // args.head, args.head, torch.device('cuda')))}")
            for config in configs:
                try:
                    bench(op, shape, args, config)
                except torch.cuda.OutOfMemoryError:
                    print(f"{op:28s} {shape:6s} out of memory")
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
