"""Everything a training run writes to OUTPUT, each write atomic (trainer/files.py), the folder held by this run
alone: the adapter of each save and train_state.pth (the unit a resume continues, trainer/resume.py), loss.csv
and loss.png, samples.txt.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint
from .errors import interrupt_deferred
from .strategy import Spread

SAMPLE_TOKENS = 64
LOSS_COLUMNS = ("optimizer_step", "epoch", "loss", "lr", "tokens_per_s", "valid_loss")   # loss.csv's header


class RunFiles:
    """Everything written to OUTPUT, each write atomic; the folder held by this run alone (files.hold_folder)."""

    def __init__(self, out: Path, prep: Any, write: bool = True, spread: Spread | None = None,
                 log: Callable[[str], None] = print):
        from .files import hold_folder, sweep_temps
        self.out = out
        self.prep = prep
        self.spread = spread or Spread(prep.cfg)
        self.write = write                  # False on every GPU process but the first
        self.lock = None
        self.csv_path = out / "loss.csv"
        if not write:
            return
        self.lock = hold_folder(out, "OUTPUT")     # a second run into this folder is refused
        for p in sweep_temps(out):
            log(f"removed {p.name}, a temporary file left by a run that was killed while writing")
        cfg = prep.cfg
        if cfg.OVERWRITE and not cfg.RESUME:
            gone = checkpoint.clear_run(out)
            if gone:
                log(f"OVERWRITE=1: removed the earlier run's {', '.join(p.name for p in gone)} from {out}/")
        if prep.resume is not None:
            self._drop_rows_after(prep.resume["opt_step"])

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def adapter_path(self, epoch: int | None) -> Path:
        return self.out / ("rwkv-interrupted.pth" if epoch is None else f"rwkv-{epoch}.pth")

    def _trained(self) -> dict:
        """The trained tensors in fp32 on the CPU (on the first rank; {} on the others). Every rank takes part:
        DeepSpeed gathers the fp32 master weights collectively."""
        prep = self.prep
        with self.spread.master_weights(prep.model):
            if self.write:
                return {k: v.detach().float().cpu() for k, v in prep.method.adapter_state_dict(prep.model).items()}
        return {}

    def _meta(self, *, epoch: int, complete: bool, opt_step: int, save_id: str) -> dict:
        """What an adapter file records: the method, its base, where in the run, the whole config."""
        prep = self.prep
        return {"method": prep.cfg.FINETUNE_MODE, "settings": prep.method.metadata(),
                "train_parts": list(prep.cfg.TRAIN_PARTS), "quant": prep.cfg.QUANT, "base": prep.base_meta,
                "epoch": epoch, "complete": complete, "optimizer_steps": opt_step, "save_id": save_id,
                "config": prep.cfg.to_env()}

    def save(self, *, epoch: int, step_in_epoch: int, opt_step: int, micro_step: int,
             optimizer: torch.optim.Optimizer, complete: bool, rng: torch.Tensor | None = None,
             valid: dict | None = None) -> Path:
        """Write the adapter, then train_state.pth: the unit a resume continues (resume.py says what it holds and
        why this order). The callers hold Ctrl+C back meanwhile (interrupt_deferred)."""
        import uuid

        from . import resume
        prep = self.prep
        path = self.adapter_path(epoch if complete else None)
        tensors = self._trained()
        save_id = uuid.uuid4().hex if self.write else ""
        if self.spread.deepspeed:             # its tag names one folder that every rank writes into
            save_id = self.spread.agree(save_id)
        tag = f"step-{opt_step}{'' if complete else '-interrupted'}-{save_id[:8]}"
        opt_part = self.spread.save_optimizer(optimizer, self.out, tag, self.write)
        if not self.write:
            return path
        meta = self._meta(epoch=epoch, complete=complete, opt_step=opt_step, save_id=save_id)
        checkpoint.save_adapter(path, tensors, meta)
        checkpoint.save_train_state(self.out / checkpoint.TRAIN_STATE, resume.unit(
            save_id=save_id, adapter=path.name, tensors=tensors, meta=meta,
            epoch=epoch if not complete else epoch + 1, step_in_epoch=step_in_epoch if not complete else 0,
            opt_step=opt_step, micro_step=micro_step, optimizer_part=opt_part,
            rng=torch.get_rng_state() if rng is None else rng, config=meta["config"], data=prep.data_identity,
            valid=valid))
        self.spread.forget_old(self.out, keep=tag)
        return path

    def save_best(self, *, epoch: int, opt_step: int, valid_loss: float, complete: bool,
                  optimizer: torch.optim.Optimizer) -> Path:
        """rwkv-best.pth: the adapter of the best validation loss so far (the adapter alone: merge.sh best, the
        chat and tools.evaluate read it; a resume continues train_state.pth). Ctrl+C waits for it."""
        from .validate import BEST
        path = self.out / BEST
        with interrupt_deferred(what=f"{BEST} being written"):
            tensors = self._trained()
            if self.write:
                meta = self._meta(epoch=epoch, complete=complete, opt_step=opt_step, save_id="")
                meta["valid_loss"] = valid_loss
                checkpoint.save_adapter(path, tensors, meta)
        return path

    def append_losses(self, rows: list[tuple]) -> None:
        """Append ``rows`` to loss.csv and empty the list, both or neither: a Ctrl+C meanwhile waits, so
        no half row is written and no row twice (a full disk leaves the file as it was)."""
        import io

        from .files import append_text
        with interrupt_deferred():
            if self.write and rows:
                buf = io.StringIO()
                w = csv.writer(buf)
                if not self.csv_path.exists():
                    w.writerow(LOSS_COLUMNS)
                w.writerows(rows)
                append_text(self.csv_path, buf.getvalue())
            rows.clear()

    def _drop_rows_after(self, opt_step: int) -> None:
        """Resume: rows of loss.csv after the saved step (a run killed after writing them) go, so that the steps
        redone are not there twice."""
        from .files import write_bytes
        try:
            text = self.csv_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return
        lines = text.splitlines(keepends=True)
        keep = [ln for i, ln in enumerate(lines) if i == 0 or not ln.split(",", 1)[0].isdigit()
                or int(ln.split(",", 1)[0]) <= opt_step]
        keep = [ln for ln in keep if ln.endswith("\n")]           # a half row of an old version
        if keep and keep[0].rstrip("\r\n") == ",".join(LOSS_COLUMNS[:-1]):   # written before valid_loss: the
            keep = [",".join(LOSS_COLUMNS) + "\n"] + [ln[:-1] + ",\n" for ln in keep[1:]]   # column, empty
        if keep != lines:
            write_bytes(self.csv_path, "".join(keep))

    def plot(self) -> Path | None:
        if not self.write or not self.csv_path.exists():
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps, losses, valid = [], [], []
        with open(self.csv_path) as fh:
            for row in csv.DictReader(fh):
                steps.append(int(row["optimizer_step"]))
                losses.append(float(row["loss"]))
                if row.get("valid_loss"):
                    valid.append((steps[-1], float(row["valid_loss"])))
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(steps, losses, lw=1, alpha=0.5, label="loss")
        if len(losses) >= 10:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
        if valid:
            ax.plot(*zip(*valid), lw=2, marker="o", ms=4, label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.prep.cfg.FINETUNE_MODE} on {self.prep.cfg.DATA}")
        ax.grid(alpha=0.3)
        ax.legend()
        from .files import atomic_write
        try:
            with atomic_write(self.out / "loss.png") as fh:
                fig.savefig(fh, format="png")
        finally:
            plt.close(fig)
        return self.out / "loss.png"

    def sample(self, epoch: int, log: Callable[[str], None]) -> str:
        from .data.tokenizer import get_tokenizer
        from .files import append_text
        from .inference import generate
        model = self.prep.model
        tok = get_tokenizer()
        prompt = tok.encode(self.prep.cfg.SAMPLE_PROMPT)
        if max(prompt, default=0) >= model.cfg.vocab_size:   # a model with a custom small vocabulary
            append_text(self.out / "samples.txt", f"=== epoch {epoch}\n(no sample: the prompt's World-tokenizer ids "
                        f"do not fit this model's vocabulary of {model.cfg.vocab_size})\n\n")
            return ""
        was_training = model.training
        model.eval()
        rng = torch.get_rng_state()        # sampling must not change the training run's random stream
        try:
            with self.prep.plan.autocast():
                ids = generate(model, prompt, max_tokens=SAMPLE_TOKENS,
                               temperature=1.0, top_p=0.5, seed=self.prep.cfg.SEED)
            text = tok.decode([i for i in ids if i != 0])
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
        append_text(self.out / "samples.txt", f"=== epoch {epoch}\n{self.prep.cfg.SAMPLE_PROMPT}{text}\n\n")
        log(f"sample after epoch {epoch}: {self.prep.cfg.SAMPLE_PROMPT!r} → {text.strip()[:200]!r}")
        return text
