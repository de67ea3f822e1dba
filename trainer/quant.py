"""QUANT=int8 | nf4 | fp8: keep the frozen base weights of the attention / FFN linear layers quantised (QLoRA).

The adapter (LoRA, DoRA, PiSSA, Bone, Bat, the state) trains in bf16/fp32 as usual; only the frozen base
product ``W x`` of each of these layers reads W from a quantised copy, dequantised one layer at a time
inside the forward and again inside the backward (never kept for the backward, see ``_quant_mm``).

Which layers: the linears that LoRA / PiSSA / DiSHA adapt (``base.TARGET_RE``: att receptance, key, value,
output, gate and ffn key, value, receptance), for every method including state tuning, where they stay
plain frozen layers. They hold almost all the weights (12·C² of ~12·C² + 2·V·C per layer and model).
Not quantised: ``emb`` (a lookup, not a product: nothing to gain in speed, and TRAIN_PARTS=emb trains it),
``head`` (its error goes straight into the logits, it is small next to the blocks of a large model, and
TRAIN_PARTS=head trains it), the small LoRA-shaped time-mix tensors (w1/w2/a1/... : parameters, not
linears) and the norms. RWKV-PEFT does the same: its ``quant`` step reaches the att/ffn linears only.
TRAIN_PARTS (emb, head, time, ln) therefore never trains a quantised tensor; full fine-tuning would, and is
refused.

Formats (the formats of bitsandbytes 0.45+; bytes per weight against 2 for bf16):
  nf4   blocks of 64 consecutive weights (row-major), absmax per block (fp32), each weight the nearest of
        the 16 NF4 levels × absmax, two 4-bit codes per byte (first in the high nibble):
        0.5 + 4/64 = 0.5625 bytes per weight (3.56× smaller than bf16). No double quantisation.
  int8  one absmax per output row (fp32), each weight round(127 · w / absmax) as int8 (LLM.int8()'s
        vector-wise quantisation, threshold 0, weight only): 1 + 4/in_features ≈ 1.0 byte per weight (2×).
  fp8   one scale per output row (fp32, absmax / 448), each weight w / scale rounded to float8 e4m3 (stored as
        its bytes): 1 + 4/in_features bytes per weight, like int8, with a float's relative precision. Only on
        GPUs that multiply fp8 (compute capability 8.9+: RTX 40xx, L4, L40, H100, ...): there the forward
        product is fp8 × fp8 (``torch._scaled_mm``, the activations rounded to e4m3 with one scale per row,
        the output in bf16). That rounding of the activations is the one thing of training that the merged
        model (the same weights, in bf16) does not repeat; the backward multiplies with the weight dequantised
        to bf16, as for int8 and nf4.
Quantisation always starts from the weight rounded to bf16, and dequantises to bf16 (code·absmax in fp32,
then rounded) -- the values the forward multiplies with, whatever the run's precision.

Why the quantisation maths is ours (pure torch, written to the formulas of bitsandbytes' reference
backend) rather than bitsandbytes' CUDA kernels: merge must rebuild dequantise(quantise(W)) *exactly as
training saw it*, on any machine, GPU or not, bitsandbytes installed or not. Elementwise fp32 products, a
max, and comparisons with fixed midpoints give the same bits on the CPU and the GPU; the CUDA kernels
(reciprocal products, hard-coded thresholds) are not promised to match bnb's own CPU code to the bit, and
bnb's CUDA int8 quantiser takes fp16 input only (bf16 weights could overflow it). On the GPU the nf4
dequantisation of every forward/backward is bitsandbytes' CUDA kernel (``dequantize_4bit``), whose result
is by construction code·absmax in fp32 rounded to bf16 -- the same bits (checked by a GPU test).

Use (the trainer):
    check_quant(cfg.QUANT, cfg.FINETUNE_MODE, device)    # before loading: refusals with the fix
    method.apply(model, train_parts)                     # the method first (PiSSA's SVD sees the real W)
    report = quantize_model(model, cfg.QUANT)            # then the base weights are quantised in place
The trainer loads a QLoRA model with its quantised layers' weights left in the checkpoint file
(checkpoint.load_model(keep_on_cpu=is_quantised_key)) and quantises them into the GPU (``device``) one at a
time, so the bf16 weights are never all on the GPU (PiSSA excepted: its SVD runs on the GPU first).
Merge: ``dequantised_base(base_sd, quant, adapter_sd)`` (PiSSA needs the adapter: its base is the residual).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import QUANT_TYPES as QUANTS  # the quantised types (not "none")
from .errors import UserError
from .peft.base import TARGET_RE, AdaptedLinear

NF4_BLOCK = 64

# The 16 NF4 levels of bitsandbytes (``bitsandbytes.functional.get_4bit_type("nf4")``; quantiles of N(0, 1)).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
INT8_INV_127 = 7.874015718698502e-3        # 1/127 as bitsandbytes' int8_vectorwise_dequant writes it
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                            # the largest e4m3 number
FP8_CAPABILITY = (8, 9)                    # the first NVIDIA GPUs with fp8 tensor cores (Ada; Hopper is 9.0)
NAMES = " | ".join(("none",) + QUANTS)

INSTALL_FIX = "pip install bitsandbytes (or: pip install -e '.[gpu]'), on a machine with an NVIDIA GPU and CUDA"


def bytes_per_weight(quant: str, in_features: int | None = None) -> float:
    """Bytes of storage per base weight: none 2 (bf16), int8 and fp8 1 + 4/in_features, nf4 0.5 + 4/64."""
    if quant in (None, "", "none"):
        return 2.0
    if quant == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    if quant in ("int8", "fp8"):
        return 1.0 + (4 / in_features if in_features else 0.0)
    raise ValueError(f"unknown QUANT {quant!r}")


# ------------------------------------------------------------------------------------------ refusals
def quant_unavailable_reason(device, quant: str = "nf4") -> str | None:
    """Why QUANT cannot run on ``device`` (a torch.device or str), or None when it can.

    Every mode needs a CUDA GPU (on the CPU quantisation saves nothing worth its cost); nf4 also needs
    bitsandbytes for its dequantisation kernel, fp8 a GPU that multiplies fp8. int8 is plain torch."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return "quantisation needs an NVIDIA GPU" + (" with fp8 tensor cores" if quant == "fp8" else " (bitsandbytes)")
    if quant == "fp8":
        return fp8_unavailable_reason(dev)
    return bitsandbytes_missing("QUANT=nf4") if quant == "nf4" else None


def fp8_unavailable_reason(device: torch.device) -> str | None:
    """None where this GPU multiplies fp8 (compute capability 8.9 and newer, and this PyTorch's fp8 product runs
    there: tried once on a tiny product), else why not."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if cap < FP8_CAPABILITY:
        return (f"this GPU ({name}, compute capability {cap[0]}.{cap[1]}) has no fp8 tensor cores; fp8 needs "
                f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (RTX 40xx, L4, L40, H100, H200, ...)")
    try:
        a = torch.ones(16, 16, device=device)
        _fp8_product(a, torch.ones(16, 16, device=device).to(FP8), torch.ones(16, device=device))
    except Exception as err:                          # an old PyTorch, a driver without the kernel
        return f"PyTorch {torch.__version__} cannot multiply fp8 on this GPU ({type(err).__name__}: {err})"
    return None


def bitsandbytes_missing(who: str) -> str | None:
    """None when bitsandbytes loads, else why not and how to install it, ending in "; INSTALL_FIX" (``who``:
    what needs it, the sentence's subject)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return f"{who} needs the bitsandbytes package, which is not installed; {INSTALL_FIX}"
    except Exception as err:                       # a broken install: its own message says why
        return f"bitsandbytes is installed but does not load ({type(err).__name__}: {err}); {INSTALL_FIX}"
    return None


def check_quant(quant: str, finetune_mode: str, device=None) -> None:
    """Raise UserError when QUANT cannot be used with this method / on this device (None: skip the device)."""
    if quant in (None, "", "none"):
        return
    if quant not in QUANTS:
        raise UserError(f"QUANT={quant!r} is not one of {NAMES}.", f"set QUANT to one of {NAMES}")
    if finetune_mode == "full":
        raise UserError(f"QUANT={quant} with FINETUNE_MODE=full: full fine-tuning trains every weight, and a "
                        "quantised weight cannot be trained.",
                        "set QUANT=none for full fine-tuning, or use an adapter method (lora, dora, pissa, bone, "
                        "bat, state) with QUANT")
    if device is not None:
        why = quant_unavailable_reason(device, quant)
        if why:
            fix = INSTALL_FIX if "bitsandbytes package" in why or "does not load" in why else \
                "set QUANT=int8 (the same memory) or nf4 on this GPU" if quant == "fp8" and "GPU (" in why else \
                "train on a machine with an NVIDIA GPU, or set QUANT=none"
            said = why.removesuffix(f"; {INSTALL_FIX}")             # the fix is said once, as the fix
            raise UserError(f"{said if said.startswith('QUANT=') else f'QUANT={quant}: {said}'}.", fix)


# ------------------------------------------------------------------------------------------ the maths
def _nf4_tables(device) -> tuple[Tensor, Tensor]:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return levels, (levels[:-1] + levels[1:]) / 2                      # midpoints, computed in fp32


def quantize_weight(w: Tensor, quant: str) -> tuple[Tensor, Tensor]:
    """(codes, scales) of a 2-D weight: nf4 (uint8 [ceil(n/64)·32] two codes a byte, fp32 absmax per block),
    int8 (int8 [out, in], fp32 absmax per row), fp8 (e4m3 [out, in] as uint8 bytes, fp32 absmax/448 per row).
    Computed where ``w`` is; the same bits on CPU and GPU."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {list(w.shape)}")
    a = w.detach().to(torch.bfloat16).float()
    if quant == "nf4":
        flat = a.reshape(-1)
        pad = (-flat.numel()) % NF4_BLOCK                              # zeros do not change a block's absmax
        if pad:
            flat = F.pad(flat, (0, pad))
        blocks = flat.view(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1)
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1.0, 1.0)
        _, mids = _nf4_tables(w.device)
        q = torch.bucketize(scaled.reshape(-1), mids, out_int32=True).to(torch.uint8)
        return (q[0::2] << 4) | q[1::2], absmax
    if quant == "int8":
        rowmax = a.abs().amax(dim=1)
        scale = 127.0 / torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax))
        return torch.round(a * scale.unsqueeze(1)).to(torch.int8), rowmax
    if quant == "fp8":
        rowmax = a.abs().amax(dim=1)
        scale = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax)) / FP8_MAX
        return (a / scale.unsqueeze(1)).to(FP8).view(torch.uint8), scale
    raise ValueError(f"unknown QUANT {quant!r}")


def dequantize_weight(codes: Tensor, scales: Tensor, shape: tuple[int, int], quant: str,
                      use_bnb: bool | None = None) -> Tensor:
    """The bf16 weight [out, in] of ``quantize_weight``'s output. ``use_bnb``: None = bitsandbytes' CUDA kernel
    for nf4 on a GPU when it is installed, else pure torch (the same bits)."""
    out_f, in_f = shape
    n = out_f * in_f
    if quant == "int8":
        return (codes * scales.view(-1, 1) * INT8_INV_127).to(torch.bfloat16)
    if quant == "fp8":
        return (codes.view(FP8).float() * scales.view(-1, 1)).to(torch.bfloat16)
    if quant != "nf4":
        raise ValueError(f"unknown QUANT {quant!r}")
    if use_bnb is None:
        use_bnb = codes.is_cuda and _bnb() is not None
    if use_bnb:
        bnb = _bnb()
        if bnb is None:
            raise RuntimeError("bitsandbytes is not installed")
        out = torch.empty(shape, dtype=torch.bfloat16, device=codes.device)     # the kernel reads n codes
        return bnb.functional.dequantize_4bit(codes, absmax=scales, out=out, blocksize=NF4_BLOCK,
                                              quant_type="nf4")
    levels, _ = _nf4_tables(codes.device)
    idx = torch.stack(((codes >> 4), (codes & 0xF)), dim=1).reshape(-1).long()
    vals = (levels[idx].view(-1, NF4_BLOCK) * scales.view(-1, 1)).reshape(-1)
    return vals[:n].view(shape).to(torch.bfloat16)


_BNB: list = []


def _bnb():
    """bitsandbytes, or None if it is not installed / does not load (imported once, on first use)."""
    if not _BNB:
        try:
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
            _BNB.append(bitsandbytes)
        except Exception:
            _BNB.append(None)
    return _BNB[0]


# ------------------------------------------------------------------------------------------ modules
# y = x Wᵀ with W dequantised on the fly, as a torch.library custom op with its own backward (x's gradient
# dequantises again instead of keeping W, so what a layer holds between forward and backward is its
# quantised codes; x is not kept either: W gets no gradient). As a custom op it is one opaque node in a
# torch.compile'd graph (COMPILE), so a QLoRA block compiles whole instead of splitting at every layer.
@torch.library.custom_op("rwkv_peft::quant_matmul", mutates_args=())
def _quant_mm(x: Tensor, codes: Tensor, scales: Tensor, rows: int, cols: int, quant: str,
              transpose: bool) -> Tensor:
    """x Wᵀ [..., rows] (``transpose`` False), or x W [..., cols] (True: the backward), in x's dtype; W
    [rows, cols] is dequantised from ``codes`` and ``scales`` (fp32 stored as int32)."""
    w = dequantize_weight(codes, scales.view(torch.float32), (rows, cols), quant).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return x @ w if transpose else F.linear(x, w)


@_quant_mm.register_fake
def _quant_mm_fake(x, codes, scales, rows, cols, quant, transpose):
    return x.new_empty((*x.shape[:-1], cols if transpose else rows))


def _quant_mm_setup(ctx, inputs, output):
    x, codes, scales, rows, cols, quant, transpose = inputs
    ctx.save_for_backward(codes, scales)
    ctx.meta = (rows, cols, quant, transpose)


def _quant_mm_backward(ctx, grad):
    codes, scales = ctx.saved_tensors
    rows, cols, quant, transpose = ctx.meta
    return _quant_mm(grad, codes, scales, rows, cols, quant, not transpose), None, None, None, None, None, None


_quant_mm.register_autograd(_quant_mm_backward, setup_context=_quant_mm_setup)


def _fp8_product(x: Tensor, w8: Tensor, w_scale: Tensor) -> Tensor:
    """x Wᵀ with W = w8 · w_scale (e4m3 [out, in], one fp32 scale per row) multiplied in fp8: x [M, in] rounded
    to e4m3 with one scale per row (its absmax / 448); the product in bf16 (fp8 tensor cores)."""
    x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-30)
    x8 = (x.float() / x_scale).to(FP8)
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1).float(),
                            out_dtype=torch.bfloat16)


# QUANT=fp8's forward on a GPU with fp8 tensor cores: x Wᵀ multiplied in fp8 (one opaque node, as _quant_mm); the
# backward (x's gradient) multiplies with W dequantised to bf16 (_quant_mm), so gradients are not rounded to fp8.
@torch.library.custom_op("rwkv_peft::fp8_matmul", mutates_args=())
def _fp8_mm(x: Tensor, codes: Tensor, scales: Tensor, rows: int, cols: int) -> Tensor:
    """x Wᵀ [..., rows] in x's dtype, W [rows, cols] the fp8 ``codes`` (uint8 bytes) × ``scales`` (fp32 as int32)."""
    flat = x.reshape(-1, cols)
    with torch.autocast(x.device.type, enabled=False):
        y = _fp8_product(flat, codes.view(FP8), scales.view(torch.float32))
    return y.to(x.dtype).view(*x.shape[:-1], rows)


@_fp8_mm.register_fake
def _fp8_mm_fake(x, codes, scales, rows, cols):
    return x.new_empty((*x.shape[:-1], rows))


def _fp8_mm_setup(ctx, inputs, output):
    x, codes, scales, rows, cols = inputs
    ctx.save_for_backward(codes, scales)
    ctx.meta = (rows, cols)


def _fp8_mm_backward(ctx, grad):
    codes, scales = ctx.saved_tensors
    rows, cols = ctx.meta
    return _quant_mm(grad, codes, scales, rows, cols, "fp8", True), None, None, None, None


_fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup)


def _quant_linear(x: Tensor, layer: "_QuantStore") -> Tensor:
    """x Wᵀ of a quantised layer, in the autocast dtype where autocast is on (as F.linear would be). fp8 on a GPU
    multiplies in fp8 (check_quant let it run only where the GPU can); elsewhere W is dequantised for the product."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    rows, cols = layer.qshape
    if layer.quant == "fp8" and x.is_cuda:
        return _fp8_mm(x.to(dt), layer.qweight, layer.qscale, rows, cols)
    return _quant_mm(x.to(dt), layer.qweight, layer.qscale, rows, cols, layer.quant, False)


class _QuantStore:
    """Storage of a quantised weight on a module: buffers ``qweight`` (codes) and ``qscale`` (the fp32
    scales viewed as int32, so that ``model.to(dtype)`` / ``.half()`` can never round them), both not
    persistent: the model's state_dict has no key for a quantised weight (nothing saves the base)."""

    quant: str
    qshape: tuple[int, int]

    def _store(self, w: Tensor, quant: str, device=None) -> None:
        src = w.detach()
        if device is not None:
            src = src.to(device)
        codes, scales = quantize_weight(src, quant)
        self.quant, self.qshape = quant, (int(w.shape[0]), int(w.shape[1]))
        self.register_buffer("qweight", codes, persistent=False)
        self.register_buffer("qscale", scales.view(torch.int32), persistent=False)

    def dequantised(self) -> Tensor:
        return dequantize_weight(self.qweight, self.qscale.view(torch.float32), self.qshape, self.quant)

    def quantised_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.qscale.numel() * 4


class _QuantAdapted(_QuantStore):
    """Mixed in front of an AdaptedLinear subclass (LoraLinear, DoraLinear, PissaLinear, BoneLinear, ...): the
    class of the module is swapped in place, so it stays an instance of its method's class."""

    def base_forward(self, x: Tensor) -> Tensor:
        return _quant_linear(x, self)

    def base_weight(self) -> Tensor:
        return self.dequantised()

    @property
    def weight(self) -> Tensor:
        """Read-only: the dequantised base weight (for code written against plain layers, e.g. a resume)."""
        return self.dequantised()

    def set_residual(self, w_res: Tensor) -> None:
        """PiSSA: the new frozen residual is quantised (from bf16, as at the start)."""
        self._store(w_res, self.quant, self.qweight.device)


class QuantLinear(_QuantStore, nn.Module):
    """A frozen bias-free linear layer with quantised weight (state tuning's att/ffn layers)."""

    def __init__(self, linear: nn.Linear, quant: str, device=None):
        nn.Module.__init__(self)
        if linear.bias is not None:
            raise ValueError("only bias-free linear layers are quantised (RWKV's have none)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, quant, device)

    @property
    def weight(self) -> Tensor:
        return self.dequantised()

    def forward(self, x: Tensor) -> Tensor:
        return _quant_linear(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"


_CLASSES: dict[type, type] = {}


def _quant_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quant{cls.__name__}", (_QuantAdapted, cls), {"__module__": __name__})
    return _CLASSES[cls]


@dataclass
class QuantReport:
    quant: str
    layers: int               # linear layers quantised
    weights: int              # base weights in them
    bf16_bytes: int           # what they take in bf16 (2 bytes each)
    quantised_bytes: int      # what they take now (codes + scales)

    def line(self) -> str:
        return (f"QUANT={self.quant}: {self.layers} linear layers, {self.weights / 1e6:.1f} M weights in "
                f"{self.quantised_bytes / 2**20:.1f} MiB instead of {self.bf16_bytes / 2**20:.1f} MiB (bf16)")


def is_quantised_key(key: str) -> bool:
    """Whether a state-dict key is the weight of a layer quantize_model quantises (``blocks.N.att.key.weight``)."""
    return key.endswith(".weight") and TARGET_RE.match(key[:-len(".weight")]) is not None


def quantize_model(model: nn.Module, quant: str, device=None) -> QuantReport | None:
    """Quantise, in place, the frozen base weight of every attention / FFN linear layer of ``model``.

    Call AFTER ``method.apply`` (LoRA/DiSHA adapters are built on the layer, PiSSA's SVD needs the real W)
    and before the optimizer is made. Adapted layers keep their class (a quantised subclass of it);
    plain layers (state tuning) become ``QuantLinear``. The bf16 weights are dropped (freed once nothing
    else holds them). ``device``: where the quantised storage goes (default: where each weight is), so a
    model on the CPU can be quantised straight into the GPU. Returns None for QUANT=none."""
    if quant in (None, "", "none"):
        return None
    if quant not in QUANTS:
        raise UserError(f"QUANT={quant!r} is not one of {NAMES}.", f"set QUANT to one of {NAMES}")
    found = {n: m for n, m in model.named_modules() if TARGET_RE.match(n)}
    if not found:
        raise ValueError("no attention / FFN linear layers found: is this an RWKV model from trainer.model?")
    for name, m in found.items():
        if isinstance(m, _QuantStore):
            raise ValueError(f"{name} is quantised already: quantize_model was called twice")
        w = m.weight
        if w.requires_grad:
            raise UserError(f"QUANT={quant}: {name}.weight is being trained, and a quantised weight cannot be "
                            "(full fine-tuning?).", "set QUANT=none, or use an adapter method")
    layers = weights = qbytes = 0
    for name, m in found.items():
        if isinstance(m, AdaptedLinear):
            w = m._parameters.pop("weight")
            m.__class__ = _quant_class(type(m))
            m._store(w, quant, device)
            m.base_changed()                 # what the method computed from W, from the quantised one (DoRA)
        elif isinstance(m, nn.Linear):
            w = m.weight
            q = QuantLinear(m, quant, device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
            m = q
        else:
            raise ValueError(f"{name} is a {type(m).__name__}, expected a linear layer")
        del w
        layers += 1
        weights += m.qshape[0] * m.qshape[1]
        qbytes += m.quantised_bytes()
    return QuantReport(quant, layers, weights, 2 * weights, qbytes)


def quantised_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of the quantised layers of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantStore)}


# ------------------------------------------------------------------------------------------ merge
_WEIGHT_RE = re.compile(r"^(?P<m>blocks\.\d+\.(att\.(receptance|key|value|output|gate)|ffn\.(key|value|receptance)))"
                        r"\.weight$")


def dequantised_base(sd: dict[str, Tensor], quant: str, adapter: dict[str, Tensor] | None = None
                     ) -> dict[str, Tensor]:
    """``sd`` (all of a base model's tensors, or any part such as one block) with every weight that training
    kept quantised replaced by dequantise(quantise(W)) in fp32, bit for bit the weights the forward used;
    every other tensor unchanged (the same objects). Pure torch: runs on the CPU, no bitsandbytes needed,
    computed where the tensors are.

    ``adapter``: the checkpoint's tensors, required (``{}`` when there are none); None is refused.
    PiSSA: training quantised the residual W − B0 A0, not W. From the run's ``adapter`` tensors: for every
    layer that has ``pissa_init_A`` / ``pissa_init_B`` the result is dequantise(quantise(W − B0 A0)) + B0 A0,
    so that PiSSA's own merge (W + B A − B0 A0) gives exactly the trained dequantise(quantise(W − B0 A0)) + B A.
    (B0 A0 is recomputed in fp32; the GPU at training time may have summed it in another order, which can
    move a residual by one bf16 step in rare places: bf16 noise.)"""
    if quant in (None, "", "none"):
        return sd
    if quant not in QUANTS:
        raise UserError(f"the checkpoint says QUANT={quant!r}, which this version does not know ({NAMES}).",
                        "merge with the version of the toolkit that trained it")
    if adapter is None:
        # Without the run's tensors a PiSSA layer would silently start from quantise(W): refuse instead.
        raise UserError(f"this checkpoint was trained with QUANT={quant}; its base cannot be rebuilt without the "
                        "checkpoint's tensors (PiSSA quantised the residual W - B0 A0, not W)",
                        "pass the checkpoint's tensors as `adapter` ({} when there are none)")
    out = dict(sd)
    for k, w in sd.items():
        match = _WEIGHT_RE.match(k)
        if not match or w.dim() != 2:
            continue
        m = match["m"]
        a0, b0 = adapter.get(m + ".pissa_init_A"), adapter.get(m + ".pissa_init_B")
        if a0 is not None and b0 is not None:
            ba = b0.to(w.device).float() @ a0.to(w.device).float()
            codes, scales = quantize_weight(w.float() - ba, quant)
            out[k] = dequantize_weight(codes, scales, tuple(w.shape), quant, use_bnb=False).float() + ba
        else:
            codes, scales = quantize_weight(w, quant)
            out[k] = dequantize_weight(codes, scales, tuple(w.shape), quant, use_bnb=False).float()
    return out
