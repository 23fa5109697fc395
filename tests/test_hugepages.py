"""Weights moved into 2 MiB pages: same values, dtypes and sharing, one block the kernel
may back with huge pages, and an optimized model that decodes the same tokens from it."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gptkit.inference
from gptkit.config import GPTConfig
from gptkit.generate import generate
from gptkit.inference import optimize_for_inference
from gptkit.kernels.hugepages import HUGE_PAGE, huge_pages_available, move_to_huge_pages
from gptkit.model import GPT


def mapping_of(tensor: torch.Tensor) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `tensor`'s first byte."""
    address = tensor.data_ptr()
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                inside = int(span[1], 16) <= address < int(span[2], 16)
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


class Holder(nn.Module):
    """Tensors of every kind a model holds: a trainable parameter shared with a child, a
    frozen one, an int8 buffer, a non-contiguous buffer, an empty slot, an embedding table
    of its own and one shared with a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(1024, 600))  # 2.4 MB
        self.frozen = nn.Parameter(torch.randn(7, 3), requires_grad=False)
        self.register_buffer("codes", torch.randint(-128, 127, (333,), dtype=torch.int8))
        self.register_buffer("strided", torch.randn(64, 32).t())
        self.register_buffer("nothing", None)
        self.child = nn.Linear(600, 1024, bias=False)
        self.child.weight = self.big
        self.lookup = nn.Embedding(1000, 600)
        self.tied = nn.Embedding(1024, 600)
        self.tied.weight = self.big


@pytest.mark.skipif(not huge_pages_available(), reason="needs Linux transparent huge pages")
def test_moved_tensors_keep_values_dtypes_and_sharing_in_one_huge_page_block():
    holder = Holder()
    before = {name: t.clone() for name, t in holder.state_dict().items()}
    lookup = holder.lookup.weight.data_ptr()
    assert move_to_huge_pages(holder) is True
    # a table only looked up stays where it was; one a linear layer streams moves
    assert holder.lookup.weight.data_ptr() == lookup
    assert holder.tied.weight is holder.big
    after = holder.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
        assert tensor.is_contiguous() and tensor.data_ptr() % 64 == 0, name
    assert holder.child.weight is holder.big and isinstance(holder.big, nn.Parameter)
    assert holder.big.requires_grad and not holder.frozen.requires_grad
    assert holder.nothing is None
    starts = sorted(t.data_ptr() for t in (holder.big, holder.frozen, holder.codes,
                                            holder.strided))
    assert starts[0] % HUGE_PAGE == 0 and starts[-1] - starts[0] < HUGE_PAGE + (1 << 20)
    assert mapping_of(holder.big)["THPeligible"] == "1"
    # a moved parameter still trains
    holder.child(torch.ones(2, 600)).sum().backward()
    assert torch.equal(holder.big.grad, torch.full((1024, 600), 2.0))


def test_small_modules_and_systems_without_huge_pages_stay_put(monkeypatch):
    small = nn.Linear(64, 64)
    address = small.weight.data_ptr()
    assert move_to_huge_pages(small) is False
    assert small.weight.data_ptr() == address
    monkeypatch.setattr("gptkit.kernels.hugepages.huge_pages_available", lambda: False)
    holder = Holder()
    address = holder.big.data_ptr()
    assert move_to_huge_pages(holder) is False
    assert holder.big.data_ptr() == address


@pytest.mark.parametrize("available", [True, False])  # too small for huge pages, or none here
def test_tensors_at_any_byte_get_an_aligned_block_when_asked(monkeypatch, available):
    # as safetensors maps them: a tensor may start at any byte of the file
    raw = torch.randint(-128, 127, (64 * 48 + 5,), dtype=torch.int8)
    small = nn.Linear(48, 64)
    small.register_buffer("codes", raw[5:].view(64, 48))
    before = small.codes.clone()
    assert small.codes.data_ptr() % 64 != 0
    monkeypatch.setattr("gptkit.kernels.hugepages.huge_pages_available", lambda: available)
    assert move_to_huge_pages(small, align_anyway=True) is False
    assert small.codes.data_ptr() % 64 == 0 and torch.equal(small.codes, before)
    assert small.weight.data_ptr() % 64 == 0 and small.bias.data_ptr() % 64 == 0


@pytest.mark.skipif(not huge_pages_available(), reason="needs Linux transparent huge pages")
def test_optimized_model_decodes_the_same_tokens_from_huge_pages(monkeypatch):
    config = GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=128)
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    prompt = torch.randint(0, 4096, (2, 5))

    def decode(move: bool) -> tuple[GPT, torch.Tensor]:
        model = GPT(config)
        model.load_state_dict(state)
        if not move:
            monkeypatch.setattr(gptkit.inference, "move_to_huge_pages", lambda module, **options: False)
        model = optimize_for_inference(model)
        monkeypatch.undo()
        return model, generate(model, prompt, max_new_tokens=12, eos_token_id=None)

    moved, tokens = decode(move=True)
    _, reference = decode(move=False)
    assert torch.equal(tokens, reference)
    assert mapping_of(moved.lm_head.tiles)["THPeligible"] == "1"
    assert mapping_of(moved.transformer.h[0].mlp.c_fc.weight_t)["THPeligible"] == "1"
