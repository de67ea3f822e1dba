"""Frozen lookup tables kept in CPU memory on a one-GPU run: the embedding (``emb.weight``) and RWKV-7a's DeepEmbed
tables (``blocks.N.ffn.s_emb.weight``, trainer/deepembed.py). A forward pass needs only its B·T tokens' rows, so
those are gathered on the CPU into a page-locked buffer and copied to the GPU without waiting, instead of the whole
V x D table taking GPU memory (a 1.5B model: the embedding 0.25 GiB; a 1.5B 7a model's s_emb tables 3 GiB).
plan.embedding_on_cpu and plan.deep_embed_on_cpu decide; the loader leaves these keys in the file (loop._build).

    is_table(name)                         whether a parameter's name is a DeepEmbed table
    keeps(key, emb, deep_embed)            whether the plan keeps that state-dict key in CPU memory
    hold_tables(model, emb, deep_embed)    those tables of a built model into (page-locked) CPU memory
    lookup(w, idx, device)                 rows idx of a table w on ``device``, wherever w is
    to_device(module, device)              every parameter and buffer to ``device`` but the held tables
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HELD = "stays_on_cpu"          # set on a held table's Parameter: every move (to_device) leaves it


def is_table(name: str) -> bool:
    """Whether a name (of the model's or of a block's parameters) is a DeepEmbed table s_emb: looked up row by row
    before its block runs, never streamed with the block (offload), kept in CPU memory where frozen on one GPU."""
    return name.endswith("ffn.s_emb.weight")


def keeps(key: str, emb: bool, deep_embed: bool) -> bool:
    """Whether the plan keeps the state-dict tensor ``key`` in CPU memory (the embedding where ``emb``, the
    DeepEmbed tables where ``deep_embed``)."""
    return (emb and key == "emb.weight") or (deep_embed and is_table(key))


def hold_on_cpu(table: nn.Embedding, dtype: torch.dtype | None = None) -> None:
    """Move the frozen ``table``'s weight into CPU memory (in ``dtype``), page-locked where CUDA exists so that
    lookup's copies do not wait; marked so that to_device leaves it there."""
    w = table.weight
    if w.requires_grad:
        raise ValueError("only a frozen table can stay on the CPU")
    cpu = w.detach().to("cpu", dtype=dtype or w.dtype)
    if torch.cuda.is_available():
        try:
            cpu = cpu.pin_memory()
        except RuntimeError:          # no page-locked memory to be had (some WSL2 set-ups): copies wait
            pass
    table.weight = nn.Parameter(cpu, requires_grad=False)
    setattr(table.weight, _HELD, True)


def hold_tables(model: nn.Module, emb: bool, deep_embed: bool, dtype: torch.dtype | None = None) -> list[str]:
    """hold_on_cpu every table of ``model`` that ``keeps`` names; their keys."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and keeps(f"{n}.weight", emb,
                                                                                          deep_embed)]
    for name in names:
        hold_on_cpu(model.get_submodule(name), dtype)
    return [f"{n}.weight" for n in names]


def held(t: Tensor) -> bool:
    """Whether ``t`` is a table hold_on_cpu keeps in CPU memory."""
    return getattr(t, _HELD, False)


def to_device(module: nn.Module, device) -> None:
    """Every parameter and buffer of ``module`` to ``device``, but the held tables: module.to's own walk (_apply:
    a Parameter stays the same object where it can), given each held table back unmoved."""
    module._apply(lambda t: t if held(t) else t.to(device))


def _elsewhere(w: Tensor, device: torch.device) -> bool:
    """Whether lookup must gather the rows where the table is (a test forces it on a CPU-only machine)."""
    return w.device != device


def lookup(w: Tensor, idx: Tensor, device=None) -> Tensor:
    """The rows ``idx`` [B,T] of the table ``w`` [V,D]: [B,T,D] on ``device`` (default: idx's), with gradient where
    w has one. A table on another device is looked up where it is; a frozen one in CPU memory into a page-locked
    buffer (where w is page-locked) that is copied without waiting: B·T rows cross, not the table. idx on w's
    device saves copying the ids for each table (a forward pass's DeepEmbed tables share them)."""
    device = idx.device if device is None else torch.device(device)
    if not _elsewhere(w, device):
        return F.embedding(idx.to(device), w)
    ids = idx.to(w.device)
    if w.requires_grad or w.device.type != "cpu":      # a trained table (index_select's out= has no gradient), or
        return F.embedding(ids, w).to(device)          # one on another GPU
    ids = ids.flatten()
    out = torch.empty(ids.numel(), w.shape[1], dtype=w.dtype, pin_memory=w.is_pinned())
    torch.index_select(w, 0, ids, out=out)
    return out.view(*idx.shape, w.shape[1]).to(device, non_blocking=True)
