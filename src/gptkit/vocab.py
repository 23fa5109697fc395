"""Growing a model's vocabulary: rows for the tokens its tokenizer gained (chat tokens).

`grow_vocab` gives the token embedding (and an untied LM head) a row for every id of the
tokenizer and starts the rows of the new tokens at the mean of the trained rows, plus a
little noise (Hewitt 2021, and transformers' `mean_resizing`): a new token begins as an
average token, neither predicted strongly nor unlike the others, so the first steps of
fine-tuning do not spike. Rows a padded vocabulary already had (GPT-2's 50,304) are reused.

A LoRA run freezes the embedding, yet the new tokens must learn what they mean:
`train_rows` adds a trainable delta to just those rows (a parametrization of the weight,
shared by a tied head), and `fold_rows` folds it in for saving.

    grow_vocab(model, len(tokenizer_vocab), new=range(50257, 50259))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from gptkit.model import GPT


@torch.no_grad()
def grow_vocab(model: GPT, vocab_size: int, new: range, seed: int = 0) -> None:
    """Resize `model` (in place) to `vocab_size` rows if it has fewer, and set the rows
    `new` to the mean of rows 0..new.start-1 plus noise of a thousandth of their spread."""
    old = model.config.vocab_size
    if vocab_size > old:
        model.transformer.wte = _grown_embedding(model.transformer.wte, vocab_size)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        else:
            model.lm_head = _grown_head(model.lm_head, vocab_size)
        model.config.vocab_size = vocab_size
    model.token_limit = max(model.token_limit, new.stop)
    generator = torch.Generator().manual_seed(seed)
    matrices = [model.transformer.wte.weight]
    if not model.config.tie_word_embeddings:
        matrices.append(model.lm_head.weight)
    for weight in matrices:
        trained = weight[:new.start].float()
        mean, spread = trained.mean(0), trained.std(0)
        noise = torch.randn((len(new), weight.size(1)), generator=generator) * spread.cpu() * 1e-3
        weight[new.start:new.stop] = (mean + noise.to(mean.device)).to(weight.dtype)


def _grown_embedding(embedding: nn.Embedding, rows: int) -> nn.Embedding:
    weight = embedding.weight
    grown = nn.Embedding(rows, weight.size(1), device=weight.device, dtype=weight.dtype)
    grown.weight.data[:weight.size(0)] = weight.data
    grown.weight.requires_grad_(weight.requires_grad)
    return grown


def _grown_head(head: nn.Linear, rows: int) -> nn.Linear:
    weight = head.weight
    grown = nn.Linear(weight.size(1), rows, bias=False, device=weight.device, dtype=weight.dtype)
    grown.weight.data[:weight.size(0)] = weight.data
    grown.weight.requires_grad_(weight.requires_grad)
    return grown


class RowDelta(nn.Module):
    """A weight with a trainable delta added to rows `start`..`start + n - 1` only."""

    def __init__(self, start: int, n: int, dim: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.start = start
        self.delta = nn.Parameter(torch.zeros(n, dim, device=device, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        stop = self.start + self.delta.size(0)
        return torch.cat([weight[:self.start], weight[self.start:stop] + self.delta,
                          weight[stop:]])


def train_rows(model: GPT, rows: range) -> None:
    """Let the rows `rows` of the embedding (and of an untied head) train on an otherwise
    frozen model; a tied head shares the embedding's delta."""
    wte = model.transformer.wte
    delta = RowDelta(rows.start, len(rows), wte.weight.size(1), wte.weight.device, wte.weight.dtype)
    parametrize.register_parametrization(wte, "weight", delta)
    head = model.lm_head
    if model.config.tie_word_embeddings:
        parametrize.register_parametrization(head, "weight", delta)
    else:
        parametrize.register_parametrization(head, "weight", RowDelta(
            rows.start, len(rows), head.weight.size(1), head.weight.device, head.weight.dtype))


def row_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable row deltas of `train_rows`, by module ("wte", and "lm_head" when the
    head is untied), on the CPU."""
    out, seen = {}, set()
    for name, module in (("wte", model.transformer.wte), ("lm_head", model.lm_head)):
        if parametrize.is_parametrized(module, "weight"):
            delta = module.parametrizations.weight[0].delta
            if id(delta) not in seen:  # a tied head shares the embedding's
                seen.add(id(delta))
                out[name] = delta.detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_row_deltas(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy deltas saved by `row_deltas` back into a model prepared by `train_rows`."""
    for name, module in (("wte", model.transformer.wte), ("lm_head", model.lm_head)):
        if name in state and parametrize.is_parametrized(module, "weight"):
            module.parametrizations.weight[0].delta.copy_(state[name])


@torch.no_grad()
def fold_rows(model: GPT) -> GPT:
    """`model` (in place) with its row deltas folded into a plain embedding and head, ties
    kept. (New modules rather than `remove_parametrizations`, which edits the class that a
    model and its deep copies share.)"""
    wte, head = model.transformer.wte, model.lm_head
    if not (parametrize.is_parametrized(wte, "weight") or parametrize.is_parametrized(head, "weight")):
        return model
    weight = wte.weight.detach().clone()
    model.transformer.wte = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
    model.transformer.wte.weight = nn.Parameter(weight)
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(weight.size(1), weight.size(0), bias=False,
                                  device=weight.device, dtype=weight.dtype)
        model.lm_head.weight = model.transformer.wte.weight
    else:
        head_weight = head.weight.detach().clone()
        model.lm_head = nn.Linear(head_weight.size(1), head_weight.size(0), bias=False,
                                  device=head_weight.device, dtype=head_weight.dtype)
        model.lm_head.weight = nn.Parameter(head_weight)
    return model
