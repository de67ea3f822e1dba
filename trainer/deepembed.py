"""RWKV-7a "DeepEmbed": every FFN (channel mix) block's key is gated by a per-token embedded matrix.

The file keeps an RWKV-7 layout plus five tensors in each block's FFN (r = ModelConfig.deep_embed, 32 in the
released models; C the width, F the FFN's, V the vocabulary):

    blocks.N.ffn.s_emb.weight    [V, r*r]   a table: one r x r matrix per token
    blocks.N.ffn.s_emb_x.weight  [r*r, C]   the part of that matrix that follows the token's embedding
    blocks.N.ffn.s1              [C, r]
    blocks.N.ffn.s2              [r, F]
    blocks.N.ffn.s0              [1, 1, F]

For the token t at a position, with x the FFN's input (after ln2) and e = ln0(emb[t]) (the embedding as block 0
sees it):

    S    = (s_emb[t] + s_emb_x e).view(r, r)
    gate = ((x s1) S) s2 + s0                      [F]
    out  = value(relu(key(x_k-mixed x))^2 * gate)

(the ``rwkv`` package, with RWKV_DE_VERSION=1, folds ``ln0(emb) @ s_emb_x.T`` into s_emb when it loads the file;
we keep the two as stored, so that merge writes the released layout). ``deep_embed_inputs`` gives a forward pass's
tokens and e; ``deep_rows`` looks each block's s_emb rows up before the block runs (outside its compiled graph and
its checkpoint: a frozen table can then stay in CPU memory, trainer/tables.py) and hands them to the FFN with e. The
attention is plain RWKV-7, so state, infctx and the WKV kernels are unchanged.

The tensors are frozen unless TRAIN_PARTS has ``deepembed`` (``DEEPEMBED_RE``): s_emb alone is V·r² numbers a
layer (65536 x 1024 = 67M: a 0.1B 7a model has 0.8B of them).

RWKV-7b (DeepEmbedAttention: ``blocks.N.qkv.*``) keeps a cache that grows with the text; it is refused
(checkpoint.detect_config).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .tables import held, lookup

DEEPEMBED_KEYS = ("s_emb.weight", "s_emb_x.weight", "s1", "s2", "s0")     # in each blocks.N.ffn.
DEEPEMBED_RE = re.compile(r"^blocks\.\d+\.ffn\.(s_emb\.weight|s_emb_x\.weight|s[012])$")


def is_deep_embed(name: str) -> bool:
    """Whether a state-dict name is one of the DeepEmbed tensors."""
    return DEEPEMBED_RE.match(name) is not None


def add_deep_embed(ffn: nn.Module, cfg) -> None:
    """Give an RWKV-7 FFN module the DeepEmbed tensors of ``cfg`` (ModelConfig with deep_embed = r), set so that
    the gate is exactly 1 (the plain FFN) until a checkpoint's values are loaded."""
    r, C, F, V = cfg.deep_embed, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    ffn.s_emb = nn.Embedding(V, r * r, _weight=torch.zeros(V, r * r))
    ffn.s_emb_x = nn.Linear(C, r * r, bias=False)
    ffn.s1 = nn.Parameter(torch.zeros(C, r))
    ffn.s2 = nn.Parameter(torch.zeros(r, F))
    ffn.s0 = nn.Parameter(torch.ones(1, 1, F))
    with torch.no_grad():
        ffn.s_emb_x.weight.zero_()


PACKAGE_RANK = 32      # the only DeepEmbed rank the rwkv package runs (its RWKV_DE_VERSION=1 code assumes it)


def random_deep_embed_(model: nn.Module, seed: int = 0, spread: float = 0.2) -> None:
    """Draw every FFN's DeepEmbed tensors of a new 7a model so that its gate is near 1 and differs by token and
    position (about 1 +- ``spread``), as in a trained model, instead of exactly 1 (add_deep_embed): on zeros
    TRAIN_PARTS=deepembed gets no gradient. A generator of its own, so the rest of the model is unchanged."""
    g = torch.Generator().manual_seed(7000 + seed)
    with torch.no_grad():
        for blk in model.blocks:
            f = blk.ffn
            r, C = f.s1.shape[1], f.s1.shape[0]
            f.s1.copy_(torch.randn(f.s1.shape, generator=g) / C ** 0.5)          # x s1: entries about 1
            f.s_emb.weight.copy_(torch.randn(f.s_emb.weight.shape, generator=g) * spread / r ** 0.5)
            f.s_emb_x.weight.copy_(torch.randn(f.s_emb_x.weight.shape, generator=g) * spread / (r * C) ** 0.5)
            f.s2.copy_(torch.randn(f.s2.shape, generator=g) / r ** 0.5)
            f.s0.copy_(1 + spread / 2 * torch.randn(f.s0.shape, generator=g))


def rank_note(rank: int, where: str) -> str | None:
    """One line for a 7a file whose DeepEmbed rank the rwkv package cannot run (we run any); None otherwise."""
    if not rank or rank == PACKAGE_RANK:
        return None
    return (f"{where} is an RWKV-7a model with DeepEmbed rank {rank}: this toolkit runs it, but the rwkv "
            f"package (RWKV_DE_VERSION=1) runs rank {PACKAGE_RANK} only, so it cannot run this model or what is "
            "merged from it")


def deep_embed_inputs(model: nn.Module, idx: Tensor, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """What deep_rows needs for every block of a 7a model: the token ids [B,T] on the s_emb tables' device (copied
    there once per forward pass, not once per table) and their embedding after ln0 [B,T,C] in the residual
    stream's dtype. None for a model without DeepEmbed."""
    if not getattr(model.cfg, "deep_embed", 0):
        return None
    return idx.to(model.blocks[0].ffn.s_emb.weight.device), model.blocks[0].ln0(x).to(x.dtype)


def deep_rows(ffn: nn.Module, de: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """What a block's FFN gets from deep_embed_inputs' ``de``: where its s_emb table is held in CPU memory, the rows
    of the tokens [B,T,r*r] looked up there (before the block: outside its graph and checkpoint) and e; else the
    token ids themselves and e, the block looking its rows up (a checkpointed block then keeps B·T ids, not B·T·r²
    rows, and recomputes the lookup)."""
    ids, e0 = de
    return (lookup(ffn.s_emb.weight, ids, e0.device) if held(ffn.s_emb.weight) else ids), e0


def deep_mix(ffn: nn.Module, x: Tensor, de: tuple[Tensor, Tensor]) -> Tensor:
    """(x s1) S for every token: [B,T,C] -> [B,T,r] (see the module doc); ``de``: deep_rows' (rows or ids, e)."""
    rows, e0 = de
    if not rows.is_floating_point():                            # the ids: the table is where the block runs
        rows = lookup(ffn.s_emb.weight, rows, e0.device)
    r = ffn.s1.shape[1]
    S = rows + ffn.s_emb_x(e0)
    xs = (x @ ffn.s1).unsqueeze(-2)                              # [B,T,1,r]
    return (xs @ S.view(*S.shape[:-1], r, r).to(xs.dtype)).squeeze(-2)


def deep_gate(ffn: nn.Module, s: Tensor) -> Tensor:
    """The FFN key's gate from deep_mix's output (any leading shape): [..., r] -> [..., F]."""
    return s @ ffn.s2 + ffn.s0.view(-1)
