"""Make a new RWKV model with random weights (RWKV-LM's initialisation), saved in the official layout.

    python -m tools.make_model --version 7 --layers 2 --width 128 --out model/demo.pth
                               [--vocab 65536] [--head-size 64] [--seed 0] [--dtype bf16|fp16|fp32]
                               [--output-gain 0.3] [--deep-embed]

Small ones are for trying the toolkit on a CPU; the rwkv package and RWKV-Runner load the file too.
RWKV-LM starts every block's output projections (att.output, ffn.value) at zero; on such a model state
tuning and PiSSA cannot learn (training refuses them). So these get small random ones (--output-gain, the
demo's); --output-gain 0 gives RWKV-LM's initialisation exactly. --deep-embed makes an RWKV-7a model
(DeepEmbed rank 32, what the rwkv package runs with RWKV_DE_VERSION=1), its gate drawn near 1 as in a trained one.
"""
from __future__ import annotations

import argparse

from trainer.errors import UserError, run_cli
from trainer.model import FINETUNE_OUTPUT_GAIN


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.make_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", type=int, required=True, choices=(5, 6, 7), help="RWKV version: 5 (5.2), 6 or 7")
    ap.add_argument("--layers", type=int, required=True, help="number of blocks, e.g. 2 for a demo, 12 for 0.1B")
    ap.add_argument("--width", type=int, required=True, help="n_embd, a multiple of the head size, e.g. 128 or 768")
    ap.add_argument("--out", required=True, help="the .pth file to write (e.g. model/demo.pth)")
    ap.add_argument("--vocab", type=int, default=65536, help="vocabulary size (65536: the RWKV World tokenizer)")
    ap.add_argument("--head-size", type=int, default=64, help="head size (64 in every released model)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the initialisation")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                    help="dtype of the saved weights (bf16 like the released models)")
    ap.add_argument("--output-gain", type=float, default=FINETUNE_OUTPUT_GAIN,
                    help="scale of the random att.output / ffn.value weights (default %(default)s: every method "
                    "learns on the model); 0 = RWKV-LM's zero projections, on which state tuning and PiSSA "
                    "cannot learn")
    ap.add_argument("--deep-embed", action="store_true", help="with --version 7: an RWKV-7a (DeepEmbed) model, "
                    "rank 32; the rwkv package runs it with RWKV_DE_VERSION=1")
    args = ap.parse_args(argv)

    from trainer.checkpoint import DTYPES, config_from_sizes, save_atomic
    from trainer.deepembed import PACKAGE_RANK

    if not args.out.endswith(".pth"):
        raise UserError(f"--out {args.out} should end with .pth", f"e.g. --out {args.out}.pth")
    cfg = config_from_sizes(args.version, args.layers, args.width, vocab_size=args.vocab, head_size=args.head_size)
    if not 0 <= args.output_gain <= 10:
        raise UserError(f"--output-gain {args.output_gain} is outside 0 to 10.",
                        f"use {FINETUNE_OUTPUT_GAIN} (the default), or 0 for RWKV-LM's zero output projections")
    cfg = deep_embed_config(cfg, PACKAGE_RANK if args.deep_embed else 0)
    model = new_model(cfg, seed=args.seed, output_gain=args.output_gain)
    sd = {k: v.to(DTYPES[args.dtype]).contiguous() for k, v in model.state_dict().items()}
    save_atomic(sd, args.out)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: RWKV-{cfg.version}{'a (DeepEmbed rank ' + str(cfg.deep_embed) + ')' if cfg.deep_embed else ''}, {cfg.n_layer} layers x {cfg.n_embd} wide, head size "
          f"{cfg.head_size}, vocabulary {cfg.vocab_size}, {n / 1e6:.2f} M parameters, {args.dtype}")
    return 0


def deep_embed_config(cfg, rank: int):
    """``cfg`` with RWKV-7a's DeepEmbed of rank ``rank`` (--deep-embed: the rwkv package's; 0: none), RWKV-7 only
    (bench/train_speed.py's --deep-embed too)."""
    import dataclasses
    if not rank:
        return cfg
    if cfg.version != 7:
        raise UserError(f"--deep-embed is RWKV-7a, an RWKV-7 model, not RWKV-{cfg.version}.",
                        "use --version 7 --deep-embed, or leave --deep-embed out")
    return dataclasses.replace(cfg, deep_embed=rank)


def new_model(cfg, seed: int = 0, output_gain: float = FINETUNE_OUTPUT_GAIN, device="cpu"):
    """The model this tool writes for ``cfg``: RWKV-LM's initialisation (model.init_weights_; a GPU ``device``
    makes a 7B in seconds, with other values than the CPU's), a 7a model's DeepEmbed drawn so that its gate is near
    1 but not 1 (deepembed.random_deep_embed_). bench/train_speed.py makes its models with it too."""
    import torch

    from trainer.deepembed import random_deep_embed_
    from trainer.model import RWKV, init_weights_
    with torch.device(device):
        model = init_weights_(RWKV(cfg), seed, output_gain)
    if cfg.deep_embed:
        random_deep_embed_(model, seed=seed)
    return model


if __name__ == "__main__":
    run_cli(main)
