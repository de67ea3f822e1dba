"""Element counts of a model with a fine-tuning method applied, by how the trainer stores them: what the memory
estimate (trainer/memory.py) and the benchmark's FLOPs (bench/train_speed.py) count. The layout comes from the
official checkpoint shapes (checkpoint.expected_shapes); what a method adds comes from the method itself
(Method.linear_counts, extra_trained, TRAINS_BASE).

    t = param_table(cfg, sizes)          # cfg: a TrainConfig; sizes: a ModelConfig
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

_TARGET_WEIGHT = re.compile(r"^(blocks\.\d+\.(att\.(receptance|key|value|output|gate)|ffn\.(key|value|receptance)))"
                            r"\.weight$")
_LOWRANK = {7: ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"),
            6: ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"), 5: ()}
_V7_LAYER0_UNUSED = ("v0", "v1", "v2")


@functools.lru_cache(maxsize=64)
def _shapes(sizes_key: tuple) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    """(key, shape, how many layers have it) of the official layout, from a 2-layer skeleton."""
    from .checkpoint import expected_shapes
    from .model import ModelConfig
    sizes = ModelConfig(*sizes_key)
    L = sizes.n_layer
    small = dataclasses.replace(sizes, n_layer=min(L, 2))
    return tuple((k, shape, L - 1 if k.startswith("blocks.1.") else 1) for k, shape in expected_shapes(small).items())


def _sizes_key(sizes: Any) -> tuple:
    return tuple(getattr(sizes, f.name) for f in dataclasses.fields(sizes))


@dataclass(frozen=True)
class ParamTable:
    """Element counts of a model with a method applied (what the trainer builds), by how they are stored."""
    total: int               # base model elements (official layout)
    trained: int             # elements trained, fp32: the method's tensors + TRAIN_PARTS (full: all)
    frozen: int              # base elements kept in the weight dtype
    quantised: int           # base elements stored quantised
    quantised_bytes: int     # their storage (codes + scales)
    buffers: int             # untrained elements a method keeps (PiSSA's initial A and B), weight dtype
    matmul: int              # base elements multiplied with every token (att/ffn linears, time-mix matrices, head)
    head_matmul: int         # the head's part of ``matmul``
    adapter_matmul: int      # adapter elements multiplied with every token
    adapter_step_flops: int  # FLOPs to rebuild every ΔW once per forward pass (Bat)
    trained_matmul: int      # trained elements that are matrix operands (their weight gradient is a product)
    adapted_layers: int      # att/ffn linear layers the method wraps, all layers
    largest_target: int      # elements of the largest att/ffn linear (what dequantisation materialises)
    block_targets: int       # elements of one block's att/ffn linears
    block_params: int        # elements of one block (ZeRO-3 gathers one at a time)
    block_trained_mm: int    # trained matrix elements of one block (autocast keeps a bf16 copy of each)
    head_trained: bool       # the head trains (TRAIN_PARTS head, or a method that trains the base)
    trained_base: int        # base elements among ``trained`` (TRAIN_PARTS; full: all but v7's unused three)
    trained_small: int = 0   # trained elements in tensors of fewer than BNB_MIN_8BIT (adamw8bit keeps fp32 states)
    block_streamed: int = 0  # frozen elements of one block that OFFLOAD_BLOCKS streams (offload.STREAM_MIN_NUMEL)
    block_saved: int = 0     # elements per token one block's adapted linears keep for backward beyond the method's
                             # ACT_FAMILY row (LinearCounts.saved: DoRA's unscaled outputs)


def _quantised_bytes(quant: str, shape: tuple[int, ...]) -> int:
    """Storage of one quantised [out, in] weight: nf4 32 code bytes + 4 scale bytes per 64 weights; int8 one byte
    per weight + 4 per row."""
    from .quant import NF4_BLOCK
    n = math.prod(shape)
    if quant == "nf4":
        blocks = -(-n // NF4_BLOCK)
        return blocks * NF4_BLOCK // 2 + blocks * 4
    return n + 4 * shape[0]


def param_table(cfg: Any, sizes: Any, method: Any = None) -> ParamTable:
    """Count what the trainer's ``prepare`` would hold for ``cfg`` on a model of ``sizes`` (``method``: cfg's
    fine-tuning method, built from its settings when not given)."""
    from .deepembed import is_deep_embed
    from .offload import STREAM_MIN_NUMEL
    from .peft import get_method
    from .peft.base import part_names
    from .strategy import BNB_MIN_8BIT
    from .tables import is_table
    if method is None:
        cls = get_method(cfg.FINETUNE_MODE)
        method = cls(cls.settings_from(cfg))
    quant = cfg.QUANT
    shapes = _shapes(_sizes_key(sizes))
    part_set = set(part_names([k for k, _, _ in shapes], tuple(cfg.TRAIN_PARTS)))
    lowrank = _LOWRANK[sizes.version]
    c = dict.fromkeys(("total", "trained", "frozen", "quantised", "qbytes", "buffers", "matmul", "head", "adapter_mm",
                       "adapter_step", "trained_mm", "adapted", "largest", "block_t", "block_p", "block_tmm",
                       "trained_base", "small", "streamed", "block_saved"), 0)
    head_trained = False
    for key, shape, mult in shapes:
        n = math.prod(shape)
        c["total"] += n * mult
        parts_ = key.split(".")
        unused = sizes.version == 7 and key.startswith("blocks.0.att.") and parts_[-1] in _V7_LAYER0_UNUSED
        is_target = bool(_TARGET_WEIGHT.match(key))
        is_mm = is_target or key == "head.weight" or (
            key.startswith("blocks.") and parts_[2] == "att" and parts_[-1] in lowrank and not unused)
        in_block = key.startswith("blocks.1.") or (sizes.n_layer == 1 and key.startswith("blocks.0."))
        if in_block:
            c["block_p"] += n
            c["block_t"] += n if is_target else 0
        if is_mm:
            c["matmul"] += n * mult
            c["head"] += n if key == "head.weight" else 0
        if is_target:
            c["largest"] = max(c["largest"], n)
        if ((method.TRAINS_BASE and not is_deep_embed(key)) or key in part_set) and not unused:
            c["trained"] += n * mult
            c["trained_base"] += n * mult
            c["small"] += n * mult if n < BNB_MIN_8BIT else 0
            if is_mm:
                c["trained_mm"] += n * mult
                c["block_tmm"] += n if in_block else 0
                head_trained = head_trained or key == "head.weight"
        elif is_target and quant != "none":
            c["quantised"] += n * mult
            c["qbytes"] += _quantised_bytes(quant, shape) * mult
        else:
            c["frozen"] += n * mult
            c["streamed"] += n if in_block and n >= STREAM_MIN_NUMEL and not is_table(key) else 0
        own = method.linear_counts(*shape) if is_target else None
        if own is not None:
            c["adapted"] += mult
            c["trained"] += own.trained * mult
            c["small"] += sum(p for p in own.pieces if p < BNB_MIN_8BIT) * mult
            c["trained_mm"] += own.trained * mult
            c["block_tmm"] += own.trained if in_block else 0
            c["adapter_mm"] += own.matmul * mult
            c["buffers"] += own.buffers * mult
            c["adapter_step"] += own.rebuild_flops * mult
            c["block_saved"] += own.saved if in_block else 0
    for n in method.extra_trained(sizes):
        c["trained"] += n
        c["small"] += n if n < BNB_MIN_8BIT else 0
    return ParamTable(c["total"], c["trained"], c["frozen"], c["quantised"], c["qbytes"], c["buffers"], c["matmul"],
                      c["head"], c["adapter_mm"], c["adapter_step"], c["trained_mm"], c["adapted"], c["largest"],
                      c["block_t"], c["block_p"], c["block_tmm"], head_trained, c["trained_base"], c["small"],
                      c["streamed"], c["block_saved"])
