"""Calibrate trainer/memory.py: its estimate against measured rows, or against a simulation.

    python bench/calibrate_memory.py [bench/memory_measured.jsonl]     measured GPU rows (train_speed --json)
    python bench/calibrate_memory.py --simulate [--grid small|wide]    fake-tensor simulation, no GPU needed

Measured: for every row of the jsonl (status ok, on CUDA) it rebuilds the row's settings, estimates them
and prints estimate vs measurement (peak allocated, and nvidia-smi's used memory less the baseline) with
the error, then least-squares fits of the constants that carry most of the uncertainty:
  * a scale for the activation terms (ACT_C/ACT_F, WKV_SAVED, CP_SAVED: one factor per op),
  * HEAD_BYTES,
  * CUDA_CONTEXT and ALLOCATOR_SLACK (from used - allocated),
and what the errors would be with the fitted values. Edit the constants in trainer/memory.py by hand.

Simulated: runs OUR training step (the trainer's model, PEFT method, quantisation, fp32 trained tensors,
Fabric's autocast and fp32 output, masked_loss, backward, gradient clipping, fused AdamW) on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no data, no compute) and counts the bytes alive at every moment
(blocks of 512 bytes, as the CUDA caching allocator rounds). CUDA's autocast rules are imitated on the CPU:
layer_norm, group_norm, pow, exp, sum, norms and softmaxes compute in fp32 under autocast on CUDA but not on
the CPU, so the simulation registers fp32 kernels for them at the AutocastCPU dispatch key while it runs.
The WKV op of a simulation is "chunk" (our pure-torch op) or "null" (shapes only: what a kernel that saves
nothing would cost), so the block's own memory and the op's can be told apart. Not simulated: the fla
kernels (Triton), bitsandbytes (nf4 dequantisation is given bnb's output, a bf16 weight), the CUDA
context and the allocator's fragmentation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GiB = 2 ** 30


# ============================================================================ simulation (fake tensors)
class _LiveBytes:
    """Counts the bytes of every tensor storage alive, rounded up to 512-byte blocks; keeps the peak."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary
        self.live = 0
        self.peak = 0
        self.seen = WeakIdKeyDictionary()
        self.counting = True

    @contextlib.contextmanager
    def off(self):
        """Tensors made in here are not GPU memory (the embedding kept on the CPU): never counted."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":          # the model's skeleton before it gets (fake) storage
            return
        st = t.untyped_storage()
        if st in self.seen:
            return
        if not self.counting:
            self.seen[st] = 0
            return
        n = -(-st.nbytes() // 512) * 512
        self.seen[st] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        outer.track(t)
                return out
        return Mode()


# Ops that CUDA's autocast runs in fp32 (its "fp32" and "fp32_set_opt_dtype" lists) and the CPU's does not:
# the ones our model and loss call.
_CUDA_FP32_OPS = ("layer_norm", "group_norm", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "exp", "sum",
                  "sum.dim_IntList", "linalg_vector_norm", "log_softmax.int", "softmax.int", "cumsum",
                  "rsqrt", "log")


@contextlib.contextmanager
def cuda_autocast_rules():
    """While active, CPU autocast computes the ops above in fp32, as CUDA autocast does."""
    from torch.utils._pytree import tree_map

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a

    lib = torch.library.Library("aten", "IMPL")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    for name in _CUDA_FP32_OPS:
        base, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, base), overload or "default")

        def kernel(*args, _op=op, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(keys):
                return _op(*tree_map(up, args), **tree_map(up, kwargs))
        lib.impl(name, kernel, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


class _NullWKV(torch.autograd.Function):
    """A WKV op that saves nothing and computes nothing: outputs and input gradients of the right shapes."""

    @staticmethod
    def forward(ctx, r, k, v, logw, x1, x2, state):
        ctx.shapes = [(t.shape, t.dtype) if t is not None else None for t in (r, k, v, logw, x1, x2, state)]
        B, T, H, N = r.shape
        return torch.empty_like(r), torch.empty(B, H, N, N, dtype=torch.float32, device=r.device)

    @staticmethod
    def backward(ctx, gy, gs):
        return tuple(None if s is None else torch.empty(s[0], dtype=s[1], device=gy.device) for s in ctx.shapes)


def _null7(r, k, v, logw, a, b, state=None):
    return _NullWKV.apply(r, k, v, logw, a, b, state)


def _null6(r, k, v, logw, u, state=None):
    return _NullWKV.apply(r, k, v, logw, u, None, state)


@dataclass
class SimResult:
    load_peak: int            # bytes alive at most while the model was built, adapted, quantised
    static: int               # after set-up, before the first step
    step_peaks: list = field(default_factory=list)   # peak of each training step (forward .. optimizer)
    after_forward: int = 0    # bytes alive right after the forward pass + loss of the last step
    trained: int = 0          # trained elements (each has a 4-byte weight, grad and two 4-byte AdamW states)

    @property
    def peak(self) -> int:
        return max([self.load_peak, *self.step_peaks])


def simulate(cfg: Any, sizes: Any, steps: int = 2, op: str = "chunk", deepspeed: bool = False) -> SimResult:
    """Simulate the trainer's set-up and ``steps`` training steps of ``cfg`` on a model of ``sizes``.

    ``cfg``: a TrainConfig (or a namespace with its names); ``sizes``: a ModelConfig. ``op``: "chunk" or
    "null" (see the module docstring). ``deepspeed``: run as DeepSpeed does (every tensor in the weight
    dtype, trained ones too, no autocast; its fp32 masters and partitions are not simulated: only the
    activations are meant to be compared). Runs on the CPU in seconds for small models, a minute for 7B."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer import infctx as infctx_mod
    from trainer import loop, ops
    from trainer import quant as quant_mod
    from trainer.model import RWKV, Execution
    from trainer.plan import nominal
    from trainer.ops import chunk as chunk_mod
    from trainer.peft import get_method
    from trainer.tables import keeps

    ops._load_builtin()
    if op == "null":
        ops.register("null", _null7, _null6, lambda device: None)
    plan = nominal(cfg, sizes, op=op)            # what the trainer would decide on a GPU
    wdtype = plan.weight_dtype
    amp = wdtype != torch.float32 and not deepspeed
    real_dequant = quant_mod.dequantize_weight

    def dequant(codes, scales, shape, quant, use_bnb=None):
        if quant == "nf4":           # bitsandbytes' kernel writes the bf16 weight directly
            return torch.empty(shape, dtype=torch.bfloat16, device=codes.device)
        return real_dequant(codes, scales, shape, quant, use_bnb=False)

    live = _LiveBytes()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    patches = [mock.patch.object(chunk_mod, "_chunk_len", lambda logw, T, cs, mr: max(1, min(cs, T))),
               mock.patch.object(infctx_mod, "_last_needed", lambda mask: mask.shape[1]),
               mock.patch.object(quant_mod, "dequantize_weight", dequant)]
    res = SimResult(0, 0)
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(cuda_autocast_rules())
        stack.enter_context(fake)
        stack.enter_context(live.mode())
        # --- as loop.prepare: the model in the weight dtype, the method, quantisation, fp32 trained tensors
        with torch.device("meta"):
            model = RWKV(sizes)
        on_cpu = (not deepspeed and plan.emb_on_cpu, not deepspeed and plan.deep_embed_on_cpu)   # tables.py:
        for name, mod in model.named_modules():                                                  # not GPU memory
            for n, p in list(mod._parameters.items()):
                if p is not None:
                    with live.off() if keeps(f"{name}.{n}", *on_cpu) else contextlib.nullcontext():
                        mod._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=wdtype))
                        live.track(mod._parameters[n])
        cls = get_method(cfg.FINETUNE_MODE)
        method = cls(cls.settings_from(cfg))
        method.apply(model, train_parts=cfg.TRAIN_PARTS)
        quant_mod.quantize_model(model, cfg.QUANT)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(wdtype) if deepspeed else p.data.float()
        if sizes.version == 7:
            for name in ("v0", "v1", "v2"):
                getattr(model.blocks[0].att, name).requires_grad_(False)
        model.set_execution(Execution(op=op, grad_cp=plan.checkpointing,       # the FFN whole
                                      act_dtype=plan.act_dtype if amp else None))
        model.train()
        res.load_peak = live.peak
        # --- as loop.train
        params = [p for p in model.parameters() if p.requires_grad]
        res.trained = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=loop.ADAM_BETAS, eps=loop.ADAM_EPS, weight_decay=0.0,
                                fused=True)     # as strategy.Spread.optimizer on a GPU
        infctx = cfg.TRAIN_TYPE == "infctx"
        module = infctx_mod.InfctxLoss(model, cfg.CHUNK_CTX) if infctx else model
        res.static = live.live
        B, T = cfg.MICRO_BSZ, cfg.CTX_LEN
        for _ in range(steps):
            x = torch.zeros(B, T, dtype=torch.long)
            y = torch.zeros(B, T, dtype=torch.long)
            m = torch.ones(B, T)
            live.peak = live.live
            with torch.autocast("cpu", dtype=wdtype, enabled=amp):     # Fabric's forward_context
                out = module(x, targets=y, mask=m)                     # the loop's call: the loss
            loss = out.float()                                          # Fabric's convert_output
            del out
            res.after_forward = live.live
            loss.backward()
            del loss
            torch.nn.utils.clip_grad_norm_(params, loop.GRAD_CLIP, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            res.step_peaks.append(live.peak)
    return res


def sim_config(**kw):
    """A TrainConfig with the trainer's defaults and ``kw``, for simulate() and the estimate."""
    import dataclasses

    from trainer.config import TrainConfig, grad_cp_mode
    base = dict(PRECISION="bf16", GRAD_CP="1", COMPILE="0", OFFLOAD_BLOCKS="0")   # the simulation runs eagerly
    base.update(kw)
    base["GRAD_CP"] = grad_cp_mode(base["GRAD_CP"])
    return dataclasses.replace(TrainConfig(), **base)


# ============================================================================ estimate vs simulation
SIM_GRIDS = {
    # (version, layers, width, vocab, method, TRAIN_PARTS, CTX_LEN, MICRO_BSZ, GRAD_CP, QUANT, CHUNK_CTX or 0, op)
    "small": [
        (7, 2, 256, 4096, "lora", (), 256, 2, 0, "none", 0, "chunk"),
        (7, 2, 256, 4096, "state", (), 256, 2, 1, "none", 0, "null"),
        (6, 2, 256, 4096, "bone", ("time", "ln"), 128, 2, 0, "none", 0, "null"),
        (7, 2, 256, 4096, "full", (), 256, 1, 1, "none", 0, "null"),
        (5, 2, 256, 4096, "pissa", ("head",), 256, 1, 0, "int8", 0, "null"),
        (7, 3, 256, 4096, "lora", (), 512, 1, 1, "nf4", 128, "null"),
    ],
    "wide": [
        (7, 24, 2048, 65536, "lora", ("time", "ln"), 1024, 1, 1, "none", 0, "null"),
        (7, 24, 2048, 65536, "lora", ("time", "ln"), 4096, 8, 1, "none", 0, "null"),
        (7, 24, 2048, 65536, "state", (), 1024, 1, 1, "none", 0, "null"),
        (7, 24, 2048, 65536, "lora", ("time", "ln"), 1024, 1, 1, "nf4", 0, "null"),
        (7, 24, 2048, 65536, "full", (), 4096, 8, 1, "none", 0, "null"),
        (7, 24, 1024, 65536, "lora", (), 4096, 1, 1, "none", 512, "null"),
        (7, 24, 1024, 65536, "state", (), 2048, 4, 0, "none", 0, "chunk"),
        (6, 32, 4096, 65536, "lora", ("time", "ln"), 1024, 1, 1, "nf4", 0, "null"),
        (6, 24, 2048, 65536, "bone", (), 2048, 2, 1, "none", 0, "null"),
        (5, 24, 2048, 65536, "lora", ("head",), 1024, 2, 0, "none", 0, "null"),
    ],
}


def sim_case(case: tuple):
    """(cfg, sizes, op) of a SIM_GRIDS entry."""
    from trainer.checkpoint import config_from_sizes
    v, layers, width, vocab, method, parts, ctx, bsz, cp, quant, chunk, op = case
    cfg = sim_config(FINETUNE_MODE=method, TRAIN_PARTS=tuple(parts), CTX_LEN=ctx, MICRO_BSZ=bsz, GRAD_CP=bool(cp),
                     QUANT=quant, TRAIN_TYPE="infctx" if chunk else "normal", CHUNK_CTX=chunk or 512)
    return cfg, config_from_sizes(v, layers, width, vocab_size=vocab), op


def compare_simulated(grid: str = "small", log=print) -> list[float]:
    """Estimate vs simulation for every case of a grid; returns the relative errors (estimate/sim - 1)."""
    from trainer.plan import nominal
    errors = []
    log(f"{'case':<58} {'sim GiB':>8} {'est GiB':>8} {'error':>7}  peak at")
    for case in SIM_GRIDS[grid]:
        cfg, sizes, op = sim_case(case)
        sim = simulate(cfg, sizes, op=op).peak
        est = nominal(cfg, sizes, op=op).estimate
        err = est.peak_allocated / sim - 1
        errors.append(err)
        v, layers, width, vocab, method, parts, ctx, bsz, cp, quant, chunk, _ = case
        name = (f"v{v} {layers}x{width} {method}{'+' + quant if quant != 'none' else ''}"
                f"{' [' + ' '.join(parts) + ']' if parts else ''} ctx {ctx} bsz {bsz} cp {cp}"
                f"{' infctx ' + str(chunk) if chunk else ''} {op}")
        log(f"{name:<58} {sim / GiB:8.3f} {est.peak_allocated / GiB:8.3f} {100 * err:+6.1f}%  {est.peak_at}")
    log(f"mean |error| {100 * sum(map(abs, errors)) / len(errors):.1f}%, largest {100 * max(map(abs, errors)):.1f}%")
    return errors


# ============================================================================ estimate vs measured rows
def load_rows(path) -> list[dict]:
    """The usable GPU rows of a train_speed --json file (status ok, CUDA, a measured peak)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("status") == "ok" and r.get("gpu") not in (None, "cpu") and r.get("peak_alloc_bytes"):
            rows.append(r)
    return rows


@dataclass
class Compared:
    row: dict
    est: Any
    alloc: float                 # measured: max of set-up and training, torch.cuda.max_memory_allocated
    used: float | None           # measured: nvidia-smi's used memory at the peak, less the baseline


H100_DEFAULT_STACK = 132 * 2048 * 1024    # the driver's default 1 KiB for each of an H100's resident threads


def _stack_kept(row: dict) -> int:
    """The CUDA thread-stack reserve a row's process kept (trainer/device.trim_thread_stack): as recorded,
    or, for rows measured before session 12, when the trainer did not give it back yet, an H100's default
    (those rows are all H100 rows; the A/B rows of session 12 measured it as the difference in use)."""
    if "cuda_stack_kept_bytes" in row:
        return int(row["cuda_stack_kept_bytes"])
    if "cuda_stack_freed_bytes" in row:
        return 0
    if "H100" not in str(row.get("gpu") or row.get("device") or ""):
        raise ValueError(f"row {row.get('command')!r}: no cuda_stack field and not an H100: its stack is unknown")
    return H100_DEFAULT_STACK


def compare_rows(rows: list[dict]) -> list[Compared]:
    """Estimate every row (its own settings and the op it ran) and pair it with its measurement."""
    import train_speed
    from trainer.plan import nominal
    out = []
    for r in rows:
        cfg, sizes = train_speed.row_config(r), train_speed.row_sizes(r)
        # rows measured before session 12 had the embedding on the GPU, before session 13 the FFN whole
        est = nominal(cfg, sizes, op=r.get("op_resolved") or r.get("op"),
                      tiers=(int(r.get("plain_top") or 0), int(r.get("keep_products") or 0)),
                      emb_on_cpu=bool(r.get("emb_on_cpu")), deep_embed_on_cpu=bool(r.get("deep_embed_on_cpu")),
                      ffn_pieces=int(r.get("ffn_pieces") or 1)).estimate
        alloc = max(r.get("peak_alloc_bytes") or 0, r.get("load_alloc_bytes") or 0)
        used = max(r.get("peak_used_bytes") or 0, r.get("load_used_bytes") or 0) or None
        if used is not None and r.get("used_baseline_bytes") is not None:
            used -= r["used_baseline_bytes"]
        if used is not None:          # the trainer gives the driver's thread-stack reserve back; rows that kept it
            used -= _stack_kept(r)    # are compared without it
        out.append(Compared(r, est, alloc, used))
    return out


def _lstsq(columns: list[list[float]], y: list[float]) -> list[float]:
    import numpy as np
    A = np.array(columns, dtype=float).T
    coef, *_ = np.linalg.lstsq(A, np.array(y, dtype=float), rcond=None)
    return [float(c) for c in coef]


def fit(compared: list[Compared], log=print) -> dict:
    """Least-squares suggestions for the constants; prints them with the errors they would give."""
    from trainer import memory as M
    out: dict = {}
    # activations and head: measured - (weights + optimizer) = s_act · (activation terms) + s_head · (head term)
    act, head, y = [], [], []
    for c in compared:
        t = c.est.terms
        if c.est.peak_at != "backward pass":
            continue
        base = t["weights"] + t["trained"] + t["optimizer"]
        start = t["saved"] + t["head"] + t["infctx states"] + t["dequant"]
        h = t["head"] if start >= c.est.train_peak - base - 1 else 0.0     # the head's backward is the peak
        act.append(c.est.train_peak - base - h)
        head.append(h)
        y.append(c.alloc - base)
    if len(y) >= 3 and not any(head):
        s_act, = _lstsq([act], y)
        out["activation_scale"] = s_act
        log(f"activations: multiply ACT, PARTS_ACT, CP_SAVED, BWD_WORK, WKV_SAVED and WKV_WORK by {s_act:.3f} "
            f"(least squares over {len(y)} rows; none peaks in the head's backward, HEAD_BYTES not fitted)")
    elif len(y) >= 3:
        s_act, s_head = _lstsq([act, head], y)
        out["activation_scale"], out["head_scale"] = s_act, s_head
        log(f"activations: multiply ACT, PARTS_ACT, CP_SAVED, BWD_WORK, WKV_SAVED and WKV_WORK by {s_act:.3f}; "
            f"HEAD_BYTES {M.HEAD_BYTES} -> {M.HEAD_BYTES * s_head:.2f}   (least squares over {len(y)} rows "
            "peaking in the backward pass)")
    else:
        log(f"activations: {len(y)} rows peak in the backward pass; need 3 to fit")
    # nvidia-smi: used = CUDA_CONTEXT + (1 + slack) · allocated
    pairs = [(c.alloc, c.used) for c in compared if c.used]
    if len(pairs) >= 2:
        slope_intercept = _lstsq([[a for a, _ in pairs], [1.0] * len(pairs)], [u for _, u in pairs])
        slope, intercept = slope_intercept
        out["slack"], out["context"] = slope - 1, intercept
        log(f"nvidia-smi: used ≈ {intercept / GiB:.2f} GiB + {slope:.3f} × allocated  ->  CUDA_CONTEXT = "
            f"{intercept / GiB:.2f} GiB, ALLOCATOR_SLACK = {slope - 1:.3f}   (was {M.CUDA_CONTEXT / GiB:.2f}, "
            f"{M.ALLOCATOR_SLACK:.3f}; {len(pairs)} rows)")
    return out


def report(compared: list[Compared], log=print) -> None:
    log(f"{'row':<62} {'alloc':>7} {'est':>7} {'err':>7} | {'used':>7} {'est':>7} {'err':>7}  peak at")
    for c in compared:
        r = c.row
        name = (f"v{r['version']} {r['size']} {r['method']} ctx {r['ctx']} bsz {r['bsz']} cp {r['grad_cp']} "
                f"{r.get('op_resolved') or r['op']}{' infctx ' + str(r['infctx']) if r.get('infctx') else ''}"
                f"{' [' + r['train_parts'] + ']' if r.get('train_parts') else ''}")
        e1 = c.est.peak_allocated / c.alloc - 1
        used = f"{c.used / GiB:7.2f} {c.est.total / GiB:7.2f} {100 * (c.est.total / c.used - 1):+6.1f}%" \
            if c.used else f"{'-':>7} {c.est.total / GiB:7.2f} {'-':>7}"
        log(f"{name:<62} {c.alloc / GiB:7.2f} {c.est.peak_allocated / GiB:7.2f} {100 * e1:+6.1f}% | {used}  "
            f"{c.est.peak_at}")
    errs = [abs(c.est.peak_allocated / c.alloc - 1) for c in compared]
    if errs:
        log(f"allocated: mean |error| {100 * sum(errs) / len(errs):.1f}%, largest {100 * max(errs):.1f}% "
            f"over {len(errs)} rows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/calibrate_memory.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="?", default=str(ROOT / "bench" / "memory_measured.jsonl"))
    ap.add_argument("--simulate", action="store_true", help="compare with the fake-tensor simulation instead")
    ap.add_argument("--grid", default="small", choices=sorted(SIM_GRIDS), help="simulation cases")
    args = ap.parse_args(argv)
    if args.simulate:
        compare_simulated(args.grid)
        return 0
    rows = load_rows(args.jsonl)
    if not rows:
        print(f"{args.jsonl}: no measured GPU rows (run bench/train_speed.py --grid memfit --json {args.jsonl} "
              "on a GPU first)")
        return 1
    compared = compare_rows(rows)
    report(compared)
    print()
    fit(compared)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
