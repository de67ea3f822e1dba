"""RWKV-5.2 (x052), RWKV-6 (x060) and RWKV-7 (x070) in plain torch.nn.

The module tree *is* the official checkpoint layout: ``model.state_dict()`` has exactly the keys and
shapes of an RWKV-LM ``.pth`` (``emb.weight``, ``blocks.0.ln0.weight``, ``blocks.3.att.x_r``, ...), so
``model.load_state_dict(official_sd)`` just works and saving ``model.state_dict()`` gives a file the
``rwkv`` package loads. Versions differ only in the time-mix and channel-mix classes below.

    model = RWKV(cfg)                             # weights uninitialised: see init_weights_ / checkpoint/
    logits = model(idx)                           # idx [B,T] long -> [B,T,V]
    logits, state = model.forward_with_state(idx, state)

State: a list with one tuple per layer ``(att_shift [B,C], wkv [B,H,N,N], ffn_shift [B,C])``, all fp32;
``wkv`` is S[value, key] (the layout of ``time_state`` and of trainer.ops). Feeding a sequence in two
parts with the state carried gives the same logits as feeding it at once.

State tuning: give an att module a parameter ``time_state`` [H,N,N] (S[value, key]); it is then the
initial WKV state whenever no state is passed, expanded over the batch, with gradient.

Dtypes: the model computes in the dtype of its weights (fp32, bf16 or fp16), as RWKV-LM does; the norms
use torch's kernels, which accumulate in fp32. The decay is computed in fp32 and the WKV state is fp32
whatever the weights' dtype. The residual stream between blocks has the embedding's dtype, or
``model.act_dtype`` where set (training under bf16 autocast: bf16, RWKV-LM's training dtype).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .deepembed import add_deep_embed, deep_embed_inputs, deep_gate, deep_mix, deep_rows
from .head_loss import head_ce_sum
from .ops import is_traceable, wkv
from .tables import lookup

LN_X_EPS = 64e-5                    # GroupNorm eps of ln_x: 1e-5 * head_size_divisor(8) ** 2
EXP_MINUS_HALF = math.exp(-0.5)     # RWKV-7: decay = exp(-e^-0.5 * sigmoid(.)), in (0.545, 1)


@dataclass
class ModelConfig:
    """Every size of an RWKV model. Read from a checkpoint by checkpoint.detect_config, never typed."""
    version: int            # 5 (x052), 6 (x060) or 7 (x070)
    n_layer: int
    n_embd: int             # C
    vocab_size: int         # V
    head_size: int = 64     # N
    ffn_dim: int = 0        # F: rows of ffn.key.weight
    d_mix: int = 0          # v6: rank of time_maa_w1/w2 (per each of the 5 mixes)
    d_decay: int = 0        # v6: time_decay_w1/w2 rank; v7: w1/w2 rank
    d_aaa: int = 0          # v7: a1/a2 rank
    d_mv: int = 0           # v7: v1/v2 rank
    d_gate: int = 0         # v7: g1/g2 rank
    deep_embed: int = 0     # v7: RWKV-7a's DeepEmbed rank r (trainer/deepembed.py; 32), 0: none

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


State = list  # list[tuple[Tensor, Tensor, Tensor]], one (att_shift, wkv, ffn_shift) per layer


def _shift(x: Tensor, prev: Tensor) -> Tensor:
    """The previous token's input: [prev, x_0, ..., x_{T-2}] for x [B,T,C], prev [B,C]."""
    return torch.cat([prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


def _vec(C: int) -> Tensor:
    return torch.empty(1, 1, C)


# --------------------------------------------------------------------------------------- time mixing
class _TimeMix(nn.Module):
    """What the three versions share: r/k/v/output projections and ln_x (GroupNorm, one group a head)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.layer_id, self.n_head, self.head_size = layer_id, cfg.n_head, cfg.head_size
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(cfg.n_head, C, eps=LN_X_EPS)

    def initial_state(self, B: int) -> Tensor | None:
        """The trainable initial WKV state (state tuning) expanded over the batch, or None (zero)."""
        ts = getattr(self, "time_state", None)
        if ts is None:
            return None
        return ts.float().unsqueeze(0).expand(B, *ts.shape)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_size)

    def _rkv(self, r: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B,T,H,N] views in one dtype (r's: the compute dtype; under autocast parameters kept in
        fp32 can promote k or v) for the WKV op."""
        return self._heads(r), self._heads(k.to(r.dtype)), self._heads(v.to(r.dtype))

    def _norm(self, y: Tensor) -> Tensor:
        B, T, H, N = y.shape
        return self.ln_x(y.reshape(B * T, H * N)).view(B, T, H * N)


class TimeMix5(_TimeMix):
    """RWKV-5.2: static token-shift interpolation, constant per-channel decay, bonus u, silu gate."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(_vec(C)))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.gate = nn.Linear(C, C, bias=False)

    def forward(self, x, shift, state, v_first, op):
        prev = _shift(x, shift)

        def mix(mu):
            return x * mu + prev * (1 - mu)

        r, k, v = self.receptance(mix(self.time_mix_r)), self.key(mix(self.time_mix_k)), self.value(mix(self.time_mix_v))
        g = F.silu(self.gate(mix(self.time_mix_g)))
        B, T, _ = x.shape
        logw = (-torch.exp(self.time_decay.float())).expand(B, T, self.n_head, self.head_size).contiguous()
        y, s = wkv(*self._rkv(r, k, v), logw, u=self.time_faaaa, state=state, op=op)
        return self.output(self._norm(y) * g), s, v_first


class TimeMix6(_TimeMix):
    """RWKV-6: data-dependent token shift (low-rank time_maa_w1/w2) and decay (time_decay_w1/w2)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(_vec(C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * cfg.d_mix))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, cfg.d_mix, C))
        self.time_decay = nn.Parameter(_vec(C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, cfg.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(cfg.d_decay, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.gate = nn.Linear(C, C, bias=False)

    def forward(self, x, shift, state, v_first, op):
        B, T, C = x.shape
        xx = _shift(x, shift) - x
        m = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(m, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        g = F.silu(self.gate(x + xx * (self.time_maa_g + mg)))
        ww = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        logw = -torch.exp(ww.float())
        y, s = wkv(*self._rkv(r, k, v), self._heads(logw), u=self.time_faaaa, state=state, op=op)
        return self.output(self._norm(y) * g), s, v_first


class TimeMix7(_TimeMix):
    """RWKV-7: generalised delta rule S = S (diag(w) + a b^T) + v k^T with a = -kk, b = kk * alpha."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(_vec(C)))
        self.w1, self.w2 = nn.Parameter(torch.empty(C, cfg.d_decay)), nn.Parameter(torch.empty(cfg.d_decay, C))
        self.a1, self.a2 = nn.Parameter(torch.empty(C, cfg.d_aaa)), nn.Parameter(torch.empty(cfg.d_aaa, C))
        self.v1, self.v2 = nn.Parameter(torch.empty(C, cfg.d_mv)), nn.Parameter(torch.empty(cfg.d_mv, C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, cfg.d_gate)), nn.Parameter(torch.empty(cfg.d_gate, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        # Layer 0 stores v0/v1/v2 too (official layout) but never uses them: v_first is its own v.

    def forward(self, x, shift, state, v_first, op):
        xx = _shift(x, shift) - x
        xr, xw, xk, xv, xa, xg = (x + xx * p for p in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = torch.tanh(xw @ self.w1) @ self.w2
        if v_first is None:              # layer 0 (not read from layer_id: torch.compile would make one
            v_first = v                  # graph per layer from that int)
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize(self._heads(k * self.k_k), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        logw = -EXP_MINUS_HALF * torch.sigmoid((self.w0 + w).float())
        r4, k4, v4 = self._rkv(r, k, v)
        aa, bb = (-kk).to(r.dtype), (kk * self._heads(a)).to(r.dtype)
        y, s = wkv(r4, k4, v4, self._heads(logw), a=aa, b=bb, state=state, op=op)
        bonus = ((r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4).flatten(2)
        return self.output((self._norm(y) + bonus) * g), s, v_first


# ------------------------------------------------------------------------------------ channel mixing
FFN_MAX_PIECES = 4        # 1.5B LoRA, ctx 4096 x 8, GRAD_CP=1 on an H100: 4 pieces 2.6 GiB less at 1 % slower;
                          # 16 pieces no less memory, 4 % slower (bench/RESULTS.md, session 13)


def ffn_pieces(tokens: int, piece_tokens: int) -> int:
    """Into how many pieces the FFN splits ``tokens`` (B·T) tokens: pieces of at least ``piece_tokens``
    (0: whole), at most FFN_MAX_PIECES, a divisor of ``tokens``."""
    n = min(FFN_MAX_PIECES, tokens // piece_tokens) if piece_tokens > 0 else 1
    while n > 1 and tokens % n:
        n -= 1
    return max(n, 1)


def _in_pieces(f, x: Tensor, piece_tokens: int, *more: Tensor) -> Tensor:
    """f (token-wise: [N, C] -> [N, D]) over x [B, T, C] in ffn_pieces(B·T, piece_tokens) pieces of its
    tokens: the FFN's [N, 4C] hidden tensors, the largest in a checkpointed block's backward pass, then
    exist for one piece at a time (RWKV.ffn_piece_tokens). The same numbers as f(x). ``more``: token-wise
    tensors [B, T, *] cut alongside x, f's further arguments."""
    B, T, C = x.shape
    n = ffn_pieces(B * T, piece_tokens)
    if n == 1:
        return f(x, *more)
    return torch.cat([f(*p) for p in zip(*(a.reshape(B * T, -1).chunk(n) for a in (x, *more)))]).view(B, T, -1)


class ChannelMix5(nn.Module):
    """RWKV-5.2: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2 with static interpolation."""
    mix_names = ("time_mix_k", "time_mix_r")
    piece_tokens = 0                     # RWKV.ffn_piece_tokens

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, Fd = cfg.n_embd, cfg.ffn_dim
        for name in self.mix_names:
            setattr(self, name, nn.Parameter(_vec(C)))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def _mixed(self, x, prev):
        return x * self.time_mix_k + prev * (1 - self.time_mix_k), x * self.time_mix_r + prev * (1 - self.time_mix_r)

    def forward(self, x, shift):
        xk, xr = self._mixed(x, _shift(x, shift))
        return torch.sigmoid(self.receptance(xr)) * _in_pieces(
            lambda t: self.value(torch.relu(self.key(t)) ** 2), xk, self.piece_tokens)


class ChannelMix6(ChannelMix5):
    """RWKV-6: as RWKV-5.2 with x + (prev - x) * maa mixing."""
    mix_names = ("time_maa_k", "time_maa_r")

    def _mixed(self, x, prev):
        xx = prev - x
        return x + xx * self.time_maa_k, x + xx * self.time_maa_r


class ChannelMix7(nn.Module):
    """RWKV-7: W_v relu(W_k x_k)^2, no receptance."""
    piece_tokens = 0                     # RWKV.ffn_piece_tokens

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C, Fd = cfg.n_embd, cfg.ffn_dim
        self.x_k = nn.Parameter(_vec(C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)
        if cfg.deep_embed:                   # RWKV-7a: the key gated per token (trainer/deepembed.py)
            add_deep_embed(self, cfg)

    def forward(self, x, shift, de=None):
        xk = x + (_shift(x, shift) - x) * self.x_k
        if de is None:
            return _in_pieces(lambda t: self.value(torch.relu(self.key(t)) ** 2), xk, self.piece_tokens)
        return _in_pieces(lambda t, s: self.value(torch.relu(self.key(t)) ** 2 * deep_gate(self, s)), xk,
                          self.piece_tokens, deep_mix(self, x, de))


_CLASSES = {5: (TimeMix5, ChannelMix5), 6: (TimeMix6, ChannelMix6), 7: (TimeMix7, ChannelMix7)}


# ---------------------------------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        att_cls, ffn_cls = _CLASSES[cfg.version]
        self.att = att_cls(cfg, layer_id)
        self.ffn = ffn_cls(cfg, layer_id)

    def forward(self, x, v_first, att_shift, wkv_state, ffn_shift, op: str, de=None):
        # The residual stream keeps the dtype it enters with (RWKV.act_dtype): under autocast the norms
        # return fp32 and would otherwise turn a bf16 stream into fp32 from the first layer on.
        dt = x.dtype
        if hasattr(self, "ln0"):         # layer 0 (see TimeMix7: no layer_id in the forward pass)
            x = self.ln0(x).to(dt)
        xa = self.ln1(x).to(dt)
        out, wkv_state, v_first = self.att(xa, att_shift, wkv_state, v_first, op)
        x = x + out.to(dt)
        xf = self.ln2(x).to(dt)
        x = x + (self.ffn(xf, ffn_shift) if de is None else self.ffn(xf, ffn_shift, de)).to(dt)
        return x, v_first, xa[:, -1].float(), wkv_state, xf[:, -1].float()


def _checkpointed(blk: nn.Module, *args):
    """One block under gradient checkpointing; RWKV.compile_blocks compiles this whole call."""
    return checkpoint(blk, *args, use_reentrant=False)


# The matrix products whose outputs a "products saved" block keeps (selective checkpointing): its backward
# then recomputes only the element-wise work and the WKV between them, not the products.
_SAVED_PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


def _keep_products(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_PRODUCTS else CheckpointPolicy.PREFER_RECOMPUTE


def _products_saved_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_keep_products)


def _checkpointed_keep_products(blk: nn.Module, *args):
    """One block under selective checkpointing: the products' outputs are kept, the rest recomputed."""
    return checkpoint(blk, *args, use_reentrant=False, context_fn=_products_saved_context)


def _plain(blk: nn.Module, *args):
    """One block, no checkpointing: RWKV.compile_blocks compiles this call to replay it as a CUDA graph."""
    return blk(*args)


@dataclass(frozen=True)
class Execution:
    """How the model runs, handed over in one call (RWKV.set_execution; the trainer's from plan.RunPlan):
    ``op`` the WKV kernel (trainer.ops); ``grad_cp`` gradient checkpointing of the blocks, but the ``plain_top``
    top ones (they keep their activations) and, below those, ``keep_products`` blocks that keep their matrix
    products' outputs and recompute only the rest (compiled, traced op); ``ffn_piece_tokens``: the FFN over
    pieces of at least this many tokens (0: whole); ``act_dtype``: the residual stream's dtype under autocast
    (None, or no autocast: the embedding's); ``l2wrap``: the loss's L2Wrap gradient (L2WRAP, head_loss.py)."""
    op: str = "torch"
    grad_cp: bool = False
    plain_top: int = 0
    keep_products: int = 0
    ffn_piece_tokens: int = 0
    act_dtype: torch.dtype | None = None
    l2wrap: bool = False


class RWKV(nn.Module):
    """The language model. ``op`` picks the WKV kernel (trainer.ops); ``grad_cp`` checkpoints blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.version not in _CLASSES:
            raise ValueError(f"unknown RWKV version {cfg.version}")
        if cfg.n_embd % cfg.head_size:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of head_size {cfg.head_size}")
        self.cfg = cfg
        self.set_execution(Execution())  # how it runs (trainer/plan.py's RunPlan.execution for training)
        self._compiled_cp = None          # set by compile_blocks
        self._compiled_kp = None          # set by compile_blocks: the blocks that keep their products
        self._compiled_train = None       # set by compile_blocks(cudagraphs=True): training without checkpoints
        self.cudagraphs = False           # compile_blocks(cudagraphs=True): training calls replay CUDA graphs
        self.offload = None               # trainer/offload.py: blocks whose frozen weights are streamed in
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def set_execution(self, ex: "Execution") -> None:
        """Take the execution options ``ex`` (Execution) in one call: the trainer's plan hands them over once, and
        again with every block checkpointed after an out-of-memory error."""
        self.op, self.grad_cp, self.plain_top, self.keep_products = ex.op, ex.grad_cp, ex.plain_top, ex.keep_products
        self.act_dtype, self.l2wrap = ex.act_dtype, ex.l2wrap
        if hasattr(self, "blocks"):          # (built after the first call, with the FFN's default: whole)
            self.ffn_piece_tokens = ex.ffn_piece_tokens

    @property
    def execution(self) -> "Execution":
        return Execution(self.op, self.grad_cp, self.plain_top, self.keep_products, self.ffn_piece_tokens,
                         self.act_dtype, self.l2wrap)

    @property
    def ffn_piece_tokens(self) -> int:
        """The FFN runs over the B·T tokens in pieces of at least this many (ffn_pieces; 0: whole)."""
        return self.blocks[0].ffn.piece_tokens

    @ffn_piece_tokens.setter
    def ffn_piece_tokens(self, n: int) -> None:
        for blk in self.blocks:
            blk.ffn.piece_tokens = max(int(n), 0)

    def embed(self, idx: Tensor) -> Tensor:
        """The embedding of the tokens idx [B,T] on idx's device, wherever the table is (a frozen one may be held in
        CPU memory: trainer/tables.py)."""
        return lookup(self.emb.weight, idx)

    def compile_blocks(self, backend: str = "inductor", cudagraphs: bool = False) -> None:
        """torch.compile every block: the element-wise work between the matrix products (token shift, the
        low-rank mixes, norms, gates, LoRA's scaling) is fused into a few generated kernels instead of
        dozens of small ones per layer. The blocks share one compiled graph (two: layer 0 has ln0), so
        compiling costs seconds, once. The Triton WKV op is a custom op the graph calls; other WKV ops run
        between two compiled graphs. Gradient checkpointing: with the Triton op, the checkpoint is compiled
        with the block (see below); with the others it wraps the compiled block and recomputes through it."""
        import torch._dynamo
        import torch._inductor.config as inductor_config

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        # Inductor's "mix-order reduction" (torch 2.10+) returns the gradient of a [1, 1, C] parameter
        # scaled before a normalisation with the wrong shape (pytorch#178080: our full fine-tuning stopped
        # with "CompiledFunctionBackward returned an invalid gradient") and has given silently wrong
        # gradients elsewhere (pytorch#193061). Off: the fused kernels stay, that one fusion goes.
        if hasattr(inductor_config.triton, "mix_order_reduction"):
            inductor_config.triton.mix_order_reduction = False
        for blk in self.blocks:
            blk.compile(backend=backend, dynamic=False)
        # With gradient checkpointing and an op the graph traces, the checkpoint itself is compiled too:
        # the forward graph then keeps only the block's inputs, and the backward graph recomputes the
        # block and differentiates it in one go (one call each way instead of a forward, a recomputing
        # forward whose saved tensors pass through checkpoint's Python hooks one by one, and a backward).
        # ``cudagraphs``: the training calls (not inference's) replay as CUDA graphs (inductor's cudagraph
        # trees): one launch per block and direction instead of one per kernel, for steps that the CPU
        # issuing kernels would otherwise bound (1.5B LoRA at ctx 1024 x 1: 1.7x, bench/RESULTS.md).
        opts = {"triton.cudagraphs": True} if cudagraphs and backend == "inductor" else None
        self.cudagraphs = opts is not None
        self._compiled_cp = torch.compile(_checkpointed, backend=backend, dynamic=False, options=opts)
        self._compiled_kp = torch.compile(_checkpointed_keep_products, backend=backend, dynamic=False, options=opts)
        self._compiled_train = torch.compile(_plain, backend=backend, dynamic=False, options=opts) if opts else None
        # ... and that forward graph's WKV need not save for a backward pass it does not serve
        if backend == "inductor" and inductor_config.post_grad_custom_post_pass is None:
            from .ops.triton_wkv7 import skip_unused_saves_pass
            inductor_config.post_grad_custom_post_pass = skip_unused_saves_pass()

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def zero_state(self, B: int, device=None) -> State:
        """An all-zero state (fp32) for a batch of B sequences."""
        cfg, device = self.cfg, device if device is not None else self.device
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        return [(z(B, cfg.n_embd), z(B, cfg.n_head, cfg.head_size, cfg.head_size), z(B, cfg.n_embd))
                for _ in range(cfg.n_layer)]

    def initial_state(self, B: int, device=None) -> State:
        """The state a sequence starts from: zero, with each layer's ``time_state`` where one is set."""
        state = self.zero_state(B, device)
        for i, blk in enumerate(self.blocks):
            ts = blk.att.initial_state(B)
            if ts is not None:
                state[i] = (state[i][0], ts.to(state[i][1].device), state[i][2])
        return state

    def hidden_with_state(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx [B,T] -> (the last block's output after ln_out [B,T,C], the state after the last token)."""
        B = idx.shape[0]
        x = self.embed(idx)
        if self.act_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.act_dtype)     # (without autocast, e.g. DeepSpeed's fp16/bf16 engine: the weights' dtype)
        v_first, de = None, deep_embed_inputs(self, idx, x)      # de: RWKV-7a's tokens, each FFN's rows from them
        new_state: State = []
        # training: gradient checkpointing (all blocks but the ``plain_top`` top ones), compiled with the block
        # where the op is traced into the graph (else eager); the blocks without it as CUDA graphs where
        # compile_blocks(cudagraphs=True)
        cp_call = plain_call = kp_call = None
        n_cp = n_kp = 0                                    # the bottom n_cp blocks are checkpointed, the top
                                                           # n_kp of those keeping their products
        if self.training and torch.is_grad_enabled():
            if self._compiled_train is not None and is_traceable(self.op):
                plain_call = self._compiled_train          # no checkpoint: the CUDA-graph call
            if self.grad_cp:
                cp_call = (self._compiled_cp if self._compiled_cp is not None and is_traceable(self.op)
                           else functools.partial(checkpoint, use_reentrant=False))
                # the top blocks' backward runs first, so their activations are freed before any
                # checkpointed block is recomputed: leaving the top ones un-checkpointed costs the least
                L = len(self.blocks)
                n_cp = L - min(max(int(self.plain_top), 0), L)
                if self._compiled_kp is not None and is_traceable(self.op):
                    n_kp = min(max(int(self.keep_products), 0), n_cp)
                    kp_call = self._compiled_kp
        if self.offload is not None:
            self.offload.start()
        for i, blk in enumerate(self.blocks):
            if state is None:
                zero = torch.zeros(B, self.cfg.n_embd, dtype=torch.float32, device=x.device)
                att_shift, wkv_state, ffn_shift = zero, blk.att.initial_state(B), zero
            else:
                att_shift, wkv_state, ffn_shift = state[i]
            call = (cp_call if i < n_cp - n_kp else kp_call) if i < n_cp else plain_call
            if self.offload is not None:
                self.offload.before(i)             # its weights in their GPU slot
            # a 7a block gets its s_emb rows, looked up here: outside its graph and checkpoint (tables.py)
            args = (x, v_first, att_shift, wkv_state, ffn_shift, self.op) + (() if de is None else
                                                                              (deep_rows(blk.ffn, de),))
            if call is not None:
                x, v_first, att_shift, wkv_state, ffn_shift = call(blk, *args)
            else:
                x, v_first, att_shift, wkv_state, ffn_shift = blk(*args)
            if self.offload is not None:
                self.offload.after(i, x)           # the slot to the next streamed block; the backward's hook
            new_state.append((att_shift, wkv_state, ffn_shift))
        return self.ln_out(x), new_state

    def forward_with_state(self, idx: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """idx [B,T] -> (logits [B,T,V] in the weights' dtype, the state after the last token)."""
        hidden, new_state = self.hidden_with_state(idx, state)
        return self.head(hidden), new_state

    def forward(self, idx: Tensor, state: State | None = None, targets: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        """Logits [B,T,V]; or, given ``targets`` (and ``mask``, default all ones) [B,T], the mean next-token
        cross-entropy over the masked positions (fp32), computed with the head chunk by chunk
        (trainer/head_loss.py) so that the whole logits never exist; with L2Wrap's gradient if ``l2wrap``."""
        if targets is None:
            return self.forward_with_state(idx, state)[0]
        hidden, _ = self.hidden_with_state(idx, state)
        mask = torch.ones_like(targets, dtype=torch.float32) if mask is None else mask.float()
        return head_ce_sum(hidden, self.head.weight, targets, mask, self.l2wrap) / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------- RWKV-LM's random init
def _orthogonal_(p: Tensor, scale: float, gen: torch.Generator, tall_gain: bool = True) -> None:
    """Orthogonal init times ``scale``; with ``tall_gain`` also RWKV-LM's sqrt(rows/cols) for tall ones."""
    if scale == 0:
        p.zero_()
        return
    rows, cols = p.shape[-2], p.shape[-1]
    gain = math.sqrt(rows / cols) if rows > cols and tall_gain else 1.0
    for m in p.view(-1, rows, cols):
        a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, device=gen.device)
        q, rr = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)
        m.copy_((q if rows >= cols else q.T) * gain * scale)


def _uniform_(p: Tensor, bound: float, gen: torch.Generator) -> None:
    p.copy_((torch.rand(p.shape, generator=gen, device=gen.device) * 2 - 1) * bound)


# init_weights_'s output_gain for a random model meant for fine-tuning (the demo's, tools.make_model's): every
# method learns on it (on a 2 x 128 RWKV-5/6/7, 8 steps: the loss fell 0.30 to 0.38 with state tuning, 0.60 to
# 0.89 with Bone, 1.5 to 3.1 with the others; tests/test_demo.py), while RWKV-LM's zero projections leave
# state tuning and PiSSA nothing to learn.
FINETUNE_OUTPUT_GAIN = 0.3


@torch.no_grad()
def init_weights_(model: RWKV, seed: int = 0, output_gain: float = 0.0) -> RWKV:
    """Fill ``model`` (fp32) with RWKV-LM's initialisation for its version (x052/x060/x070). The random
    numbers come from a generator on the model's device (a GPU makes a 7B model in seconds; the values
    then differ from the CPU's for the same seed).

    Our own code following the scheme of RWKV-LM: per-channel token-shift ramps that change with depth,
    decay speeds spread from fast to slow over the channels, small uniform embedding, orthogonal head and
    projections, zero output projections (each block starts as the identity), ln_x scaled with depth.

    ``output_gain`` > 0: the projections RWKV-LM zeroes (att.output, ffn.value, RWKV-5/6's ffn.receptance)
    are orthogonal times that gain instead, drawn after everything else (the other tensors are the same as
    with 0). A random model to fine-tune wants it: on zero projections state tuning and PiSSA cannot learn
    (trainer/peft/base.py, Method.check_base).
    """
    gen = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    cfg = model.cfg
    C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
    n = torch.arange(C, dtype=torch.float64)
    ddd = (n / C).float().view(1, 1, C)                     # 0 .. (C-1)/C
    lin01 = (n / (C - 1)).float()                            # 0 .. 1
    _uniform_(model.emb.weight, 1e-4, gen)
    _orthogonal_(model.head.weight, 0.5, gen)          # rows of norm ~0.5: logits start with std ~0.5
    for ln in [model.ln_out] + [m for b in model.blocks for m in (getattr(b, "ln0", None), b.ln1, b.ln2) if m]:
        ln.weight.fill_(1.0)
        ln.bias.zero_()
    for i, blk in enumerate(model.blocks):
        r01 = i / (L - 1) if L > 1 else 0.0                  # 0 at the first layer, 1 at the last
        r10 = 1.0 - i / L                                    # 1 at the first layer, -> 0 at the last
        att, ffn = blk.att, blk.ffn
        att.ln_x.weight.fill_(((1 + i) / L) ** 0.7)
        att.ln_x.bias.zero_()
        if cfg.version in (5, 6):
            decay = -6 + 5 * lin01 ** (0.7 + 1.3 * r01)
            zig = ((torch.arange(C) + 1) % 3 - 1).float() * 0.1
            faaaa = (r01 * (1 - lin01) + zig).view(H, N)
            att.time_faaaa.copy_(faaaa)
            _orthogonal_(att.receptance.weight, 1.0, gen)
            _orthogonal_(att.key.weight, 0.1, gen)
            _orthogonal_(att.value.weight, 1.0, gen)
            _orthogonal_(att.gate.weight, 0.1, gen)
            att.output.weight.zero_()
            _orthogonal_(ffn.key.weight, 1.0, gen)
            ffn.receptance.weight.zero_()
            ffn.value.weight.zero_()
        if cfg.version == 5:
            att.time_mix_k.copy_(ddd ** r10)
            att.time_mix_v.copy_(ddd ** r10 + 0.3 * r01)
            att.time_mix_r.copy_(ddd ** (0.5 * r10))
            att.time_mix_g.copy_(ddd ** (0.5 * r10))
            att.time_decay.copy_(decay.view(H, N))
            ffn.time_mix_k.copy_(ddd ** r10)
            ffn.time_mix_r.copy_(ddd ** r10)
        elif cfg.version == 6:
            for name in ("time_maa_x", "time_maa_w", "time_maa_k"):
                getattr(att, name).copy_(1 - ddd ** r10)
            att.time_maa_v.copy_(1 - (ddd ** r10 + 0.3 * r01))
            att.time_maa_r.copy_(1 - ddd ** (0.5 * r10))
            att.time_maa_g.copy_(1 - ddd ** (0.5 * r10))
            _uniform_(att.time_maa_w1, 1e-4, gen)
            _uniform_(att.time_maa_w2, 1e-4, gen)
            att.time_decay.copy_(decay.view(1, 1, C))
            _uniform_(att.time_decay_w1, 1e-4, gen)
            _uniform_(att.time_decay_w2, 1e-4, gen)
            ffn.time_maa_k.copy_(1 - ddd ** r10)
            ffn.time_maa_r.copy_(1 - ddd ** r10)
        elif cfg.version == 7:
            for name, pw in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1 - ddd ** (pw * r10))
            linear = (n / (C - 1) - 0.5).float()
            zz = ((torch.arange(C) % N) - (N - 1) / 2) / ((N - 1) / 2)
            zigzag = (zz * zz.abs()).float()
            www = -6 + 6 * lin01 ** (1 + r01 ** 0.3)
            att.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))     # +0.5: RWKV-LM's softplus offset
            att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
            att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
            att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            for lo, hi in ((att.w1, att.w2), (att.a1, att.a2), (att.v1, att.v2), (att.g1, att.g2)):
                lo.zero_()
                _orthogonal_(hi, 0.1, gen)
            # x070 re-initialises the projections orthogonally, without the tall-matrix gain
            _orthogonal_(att.receptance.weight, 1.0, gen, tall_gain=False)
            _orthogonal_(att.key.weight, 0.1, gen, tall_gain=False)
            _orthogonal_(att.value.weight, 1.0, gen, tall_gain=False)
            att.output.weight.zero_()
            ffn.x_k.copy_(1 - ddd ** (r10 ** 4))
            _orthogonal_(ffn.key.weight, 1.0, gen, tall_gain=False)
            ffn.value.weight.zero_()
    if output_gain > 0:
        for blk in model.blocks:
            for lin in (blk.att.output, blk.ffn.value, getattr(blk.ffn, "receptance", None)):
                if lin is not None:
                    _orthogonal_(lin.weight, output_gain, gen, tall_gain=False)
    return model
