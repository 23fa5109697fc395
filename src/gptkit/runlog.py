"""Where a training run's numbers go: metrics.jsonl always; TensorBoard, Weights & Biases
and a loss plot when asked.

`metrics.jsonl` is the record scripts rely on: one JSON object per line, flushed at once.
Training lines carry step, tokens, loss, lr, tokens_per_s; evaluation lines step and
val_loss; events (skipped non-finite steps, loss spikes) an "event" name.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record (none for a missing file); a line torn by a crash mid-write,
    or being written by a running trainer, is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class RunLog:
    """Fan each record out to metrics.jsonl and the optional integrations."""

    def __init__(self, run_dir: Path, resume_step: int | None, *, tensorboard: bool = False,
                 wandb: bool = False, plot: bool = True, config: dict[str, Any] | None = None
                 ) -> None:
        self.run_dir = run_dir
        # the integrations first: one whose package is missing then leaves no file open
        self.tensorboard = _tensorboard_writer(run_dir) if tensorboard else None
        self.wandb = _wandb_run(run_dir, config or {}) if wandb else None
        path = run_dir / METRICS_NAME
        kept = [] if resume_step is None else [
            r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        # drop what was logged after the checkpoint we resume from
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")
        self.plot = plot

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "tokens_per_s")}
        if "val_loss" in record:
            scalars["val/loss"] = record["val_loss"]
            self._plot()
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def _plot(self) -> None:
        """Refresh loss.png so a user can watch the run; never fatal."""
        if not self.plot:
            return
        from gptkit.errors import GptkitError

        try:
            from gptkit.plot import plot_runs

            plot_runs([self.run_dir], self.run_dir / PLOT_NAME)
        except (ImportError, GptkitError):
            self.plot = False  # matplotlib is optional (the `viz` extra)
        except Exception as exc:  # a plotting problem must not stop training
            warnings.warn(f"could not draw {PLOT_NAME}: {exc}", stacklevel=2)
            self.plot = False

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard_writer(run_dir: Path) -> Any:
    from gptkit.errors import GptkitError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GptkitError("--tensorboard needs the tensorboard package, an optional extra; "
                          "install it with `pip install 'gptkit[tensorboard]'`.") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _wandb_run(run_dir: Path, config: dict[str, Any]) -> Any:
    """A W&B run; offline (synced later with `wandb sync`) when no API key is configured."""
    import os

    from gptkit.errors import GptkitError

    try:
        import wandb
    except ImportError:
        raise GptkitError("--wandb needs the wandb package, an optional extra; install it with "
                          "`pip install 'gptkit[wandb]'`.") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "offline":
        print("wandb: no WANDB_API_KEY, logging offline into the run directory", file=sys.stderr)
    return wandb.init(project=config.get("wandb_project", "gptkit"), dir=str(run_dir),
                      config=config, mode=mode, name=run_dir.name)
