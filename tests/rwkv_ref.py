"""Run the ``rwkv`` pip package (the reference implementation) on checkpoints, in a subprocess.

The package reads its settings from the environment at import time (RWKV-7 needs RWKV_V7_ON=1 and then
loads nothing else), so each version family runs in its own process; one process handles many jobs.

    results = run_rwkv_package(7, [{"model": "/tmp/a.pth", "tokens": [1, 2, 3], "split": 2}])
    results[0]["logits"]        # [T, V] fp32: the whole sequence fed at once
    results[0]["logits_split"]  # [T, V]: fed as tokens[:split], tokens[split:] with the state carried
    results[0]["state"]         # final state in OUR layout: [(att_shift [C], wkv [H,N,N] S[value,key],
                                #  ffn_shift [C]) per layer]

A job may give ``"state"`` (our layout, per layer; fp32) to start from; otherwise the package starts
from zero (v5/v6: from the checkpoint's ``time_state`` if it has one; v7 ignores ``time_state``).
``start_many([...])`` launches several version families at once and waits for all (2 cores here).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
jobs = torch.load(sys.argv[1], weights_only=False)
v7 = sys.argv[3] in ('7', '7a')
from rwkv.model import RWKV

def to_pkg(state):
    if state is None:
        return None
    out = []
    for a, w, f in state:
        w = w.float() if v7 else w.float().transpose(-1, -2)     # v5/v6 keep S[key, value]
        out += [a.float().clone(), w.contiguous().clone(), f.float().clone()]
    return out

def from_pkg(state):
    res = []
    for i in range(len(state) // 3):
        w = state[3 * i + 1].float()
        res.append((state[3 * i].float().clone(), (w if v7 else w.transpose(-1, -2)).contiguous().clone(),
                    state[3 * i + 2].float().clone()))
    return res

def clone(s):
    return None if s is None else [x.clone() for x in s]

results = []
models = {}
for job in jobs:
    path = job['model']
    if path not in models:
        if v7:
            models[path] = RWKV(model=path[:-4] if path.endswith('.pth') else path, strategy='cpu fp32')
        else:
            models[path] = RWKV(model=path, strategy='cpu fp32', verbose=False)
    m = models[path]
    toks = [int(t) for t in job['tokens']]
    st = to_pkg(job.get('state'))
    logits, s = m.forward(toks, clone(st), full_output=True)
    res = {'logits': logits.float().reshape(len(toks), -1).clone(), 'state': from_pkg(s)}
    split = job.get('split')
    if split:
        l1, s1 = m.forward(toks[:split], clone(st), full_output=True)
        l1 = l1.float().reshape(split, -1).clone()
        l2, _ = m.forward(toks[split:], clone(s1), full_output=True)
        res['logits_split'] = torch.cat([l1, l2.float().reshape(len(toks) - split, -1)])
    results.append(res)
torch.save(results, sys.argv[2])
"""


class _Run:
    def __init__(self, version: int | str, jobs: list[dict]):
        self.dir = tempfile.TemporaryDirectory(prefix="rwkv_ref_")
        self.jobs_path = os.path.join(self.dir.name, "jobs.pt")
        self.out_path = os.path.join(self.dir.name, "out.pt")
        torch.save(jobs, self.jobs_path)
        env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0", CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("RWKV_V7_ON", None)
        env.pop("RWKV_DE_VERSION", None)
        if version in (7, "7a"):
            env["RWKV_V7_ON"] = "1"
        if version == "7a":                   # RWKV-7a (DeepEmbed): the package reads it at import
            env["RWKV_DE_VERSION"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, self.jobs_path, self.out_path, str(version)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 600) -> list[dict]:
        out, _ = self.proc.communicate(timeout=timeout)
        try:
            if self.proc.returncode != 0:
                raise RuntimeError(f"the rwkv package failed (exit {self.proc.returncode}):\n{out[-4000:]}")
            return torch.load(self.out_path, weights_only=False)
        finally:
            self.dir.cleanup()


def run_rwkv_package(version: int | str, jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Results of the rwkv package for ``jobs`` (see the module doc). v5 and v6 may share one call; version "7a"
    runs RWKV-7a (DeepEmbed) files with RWKV_DE_VERSION=1."""
    return _Run(version, jobs).wait(timeout)


def start_many(runs: dict[str, tuple[int, list[dict]]], timeout: float = 600) -> dict[str, list[dict]]:
    """Run several families in parallel: {"name": (version, jobs)} -> {"name": results}."""
    started = {name: _Run(v, jobs) for name, (v, jobs) in runs.items()}
    return {name: r.wait(timeout) for name, r in started.items()}


def random_model(version: int, n_layer: int = 2, n_embd: int = 128, vocab_size: int = 1024, seed: int = 0,
                 head_size: int = 64):
    """A tiny fp32 model with RWKV-LM's init plus noise on every tensor, so that no part is trivial
    (a fresh init has zero output projections: every block would be the identity)."""
    from trainer.checkpoint import config_from_sizes, init_model

    model = init_model(config_from_sizes(version, n_layer, n_embd, vocab_size, head_size), seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "emb.weight":
                p.copy_(r)
            elif p.dim() >= 2 and not name.endswith(("time_decay", "time_faaaa", "r_k", "time_state")):
                p.add_(r * 0.5 / max(p.shape[-2:]) ** 0.5)
            else:
                p.add_(r * 0.1)
    return model


def random_model_7a(n_layer: int = 2, n_embd: int = 128, vocab_size: int = 1024, seed: int = 0, rank: int = 32,
                    head_size: int = 64):
    """random_model(7) with RWKV-7a's DeepEmbed tensors (trainer/deepembed.py) drawn so that the FFN's gate moves
    well away from 1 (about 1 +- 0.3, different for every token and position), not the identity it starts as."""
    import dataclasses

    from trainer.checkpoint import config_from_sizes, init_model

    cfg = dataclasses.replace(config_from_sizes(7, n_layer, n_embd, vocab_size, head_size), deep_embed=rank)
    model = init_model(cfg, seed)
    base = random_model(7, n_layer, n_embd, vocab_size, seed, head_size)
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in base.named_parameters():
            params[name].copy_(p)
        for blk in model.blocks:
            f = blk.ffn
            f.s_emb.weight.copy_(torch.randn(f.s_emb.weight.shape, generator=g) * 0.2 / rank ** 0.5)
            f.s_emb_x.weight.copy_(torch.randn(f.s_emb_x.weight.shape, generator=g) * 0.2 / (rank * n_embd) ** 0.5)
            f.s1.copy_(torch.randn(f.s1.shape, generator=g) / n_embd ** 0.5)
            f.s2.copy_(torch.randn(f.s2.shape, generator=g) / rank ** 0.5)
            f.s0.copy_(1 + 0.1 * torch.randn(f.s0.shape, generator=g))
    return model
