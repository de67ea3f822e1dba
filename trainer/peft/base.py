"""What every fine-tuning method shares: the interface, the adapted linear layer, TRAIN_PARTS.

A method (one file each: lora, dora, pissa, disha, state, full) subclasses ``Method`` and is used by the
trainer, the checkpoint code and merge only through this interface:

    method = get_method("lora")({"r": 64, "alpha": 128, "dropout": 0.0})
    method.apply(model, train_parts=("time", "ln"))   # wrap in place, freeze, mark what trains
    method.trainable_names(model)                       # exact state-dict names of the trained tensors
    sd = method.adapter_state_dict(model)               # what output/rwkv-N.pth holds
    method.load_adapter(model, sd)                      # after apply(): put a saved adapter back
    method.metadata()                                   # the settings, JSON-able, stored with sd
    Method.merge(base_sd, sd, settings)                 # pure tensor maths -> full official layout

Names are always relative to the model given to ``apply`` (an ``RWKV`` from ``trainer/model.py``),
whose state-dict keys are the official checkpoint layout.

The targeted linear layers are attention receptance, key, value, output, gate and FFN key, value,
receptance (those that exist in the model's version). Each is replaced by an ``AdaptedLinear`` that keeps
the frozen base weight as its parameter ``weight`` (so ``blocks.0.att.key.weight`` stays the state-dict
key) and computes the base product only in ``base_forward``. A quantised base (``trainer/quant.py``)
overrides exactly two methods: ``base_forward(x)`` and ``base_weight()`` (the dequantised weight, used
by Bat and by anything that needs W itself), and calls ``base_changed()`` once its storage replaced W (DoRA
keeps the rows' squared norms of W and takes them again from the dequantised weight there).

TRAIN_PARTS adds, by name rule (so every RWKV version is covered without lists per version):
  emb   emb.weight
  head  head.weight
  time  every parameter directly on an att / ffn module (time_*, x_*, w0/w1/w2, a*, v*, g1/g2, k_k,
        k_a, r_k, ...): names ``blocks.N.att.X`` / ``blocks.N.ffn.X`` with no further dot, i.e. not a
        Linear weight and not a norm; the method's own tensors (time_state) are excluded
  ln    every norm weight and bias: ln0, ln1, ln2, ln_out and att.ln_x (``...lnSOMETHING.weight|bias``)
  deepembed  RWKV-7a's DeepEmbed tensors (ffn.s_emb, s_emb_x, s0, s1, s2: trainer/deepembed.py); not in ``time``,
        and frozen even under full fine-tuning unless named (s_emb alone is vocabulary x r² numbers a layer)
Those tensors are saved in the adapter and merge puts them in place of the base's.

Whether a method can learn on a given base (``check_base``, called by loop.prepare): a block's attention
reaches the residual stream only through ``att.output``, its FFN only through ``ffn.value``. A freshly
initialised RWKV (RWKV-LM's scheme, model.init_weights_) has both at zero, so every block starts as the
identity. Where such a zero projection stays zero for the whole run (``ZERO_STAYS_ZERO``: state tuning,
which trains no weight; PiSSA, whose adapter of a zero weight is zero and a saddle point), every tensor
whose only way to the loss runs through it gets an exactly zero gradient at every step (``dead_tensors``).
LoRA, Bone, Bat and full fine-tuning move a zero projection from the first step, so nothing is dead there.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import PARTS
from ..deepembed import DEEPEMBED_RE
from ..errors import UserError


# Module names (relative to the model) of the linear layers that LoRA / PiSSA / DiSHA adapt.
TARGET_RE = re.compile(r"^blocks\.\d+\.(att\.(receptance|key|value|output|gate)|ffn\.(key|value|receptance))$")

_PART_RULES = {
    "emb": re.compile(r"^emb\.weight$"),
    "head": re.compile(r"^head\.weight$"),
    "time": re.compile(r"^blocks\.\d+\.(att|ffn)\.(?!s[012]$)[^.]+$"),
    "ln": re.compile(r"(^|\.)ln[^.]*\.(weight|bias)$"),
    "deepembed": DEEPEMBED_RE,
}


# RWKV-7: layer 0's value is v_first, which every later layer's attention mixes into its own value, so these
# tensors of layer 0 reach the loss through every layer's att.output, not only through layer 0's.
_V_FIRST_RE = re.compile(r"^blocks\.0\.(ln1\.|att\.value\.|att\.x_v$)")
# A trained tensor's side of a block: its attention (and ln1, the attention's input norm) or its FFN (and ln2).
_SIDE_RE = re.compile(r"^blocks\.(\d+)\.(att|ffn|ln1|ln2)\.")
EXITS = {"att": "att.output.weight", "ffn": "ffn.value.weight"}      # where each side joins the residual


def all_zero(t: Tensor) -> bool:
    """Whether ``t`` is exactly zero everywhere; a few values are read first, so a trained weight (memory-
    mapped from its file) costs next to nothing."""
    flat = t.reshape(-1)
    return not bool(flat[:4096].any()) and not bool(flat.any())


def zero_weights(sd: Mapping[str, Tensor]) -> set[str]:
    """The adapted linear weights (``blocks.N.att.output.weight``, ...) of a state dict that are all zero."""
    return {k for k, v in sd.items() if k.endswith(".weight") and TARGET_RE.match(k[: -len(".weight")])
            and all_zero(v)}


def dead_names(names: Iterable[str], zero: set[str], version: int, n_layer: int,
               adapters: Iterable[str] = ()) -> list[str]:
    """Among the trained ``names``, those that get an exactly zero gradient at every step when the base
    linear weights ``zero`` are zero and stay zero (a method with ZERO_STAYS_ZERO): the tensors of a block's
    attention (and its ln1) when that layer's att.output is zero, except that RWKV-7's layer-0 tensors that
    make v_first (ln1, the value projection's, x_v) die only when every layer's att.output is zero; the
    tensors of a block's FFN (and its ln2) when that layer's ffn.value is zero; and ``adapters`` (the
    method's own tensors beside a linear weight: ``M.lora_A`` of ``M.weight``) of a zero weight, which start
    at zero and are a saddle point. The embedding, the head, ln0 and ln_out always learn."""
    silent = {side: {int(k.split(".")[1]) for k in zero if k.endswith("." + exit_)} for side, exit_ in EXITS.items()}
    every_att = silent["att"] >= set(range(n_layer))
    own = set(adapters)
    dead = []
    for n in names:
        m = _SIDE_RE.match(n)
        if n in own and n.rsplit(".", 1)[0] + ".weight" in zero:
            dead.append(n)
        elif m is not None:
            layer, side = int(m.group(1)), "att" if m.group(2) in ("att", "ln1") else "ffn"
            v_first = version == 7 and side == "att" and _V_FIRST_RE.match(n) is not None
            if layer in silent[side] and (every_att or not v_first):
                dead.append(n)
    return dead


def check_parts(train_parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(train_parts or ())
    for p in parts:
        if p not in PARTS:
            raise UserError(f"TRAIN_PARTS has {p!r}, which is not one of: {' '.join(PARTS)}.",
                            'write e.g. TRAIN_PARTS="time ln", or leave it empty')
    return parts


def part_names(names: Iterable[str], train_parts: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The names among ``names`` that the TRAIN_PARTS select (in the order of ``names``)."""
    rules = [_PART_RULES[p] for p in check_parts(train_parts)]
    excluded = set(exclude)
    return [n for n in names if n not in excluded and any(r.search(n) for r in rules)]


def part_of(name: str) -> str | None:
    """The TRAIN_PARTS part a state-dict name belongs to (emb, head, time, ln, deepembed), or None (a linear weight, a method's
    own tensor: classify those first)."""
    return next((p for p in PARTS if _PART_RULES[p].search(name)), None)


class AdaptedLinear(nn.Module):
    """A bias-free ``nn.Linear`` with a frozen base weight plus a method's trainable update.

    ``forward(x) = base_forward(x) + delta_forward(x)``. Subclasses define ``delta_forward`` and the
    update in weight space, ``delta_weight(...)``, which merge uses too.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("adapted linear layers must have no bias (RWKV's have none)")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight                  # the same Parameter: same key, device, dtype
        self.weight.requires_grad_(False)

    # The two methods a quantised base overrides.
    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def base_weight(self) -> Tensor:
        """The base weight as a float tensor [out, in] (dequantised where stored quantised)."""
        return self.weight

    def base_changed(self) -> None:
        """The base weight's storage was replaced (quantize_model): refresh what was computed from W."""

    def delta_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.base_forward(x) + self.delta_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """name -> module of the linear layers the adapter methods wrap, in model order."""
    found = {name: m for name, m in model.named_modules() if TARGET_RE.match(name)}
    if not found:
        raise ValueError("no attention / FFN linear layers found: is this an RWKV model from trainer.model?")
    for name, m in found.items():
        if isinstance(m, AdaptedLinear):
            raise ValueError(f"{name} is already adapted: apply() was called twice on this model")
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{name} is a {type(m).__name__}, expected nn.Linear")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def shape_error(key: str, got: tuple, want: tuple) -> UserError:
    return UserError(f"the adapter's {key} has shape {list(got)} but the base model's is {list(want)}: "
                     "the adapter was trained on a different model size.",
                     "merge with the base model the adapter was trained on")


@dataclass(frozen=True)
class LinearCounts:
    """What a method adds to one adapted linear, in elements (trainer/counts.py sums them)."""
    trained: int                    # its trained elements
    pieces: tuple[int, ...]         # the sizes of its trained tensors (adamw8bit keeps small ones in fp32)
    matmul: int                     # elements multiplied with every token
    buffers: int = 0                # untrained elements it keeps (PiSSA's initial A and B)
    rebuild_flops: int = 0          # FLOPs to rebuild its ΔW once per forward pass (Bat; DoRA's row norms)
    saved: int = 0                  # elements per token it keeps for the backward pass beyond its ACT_FAMILY's
                                    # row (DoRA: its unscaled output, which the magnitude's gradient needs)


class Method:
    """One fine-tuning method. Subclasses set ``name`` and override the hooks marked below."""

    name: str = ""
    TITLE: str = ""          # the method in words ("LoRA", "full fine-tuning")
    NOTE: str = ""           # a line the run prints before training (MiSS: that it is Bone under a new name)
    SCALED_BY_ALPHA = False  # its update is scaled by LORA_ALPHA, so LORA_SCALING applies (LoRA, DoRA)
    # Suffixes of the method's own tensors, e.g. ("lora_A", "lora_B"): "blocks.0.att.key.lora_A".
    SUFFIXES: tuple[str, ...] = ()
    # Suffixes of untrained tensors the adapter file holds too (PiSSA's initial A and B).
    EXTRA_SUFFIXES: tuple[str, ...] = ()
    # The settings its trained tensors depend on (their shapes, or the function they compute), each with its
    # training.sh variable: INIT_ADAPTER goes on from an adapter only under the same values.
    FIXED_SETTINGS: dict[str, str] = {}

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})
        self.train_parts: tuple[str, ...] = ()

    @classmethod
    def settings_from(cls, cfg) -> dict:
        """The method's settings from a TrainConfig (its own variables: LORA_R, PISSA_R, ...)."""
        return {}

    # ---- what the run's plan and the memory estimate need to know (trainer/plan.py, memory.py) ---------
    # Which row of memory.ACT (the activations a block keeps per token) the method's blocks follow:
    # frozen (nothing adapted) | low_rank (x·A·B beside each linear) | block (a blockwise update added) |
    # block_rebuilt (ΔW rebuilt from the weight every step) | full (every weight trains)
    ACT_FAMILY = "frozen"
    TRAINS_BASE = False          # every base weight trains (full fine-tuning)
    NEEDS_BASE_ON_GPU = ""       # what of its set-up needs the base weights on the GPU in bf16 ("PiSSA's SVD"):
                                 # quantised weights are then not streamed from the file one at a time
    KEPT_PER_ADAPTED = 0.0       # bytes a block keeps per adapted weight beside ACT (Bat: W's blocks and ΔW)
    REBUILD_WORK = 0.0           # bytes per weight of the largest adapted layer while its ΔW is rebuilt (Bat)
    LEANER = None                # a method that trains far fewer numbers, offered when memory runs short

    def linear_counts(self, out_f: int, in_f: int) -> "LinearCounts | None":
        """What the method adds to one adapted [out_f, in_f] linear (None: it adapts no linear)."""
        return None

    def extra_trained(self, sizes) -> list[int]:
        """Sizes (elements) of trained tensors the method adds outside the linears (state tuning's states)."""
        return []

    def act_per_linear(self) -> float:
        """Bytes per token each adapted linear keeps beyond its ACT_FAMILY's row (LoRA at a rank other than 64)."""
        return 0.0

    def random_in_forward(self) -> bool:
        """Whether its forward pass draws random numbers (LoRA's dropout): not replayed as CUDA graphs."""
        return False

    # ---- helpers for settings ------------------------------------------------------------------
    def _int(self, key: str, var: str, minimum: int = 1, default: int | None = None) -> int:
        value = self.settings.get(key, default)
        if value is None:
            raise UserError(f"{self.name} needs {var} (setting {key!r}).", f"set {var} in training.sh")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not value.is_integer()) or value < minimum):
            raise UserError(f"{var}={value!r} must be a whole number of at least {minimum}.",
                            f"set {var} to e.g. 64" if minimum >= 1 else f"set {var} to e.g. 4")
        return int(value)

    def _number(self, key: str, var: str, default: float | None = None) -> float:
        """A setting that must be a finite number (a bool, a string, NaN or infinity is refused)."""
        value = self.settings.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{var}={value!r} must be a number.", f"set {var} in training.sh")
        return float(value)

    # ---- the interface -------------------------------------------------------------------------
    def apply(self, model: nn.Module, train_parts: Iterable[str] = ()) -> None:
        """Wrap in place, freeze everything, then make the method's tensors and the parts trainable."""
        self.train_parts = check_parts(train_parts)
        for p in model.parameters():
            p.requires_grad_(False)
        self._wrap(model)
        names = set(self.trainable_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)

    def trainable_names(self, model: nn.Module) -> list[str]:
        params = [n for n, _ in model.named_parameters()]
        own = [n for n in params if self._is_own(n)]
        return own + part_names(params, self.train_parts, exclude=own)

    def adapter_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The trained tensors (+ what merge needs), detached, sharing storage with the model."""
        params = dict(model.named_parameters())
        sd = {n: params[n].detach() for n in self.trainable_names(model)}
        sd.update(self._extra_state(model))
        return sd

    def load_adapter(self, model: nn.Module, sd: dict[str, Tensor]) -> None:
        """After ``apply``: copy a saved adapter into the model (resume, evaluation)."""
        expected = self.adapter_state_dict(model)
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            detail = []
            if missing:
                detail.append(f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
            if unexpected:
                detail.append(f"unexpected {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''}")
            raise UserError(f"the adapter does not fit this {self.name} set-up ({'; '.join(detail)}).",
                            "use the same FINETUNE_MODE, its settings and TRAIN_PARTS as the run that saved it")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise shape_error(k, tuple(v.shape), tuple(expected[k].shape))
        with torch.no_grad():
            self._before_load(model, sd)
            for k, v in sd.items():
                expected[k].copy_(v)

    def metadata(self) -> dict:
        return dict(self.settings)

    # ---- can it learn on this base? (see the module docstring) -----------------------------------
    # Whether a base linear weight that is zero stays zero through training, whatever the data. Methods
    # that train the weight, or an update of it that moves from zero at the first step, leave it False.
    ZERO_STAYS_ZERO = False
    # Why the method's own tensors get no gradient behind a zero projection, in words (ZERO_STAYS_ZERO).
    WHY_NO_GRADIENT = ""

    def dead_tensors(self, model: nn.Module, zero: set[str]) -> list[str]:
        """After ``apply``: the trained tensors of ``model`` (those that require a gradient) that get an exactly
        zero gradient at every step, on a base whose zero adapted linear weights are ``zero`` (``zero_weights``
        of the base's file). Exact where the zero weights are att.output and ffn.value (a fresh model's; its
        RWKV-5/6 ffn.receptance zeros sit behind a zero ffn.value); another zero weight inside a block (a key,
        an ffn.receptance alone) cuts more paths than this names, so the list is then a part of the dead
        tensors, never more than them."""
        if not self.ZERO_STAYS_ZERO or not zero:
            return []
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dead_names(names, zero, model.cfg.version, model.cfg.n_layer, [n for n in names if self._is_own(n)])

    def check_base(self, model: nn.Module, zero: set[str], base_name: str) -> list[str]:
        """After ``apply``: refuse (UserError) a base on which none of the method's own tensors can learn,
        since the run would end as it started; return warning lines where only some trained tensors cannot."""
        dead = self.dead_tensors(model, zero)
        if not dead:
            return []
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        own = [n for n in names if self._is_own(n)]
        n_layer = model.cfg.n_layer
        exits = []
        for exit_ in EXITS.values():
            layers = sorted(int(k.split(".")[1]) for k in zero if k.endswith("." + exit_))
            if layers:
                where = "every layer" if len(layers) == n_layer else \
                    f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
                exits.append(f"{exit_} is zero in {where}")
        zeros = "; ".join(exits) or f"{len(zero)} adapted weights are zero"
        untrained = all(f"blocks.{i}.{e}" in zero for i in range(n_layer) for e in EXITS.values())
        if own and set(own) <= set(dead):
            alive = [n for n in names if n not in dead]
            outcome = (f"only TRAIN_PARTS' {len(alive)} tensors would learn ({', '.join(alive[:3])}"
                       f"{' …' if len(alive) > 3 else ''}), the method's own would stay as they start"
                       if alive else "the loss would not move")
            raise UserError(f"FINETUNE_MODE={self.name} cannot learn on {base_name}: {zeros}"
                            f"{' (an untrained, freshly initialised model)' if untrained else ''}, and "
                            f"{self.WHY_NO_GRADIENT}: what it trains gets an exactly zero gradient at every "
                            f"step, so {outcome}.",
                            "fine-tune a trained base model (a released RWKV .pth), or use FINETUNE_MODE=lora "
                            "(or bone, bat, full), which learn on this one")
        return [f"warning: {len(dead)} of the {len(names)} tensors FINETUNE_MODE={self.name} trains get an exactly "
                f"zero gradient at every step on {base_name} ({zeros}): {', '.join(dead[:4])}"
                f"{' …' if len(dead) > 4 else ''} will stay as they start"]

    @staticmethod
    def merge(base_sd: dict, adapter_sd: dict, settings: dict) -> dict:
        raise NotImplementedError

    # ---- hooks for subclasses --------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> None:
        """Add the method's modules / tensors to the model (parameters arrive frozen or not; apply sets it)."""

    def _is_own(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1] in self.SUFFIXES

    def _extra_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Untrained tensors that merge needs (PiSSA's initial A and B)."""
        return {}

    def _before_load(self, model: nn.Module, sd: dict[str, Tensor]) -> None:
        """Runs under no_grad before the tensors of ``sd`` are copied into the model."""


def merge_rest(base_sd: dict, adapter_sd: dict, handled: set[str]) -> dict:
    """Start of every merge: a new dict with the base tensors, where every adapter key not in ``handled``
    (TRAIN_PARTS tensors, a full fine-tune) replaces the base tensor of the same name and shape.

    Tensors not replaced are the base's own objects (shared, never modified)."""
    out = dict(base_sd)
    for k, v in adapter_sd.items():
        if k in handled:
            continue
        if k not in base_sd:
            raise UserError(f"the adapter has {k}, which the base model does not have: the adapter was "
                            "trained on another kind of model (RWKV version or layer count).",
                            "merge with the base model the adapter was trained on")
        if tuple(v.shape) != tuple(base_sd[k].shape):
            raise shape_error(k, tuple(v.shape), tuple(base_sd[k].shape))
        out[k] = v
    return out


def base_weight_of(base_sd: dict, module: str, suffix: str, adapter_sd: dict) -> Tensor:
    """The base's ``module.weight`` in fp32, with a clear error if the adapter does not fit it."""
    key = module + ".weight"
    if key not in base_sd:
        raise UserError(f"the adapter has {module}.{suffix} but the base model has no {key}: the adapter "
                        "was trained on another kind of model (RWKV version or layer count).",
                        "merge with the base model the adapter was trained on")
    return base_sd[key].float()


def need(adapter_sd: dict, key: str) -> Tensor:
    """``adapter_sd[key]`` in fp32, or a clear error if the checkpoint lacks it."""
    if key not in adapter_sd:
        raise UserError(f"the adapter checkpoint lacks {key}: it is incomplete or from another tool.",
                        "use an unmodified output/rwkv-N.pth written by training.sh")
    return adapter_sd[key].float()
