"""Training on several prepared directories in fixed proportions.

    gptkit train --data web=DIR:0.7 --data code=DIR:0.3 ...

Each batch comes whole from one source. Step t takes the source furthest behind its share
(weight * (t + 1) - batches taken so far, ties to the first listed), so after any number
of steps every source's count of batches is within one of its proportion; the schedule
needs no random numbers, and each source's windows come from its own `TokenBatches`: a
mixture is reproducible and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.data import TokenBatches, load_meta, load_tokens
from gptkit.errors import GptkitError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Source:
    """One entry of a mixture: a name, a prepared directory and its share of batches."""

    name: str
    directory: Path
    weight: float


def is_mixture(spec: str) -> bool:
    """Whether `--data` names a mixture (`name=DIR:weight`, comma-separated) or one
    directory."""
    return "=" in spec and not Path(spec).exists()


def parse_mixture(spec: str) -> list[Source]:
    """`web=DIR:0.7,code=DIR:0.3` as sources with weights that sum to 1."""
    sources = []
    for entry in spec.split(","):
        name, _, rest = entry.partition("=")
        directory, _, weight = rest.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not name or not directory or value <= 0:
            raise GptkitError(f"--data {entry} is not NAME=DIR:WEIGHT with a positive weight "
                              "(e.g. --data web=data/web:0.7).")
        sources.append(Source(name, Path(directory), value))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise GptkitError(f"--data names a source twice ({', '.join(names)}); give each "
                          "source its own name.")
    total = sum(s.weight for s in sources)
    return [Source(s.name, s.directory, s.weight / total) for s in sources]


def check_sources(sources: list[Source]) -> dict[str, Any]:
    """The first source's meta, after checking every source has the same tokenizer."""
    metas = [load_meta(s.directory) for s in sources]
    for source, meta in zip(sources, metas, strict=True):
        if meta["tokenizer_hash"] != metas[0]["tokenizer_hash"]:
            raise GptkitError(f"--data {source.name}={source.directory} was tokenized with "
                              f"another tokenizer than {sources[0].directory}; prepare every "
                              "source with one tokenizer.")
    return metas[0]


class MixtureBatches:
    """Batches from several sources in fixed proportions (see the module docstring)."""

    def __init__(self, sources: list[Source], block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu") -> None:
        self.sources = sources
        self.tokens_per_batch = block_size * batch_size * world_size
        # each source its own seed, so adding a source does not change another's windows
        self.batches = [TokenBatches(load_tokens(s.directory, "train"), block_size, batch_size,
                                     seed + k, rank, world_size, device, split=f"{s.name} train")
                        for k, s in enumerate(sources)]
        self.taken = [0] * len(sources)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = sum(self.taken)
        behind = [s.weight * (step + 1) - n for s, n in zip(self.sources, self.taken, strict=True)]
        k = behind.index(max(behind))
        self.taken[k] += 1
        return self.batches[k].next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Every source's batch state and batches taken; `tokens_by_source` for the log."""
        return {"sources": [b.state_dict() for b in self.batches], "taken": list(self.taken),
                "tokens_by_source": {f"tokens_{s.name}": n * self.tokens_per_batch
                                     for s, n in zip(self.sources, self.taken, strict=True)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("sources", [])) != len(self.batches):
            raise GptkitError(f"the run was saved with {len(state.get('sources', []))} data "
                              f"sources, not {len(self.batches)}; resume with the same --data.")
        for batches, saved in zip(self.batches, state["sources"], strict=True):
            batches.load_state_dict(saved)
        self.taken = [int(n) for n in state["taken"]]
