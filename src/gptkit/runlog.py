"""Where a training run's numbers go: metrics.jsonl always, then any sinks the run asks
for (TensorBoard, Weights & Biases here; the live loss plot in `gptkit.plot`).

`metrics.jsonl` is the record scripts rely on: one JSON object per line, flushed at once.
Training lines carry step, tokens, loss, lr, tokens_per_s; evaluation lines step and
val_loss; events (skipped non-finite steps, loss spikes) an "event" name.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from gptkit.errors import GptkitError

METRICS_NAME = "metrics.jsonl"


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


DEMO_MODEL_DIR = "model"  # where `gptkit demo` puts its run inside its output folder


def run_or_model_dir(directory: Path) -> Path:
    """`directory`, or the run inside it when it is a `gptkit demo` output folder (whose
    corpus, tokenizer and data sit beside the run in `model/`)."""
    inner = directory / DEMO_MODEL_DIR
    if not (directory / METRICS_NAME).exists() and not (directory / "config.json").exists() \
            and ((inner / METRICS_NAME).exists() or (inner / "config.json").exists()):
        return inner
    return directory


class Sink(Protocol):
    """Somewhere a run's numbers go besides metrics.jsonl (TensorBoard, W&B, a live plot)."""

    def log(self, step: int, scalars: dict[str, float], is_eval: bool) -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Write each record to metrics.jsonl and fan its scalars out to the `sinks`."""

    def __init__(self, run_dir: Path, resume_step: int | None, sinks: list[Sink] | None = None
                 ) -> None:
        self.run_dir = run_dir
        self.sinks = list(sinks or [])
        path = run_dir / METRICS_NAME
        kept = [] if resume_step is None else [
            r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        # drop what was logged after the checkpoint we resume from
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"train/{k}": v for k, v in record.items() if k in ("loss", "lr", "tokens_per_s")}
        if "val_loss" in record:
            scalars["val/loss"] = record["val_loss"]
        scalars.update({k: v for k, v in record.items() if k.startswith("benchmark/")})
        if scalars:
            for sink in self.sinks:
                sink.log(record.get("step", 0), scalars, "val_loss" in record)

    def close(self) -> None:
        self.file.close()
        for sink in self.sinks:
            sink.close()


EXTRA_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # by flag


def require_extra(name: str) -> Any:
    """The module behind --`name`, an optional extra, or the one sentence that says how to
    install it; a run calls this before it prints or creates anything."""
    try:
        return importlib.import_module(EXTRA_MODULES[name])
    except ImportError:
        raise GptkitError(f"--{name} needs the {name} package, an optional extra; install it "
                          f"with `pip install 'gptkit[{name}]'`.") from None


class TensorBoardSink:
    """Scalars into run_dir/tensorboard (the `tensorboard` extra)."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = require_extra("tensorboard").SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], is_eval: bool) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run (the `wandb` extra); offline, synced later with `wandb sync`, when no API
    key is configured."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        wandb = require_extra("wandb")
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "offline":
            print("wandb: no WANDB_API_KEY, logging offline into the run directory", file=sys.stderr)
        self.run = wandb.init(project=config.get("wandb_project", "gptkit"), dir=str(run_dir),
                              config=config, mode=mode, name=run_dir.name)

    def log(self, step: int, scalars: dict[str, float], is_eval: bool) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
