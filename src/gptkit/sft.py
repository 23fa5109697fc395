"""Supervised fine-tuning data: (prompt, target) texts -> token ids with loss masks, and
the batches that feed them to training and evaluation.

Each pair becomes `prompt + target + <|endoftext|>`; only the target tokens and the
end-of-text carry loss, the prompt is masked with IGNORE_INDEX. An example longer than
the context loses the start of its prompt. `SFTBatches` shuffles examples per epoch from
the seed and resumes exactly. Rendering records into text is the task's job (`gptkit.tasks`;
conversations: `gptkit.conversation`).

Packing (`pack`): short examples share rows of the context's width, each starting clean:
its own positions from 0, attention only within itself (a block-diagonal causal mask), and
no loss on the boundary, so every token's loss is what it would be alone. Packed batches
carry `position_ids` and `attn_mask` for the model's forward as a third element.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gptkit.errors import GptkitError
from gptkit.kernels import IGNORE_INDEX
from gptkit.tokenizer import Tokenizer

Encoded = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX on the prompt)
Packed = list[Encoded]  # examples sharing one row
# (x, y) or (x, y, forward keyword arguments): what a batch of `SFTBatches` is
Batch = tuple[torch.Tensor, ...] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def encode_pair(tokenizer: Tokenizer, prompt_text: str, target_text: str,
                max_tokens: int) -> tuple[Encoded, bool]:
    """(ids, labels) of one prompt and target within `max_tokens`, and whether it had to be cut.

    The prompt loses its beginning first; a target too long on its own keeps its start
    (and then has no end-of-text).
    """
    prompt = tokenizer.encode(prompt_text)
    target = tokenizer.encode(target_text) + [tokenizer.eos_token_id]
    cut = len(prompt) + len(target) > max_tokens
    if cut:
        target = target[:max_tokens - 1]  # one prompt token at least, so the target is predicted
        prompt = prompt[len(prompt) - (max_tokens - len(target)):]
    return (prompt + target, [IGNORE_INDEX] * len(prompt) + target), cut


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], block_size: int,
                 name: str, progress: bool = True) -> list[Encoded]:
    """Every (prompt, target) text pair encoded for a context of `block_size`; says how many
    were cut."""
    encoded, cut = [], 0
    for prompt_text, target_text in pairs:
        pair, was_cut = encode_pair(tokenizer, prompt_text, target_text, block_size + 1)
        encoded.append(pair)
        cut += was_cut
    if cut and progress:
        print(f"note: {cut} of {len(pairs)} examples in {name} are longer than the context of "
              f"{block_size} tokens; the beginning of their prompts was cut.", file=sys.stderr)
    return encoded


def collate(rows: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (x, y): x the ids but the last, y the labels shifted left by one."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


def pack(examples: Sequence[Encoded], width: int) -> list[Packed]:
    """Examples grouped into rows of at most `width` positions (an example of n tokens
    takes n - 1: its inputs), best fit, longest first; the grouping depends only on the
    examples, so a resumed run packs alike."""
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[Packed] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        need = len(examples[i][0]) - 1
        at = bisect.bisect_left(free, (need, -1))  # the fullest row that still has room
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = width, len(rows)
            rows.append([])
        rows[row].append(examples[i])
        if room > need:
            bisect.insort(free, (room - need, row))
    return rows


def collate_packed(rows: Sequence[Packed], pad_id: int) -> Batch:
    """(x, y, {"position_ids", "attn_mask"}) of packed rows, right-padded to the longest.

    Each example contributes its own (x, y) pairs, so no position predicts across a
    boundary; positions restart at 0 and the mask (B, 1, T, T) lets a token attend only
    to earlier tokens of its own example (padding forms one more, loss-free segment).
    """
    width = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, labels) in enumerate(row):
            n = len(ids) - 1
            x[r, at:at + n] = torch.tensor(ids[:-1])
            y[r, at:at + n] = torch.tensor(labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            segments[r, at:at + n] = s
            at += n
        positions[r, at:] = torch.arange(width - at)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
    return x, y, {"position_ids": positions, "attn_mask": mask[:, None]}


def batch_on(batch: Batch, device: torch.device, non_blocking: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x, y, forward keyword arguments) of any batch, (x, y) or packed, on `device`."""
    extra = batch[2] if len(batch) > 2 else {}
    return (batch[0].to(device, non_blocking=non_blocking),
            batch[1].to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in extra.items()})


def _collate(rows: Sequence[Encoded] | Sequence[Packed], pad_id: int, packed: bool) -> Batch:
    return collate_packed(rows, pad_id) if packed else collate(rows, pad_id)  # type: ignore[arg-type]


class SFTBatches:
    """Examples (or packed rows of them) in a fresh seeded order every epoch, `batch_size`
    at a time; resumable.

    Under torchrun every rank walks the same order, taking `batch_size * world_size`
    examples per step and keeping its own slice, so ranks see disjoint examples.
    """

    def __init__(self, examples: Sequence[Encoded] | Sequence[Packed], batch_size: int, seed: int,
                 pad_id: int, rank: int = 0, world_size: int = 1, packed: bool = False) -> None:
        if not examples:
            raise GptkitError("no training examples; expected at least one record.")
        self.examples = examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pad_id = pad_id
        self.packed = packed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_batch(self) -> Batch:
        rows = []
        while len(rows) < self.batch_size * self.world_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            rows.append(self.examples[self._order[self.position]])
            self.position += 1
        return _collate(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size],
                        self.pad_id, self.packed)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle()


def iter_sft_batches(examples: Sequence[Encoded] | Sequence[Packed], batch_size: int, pad_id: int,
                     max_batches: int | None = None, packed: bool = False) -> Iterator[Batch]:
    """Examples (or packed rows) in file order, for evaluation (the same batches every time)."""
    for n, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield _collate(examples[start:start + batch_size], pad_id, packed)
