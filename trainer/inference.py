"""Using a model without training it: the evaluation loss over documents and text sampling.

Both take a ready ``RWKV`` (base model, or one with an adapter or a tuned state applied), so the
command-line tools, the training loop's samples and the tests share them.

    evaluate_loss(model, docs, ctx_len=None)     -> {"loss", "tokens", "ppl"}
    generate(model, prompt_ids, max_tokens=100, temperature=1.0, top_p=0.85, seed=0) -> new ids
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError
from .model import RWKV

END_OF_DOC = 0          # token 0 ends every document in binidx data
WORLD_VOCAB_DEFINED = 65530   # ids 0..65529 exist in the RWKV World tokenizer; 65530..65535 never occur


@torch.no_grad()
def evaluate_loss(model: RWKV, docs: Iterable, ctx_len: int | None = None,
                  chunk_len: int = 1024, progress: Callable[[int, int], None] | None = None) -> dict:
    """Mean next-token cross-entropy over ``docs``, each cut to its first ``ctx_len`` tokens.

    Every document starts from the model's initial state (zero, or its tuned ``time_state``) and every
    token after the first is predicted, the end-of-document token included. A document may also be a pair
    ``(tokens, mask)``: then only the targets (tokens[1:]) whose mask is non-zero count (a training run's
    LOSS_MASK, validate.masked_items). Long documents are fed in pieces of ``chunk_len`` with the state carried
    over (the same result as all at once). ``progress(docs_done, tokens_done)`` is called after each document.
    """
    device = model.device
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    try:
        for n_doc, doc in enumerate(docs, 1):
            doc, mask = doc if isinstance(doc, tuple) else (doc, None)
            ids = torch.as_tensor(np.asarray(doc, dtype=np.int64)[:ctx_len], device=device)
            if ids.numel() >= 2:
                state = None
                inputs, targets = ids[:-1], ids[1:]
                weight = (torch.ones(targets.numel(), dtype=torch.float64) if mask is None else
                          torch.as_tensor(np.asarray(mask, dtype=np.float64)[:targets.numel()]))
                for s in range(0, inputs.numel(), chunk_len):
                    logits, state = model.forward_with_state(inputs[None, s:s + chunk_len], state)
                    ce = F.cross_entropy(logits[0].float(), targets[s:s + chunk_len], reduction="none")
                    total += float((ce.double().cpu() * weight[s:s + chunk_len]).sum())
                count += float(weight.sum())
            if progress:
                progress(n_doc, int(count))
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return {"loss": loss, "tokens": int(count), "ppl": math.exp(loss) if count and loss < 700 else float("inf")}


def sample_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 0.85,
                  generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: nucleus (top-p) sampling at ``temperature``; 0 means greedy."""
    logits = logits.float()
    if temperature <= 0 or top_p <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p       # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: RWKV, prompt_ids: Sequence[int], max_tokens: int = 100, temperature: float = 1.0,
             top_p: float = 0.85, seed: int | None = 0, stop_token: int | None = END_OF_DOC,
             vocab_limit: int | None = WORLD_VOCAB_DEFINED,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue ``prompt_ids`` by up to ``max_tokens`` sampled tokens (stops after ``stop_token``).

    Starts from the model's initial state (a tuned ``time_state`` is used). ``vocab_limit`` keeps ids
    the tokenizer cannot decode from being sampled. Returns the new ids only.

    Compiled blocks (the trainer's sample at each save) run eagerly here: the prompt's length and the one-token
    steps would each compile graphs of their own (seconds to tens of seconds at 1.5B) for a few dozen tokens.
    """
    if not prompt_ids:
        prompt_ids = [END_OF_DOC]    # an empty prompt: start as after the end of a document
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        with torch.compiler.set_stance("force_eager"):   # compiled blocks run eagerly: see above
            idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
            logits, state = model.forward_with_state(idx)
            for _ in range(max_tokens):
                last = logits[0, -1]
                if vocab_limit is not None and last.numel() > vocab_limit:
                    last = last.clone()
                    last[vocab_limit:] = -float("inf")
                tok = sample_logits(last, temperature, top_p, gen)
                out.append(tok)
                if on_token:
                    on_token(tok)
                if stop_token is not None and tok == stop_token:
                    break
                logits, state = model.forward_with_state(torch.tensor([[tok]], device=model.device), state)
    finally:
        model.train(was_training)
    return out


def pick_device(name: str) -> torch.device:
    """--device auto | cuda | cpu for the command-line tools and the web page's chat."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU here", "use --device cpu (slower)")
    return torch.device(name)


def pick_dtype(name: str, device):
    """The compute dtype: fp32 on the CPU (bf16 matmuls are slow there), bf16 on a GPU, unless given."""
    from .checkpoint import DTYPES
    if name == "auto":
        return DTYPES["bf16" if device.type == "cuda" else "fp32"]
    return DTYPES[name]
