"""Merge a trained checkpoint into its base model: what ./merge.sh runs.

    python -m tools.merge EPOCH [--output FOLDER] [--model-dir model] [--merge-dir merge] [--dtype bf16]
                                [--base FILE] [--state-model] [--lora-alpha A | --pissa-init FILE]

EPOCH is a number (OUTPUT/rwkv-EPOCH.pth), "interrupted" or "best" (the lowest validation loss). Without --output, the checkpoints are taken from
the OUTPUT that ./training.sh sets (its line is read, the script is not run), else from output/. The method, its settings, TRAIN_PARTS and the
base model are read from the checkpoint. Writes merge/<base>-<method>-EPOCH.pth (a complete model in the
official layout), or for state tuning merge/<base>-state-EPOCH.pth (the tuned state alone; with --state-model
also merge/<base>-state-EPOCH-model.pth, the base model with the state inside), then prints how to use it.

RWKV-PEFT's adapter files (its rwkv-N.pth: --output its folder, --base the model it trained) and plain state files
are read too (trainer/checkpoint/imports.py). Its LoRA files do not record alpha: --lora-alpha gives it; its PiSSA
files need their initial A and B from the init_pissa.pth it wrote into that folder: --pissa-init.
"""
from __future__ import annotations

import argparse
import time

from trainer.checkpoint import merge_usage_text as usage_text  # noqa: F401  (its home is beside the merge)
from trainer.checkpoint.imports import parse_lora_alpha
from trainer.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.merge", description=__doc__,
                                 usage="%(prog)s EPOCH [options]   (what ./merge.sh EPOCH runs; --help lists them)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("epoch", nargs="?", help="the epoch to merge (OUTPUT/rwkv-EPOCH.pth), 'interrupted' or 'best'")
    ap.add_argument("--output", default=None, help="the folder training wrote its checkpoints to (default: "
                    "OUTPUT in ./training.sh, read as text; else output)")
    ap.add_argument("--model-dir", default="model", help="where base models are looked up by name")
    ap.add_argument("--merge-dir", default="merge", help="where the merged files go")
    ap.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32: the dtype of every tensor written")
    ap.add_argument("--base", default="", help="the base model (default: the one recorded in the checkpoint)")
    ap.add_argument("--state-model", action="store_true",
                    help="state tuning: also write the base model with the tuned state inside")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a file in the merge folder that was merged from another checkpoint")
    ap.add_argument("--lora-alpha", default="", help="an RWKV-PEFT LoRA file: the lora_alpha it was trained with "
                    "(its files do not record it)")
    ap.add_argument("--pissa-init", default="", help="an RWKV-PEFT PiSSA file: its init_pissa.pth (the initial A "
                    "and B)")
    args = ap.parse_args(argv)
    lora_alpha = parse_lora_alpha(args.lora_alpha)

    from trainer.checkpoint import checkpoint_path, list_epochs, merge_checkpoint
    from trainer.envfile import merge_output_dir

    output, source = merge_output_dir(args.output)
    if args.epoch is None:
        have = list_epochs(output)
        raise UserError(f"give one EPOCH: the checkpoints in {output}/ ({source}) are "
                        + (", ".join(f"rwkv-{e}.pth" for e in have) or "none") + ".",
                        f"./merge.sh EPOCH, e.g. ./merge.sh {have[-1] if have else 0}")
    path = checkpoint_path(output, args.epoch)
    t0 = time.time()
    res = merge_checkpoint(path, args.model_dir, args.merge_dir, args.dtype, args.base or None, args.state_model,
                           overwrite=args.overwrite, lora_alpha=lora_alpha, pissa_init=args.pissa_init or None)
    meta = res.meta
    when = "interrupted mid-epoch" if meta.get("complete") is False else f"after epoch {meta.get('epoch')}"
    if isinstance(meta.get("valid_loss"), (int, float)):
        when = f"the best validation loss, {meta['valid_loss']:.4f} after optimizer step {meta.get('optimizer_steps')}"
    if meta.get("converted_from"):
        when = f"converted from {meta['converted_from']}"
    settings = ", ".join(f"{k}={v}" for k, v in (meta.get("settings") or {}).items())
    parts = " ".join(meta.get("train_parts") or [])
    if source != "OUTPUT":
        print(f"checkpoints from {output}/ ({source})")
    print(f"merged {path} ({meta['method']}{' ' + settings if settings else ''}"
          f"{', TRAIN_PARTS ' + parts if parts else ''}; {when}) into {res.base} (RWKV-{res.version}), "
          f"{args.dtype}, in {time.time() - t0:.1f} s")
    for p in (res.state, res.model):
        if p is not None:
            print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    for note in res.notes:
        print(f"note: {note}")
    print()
    print(usage_text(res))
    return 0


if __name__ == "__main__":
    run_cli(main)
