"""Merge a trained checkpoint into its base model: what ./merge.sh runs.

    python -m tools.merge EPOCH [--output output] [--model-dir model] [--merge-dir merge] [--dtype bf16]
                                [--base FILE] [--state-model]

EPOCH is a number (output/rwkv-EPOCH.pth) or "interrupted". The method, its settings, TRAIN_PARTS and the
base model are read from the checkpoint. Writes merge/<base>-<method>-EPOCH.pth (a complete model in the
official layout), or for state tuning merge/<base>-state-EPOCH.pth (the tuned state alone; with --state-model
also merge/<base>-state-EPOCH-model.pth, the base model with the state inside), then prints how to use it.
"""
from __future__ import annotations

import argparse
import time

from trainer.errors import run_cli


def usage_text(res) -> str:
    """How to use what merge wrote: RWKV-Runner, Ai00, the rwkv package."""
    v7 = res.version == 7
    env = 'import os; os.environ["RWKV_V7_ON"] = "1"   # RWKV-7: before importing rwkv\n    ' if v7 else ""
    lines = []
    if res.state is not None:
        shape = "s" if v7 else "s.transpose(1, 2)"
        lines += [
            f"Use the state file {res.state} with the base model {res.base}:",
            "  RWKV-Runner: copy both into its models/ folder; in Configs choose the base model as the model",
            "               and the state file as its state (state-tuned model).",
            "  Ai00: convert the state file with convert_safetensors.py too, and list the .st under [[state]]",
            "        in Ai00's Config.toml next to the base model.",
            "  the rwkv package: start every prompt from the tuned state (layer i's WKV state is state[3*i+1]):",
            f"    import torch; {env.strip() + chr(10) + '    ' if env else ''}from rwkv.model import RWKV",
            f"    model = RWKV(model=\"{str(res.base)[:-len('.pth')] if str(res.base).endswith('.pth') else res.base}\", "
            "strategy=\"cpu fp32\"); st = torch.load(\"" + str(res.state) + "\")",
            "    state = [None] * (3 * model.args.n_layer); C = model.args.n_embd",
            "    for i in range(model.args.n_layer): s = st[f'blocks.{i}.att.time_state'].float(); "
            f"state[3*i:3*i+3] = [torch.zeros(C), {shape}.contiguous(), torch.zeros(C)]",
            "    logits, state = model.forward([token ids], state)",
        ]
    if res.model is not None:
        if lines:
            lines.append("")
        path = str(res.model)[:-len(".pth")]
        lines += [
            f"Use {res.model}" + (" (the base model with the tuned state inside):" if res.state else ":"),
            "  RWKV-Runner: copy it into RWKV-Runner's models/ folder and choose it as the model in Configs.",
            "  Ai00: convert it with Ai00's convert_safetensors.py (--input FILE.pth --output FILE.st) and set",
            "        model_path to the .st file in Ai00's Config.toml.",
            "  the rwkv package (pip install rwkv):",
            f"    {env}from rwkv.model import RWKV",
            f"    model = RWKV(model=\"{path}\", strategy=\"cuda fp16\")   # or \"cpu fp32\"; the path without .pth",
            "    logits, state = model.forward([token ids], None)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("epoch", help="the epoch to merge (output/rwkv-EPOCH.pth), or 'interrupted'")
    ap.add_argument("--output", default="output", help="the folder training wrote its checkpoints to")
    ap.add_argument("--model-dir", default="model", help="where base models are looked up by name")
    ap.add_argument("--merge-dir", default="merge", help="where the merged files go")
    ap.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32: the dtype of every tensor written")
    ap.add_argument("--base", default="", help="the base model (default: the one recorded in the checkpoint)")
    ap.add_argument("--state-model", action="store_true",
                    help="state tuning: also write the base model with the tuned state inside")
    args = ap.parse_args(argv)

    from trainer.checkpoint import checkpoint_path, merge_checkpoint

    path = checkpoint_path(args.output, args.epoch)
    t0 = time.time()
    res = merge_checkpoint(path, args.model_dir, args.merge_dir, args.dtype, args.base or None, args.state_model)
    meta = res.meta
    when = "interrupted mid-epoch" if meta.get("complete") is False else f"after epoch {meta.get('epoch')}"
    if meta.get("converted_from"):
        when = f"converted from {meta['converted_from']}"
    settings = ", ".join(f"{k}={v}" for k, v in (meta.get("settings") or {}).items())
    parts = " ".join(meta.get("train_parts") or [])
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
