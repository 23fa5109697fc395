"""Training straight through and again one step at a time with a resume after each, the
check every exact-resume test makes (pretraining data, shards, mixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def straight_and_resumed(root: Path, steps: int, **settings: Any) -> tuple[list[dict], list[dict]]:
    """The loss records of `steps` steps run straight (in root/straight) and of the same
    run stopped after every step and resumed (in root/resumed), as interrupts would."""
    from gptkit.config import TrainConfig
    from gptkit.train import train

    settings = dict(settings, max_steps=steps)
    train(TrainConfig(out=str(root / "straight"), **settings), progress=False)
    train(TrainConfig(out=str(root / "resumed"), max_time=0.0, save_interval=0, **settings),
          progress=False)  # stops (and saves) after its first step
    for _ in range(steps - 1):
        train(TrainConfig(out=str(root / "resumed"), resume=True, max_time=0.0, **settings),
              progress=False)
    return loss_records(root / "straight"), loss_records(root / "resumed")


def loss_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]
