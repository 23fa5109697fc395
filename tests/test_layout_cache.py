"""Quantized layouts saved in the cache: a second load reads them instead of quantizing
the checkpoint again, holds the same tensors and computes the same logits; a changed
checkpoint, a damaged file or an unwritable cache never gives wrong or no weights."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from serve_helpers import make_model_dir

import gptkit.inference
from gptkit.generate import generate
from gptkit.inference import load_directory, optimize_for_inference
from gptkit.kernels.int4 import Int4Linear
from gptkit.kernels.int8 import Int8Linear
from gptkit.model import GPT

PROMPT = torch.tensor([[5, 9, 2, 17, 3, 11]])


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    return make_model_dir(tmp_path / "tiny", block_size=64)


def saved_layouts(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "layouts").iterdir())


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT)


def fresh(model_dir, quantize: str) -> GPT:
    """The checkpoint quantized now, bypassing every cache."""
    return optimize_for_inference(GPT.from_pretrained(model_dir), quantize=quantize)


@pytest.mark.parametrize("quantize, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_the_second_load_reads_the_saved_layout_not_the_checkpoint(model_dir, tmp_path,
                                                                   monkeypatch, quantize, layer):
    first, _ = load_directory(model_dir, "cpu", quantize=quantize)
    assert [path.name.endswith(f"-{quantize}-float32.safetensors")
            for path in saved_layouts(tmp_path)] == [True]

    def done_again(*args):
        raise AssertionError("the checkpoint was read or quantized again")

    monkeypatch.setattr(gptkit.inference.checkpoint, "load", done_again)
    monkeypatch.setattr(layer, "quantized", done_again)
    second, tokenizer = load_directory(model_dir, "cpu", quantize=quantize)
    assert isinstance(second.lm_head, layer) and isinstance(second.transformer.h[1].mlp.c_fc, layer)
    expected = dict(first.named_buffers()) | dict(first.named_parameters())
    restored = dict(second.named_buffers()) | dict(second.named_parameters())
    assert restored.keys() == expected.keys()
    for name, tensor in expected.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    assert torch.equal(logits(second), logits(first))
    assert second.token_limit == tokenizer.vocab_size
    assert torch.equal(generate(second, PROMPT, max_new_tokens=8, eos_token_id=None),
                       generate(first, PROMPT, max_new_tokens=8, eos_token_id=None))


def test_a_changed_checkpoint_is_quantized_afresh(model_dir, tmp_path):
    load_directory(model_dir, "cpu", quantize="int8")
    files = [model_dir / "model.safetensors", model_dir / "config.json"]
    times = [(path.stat().st_atime_ns, path.stat().st_mtime_ns) for path in files]
    changed = GPT.from_pretrained(model_dir)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight.mul_(-1)
    changed.save_pretrained(model_dir)
    # saved again within the clock's resolution: same sizes, same times, new files
    for path, ns in zip(files, times, strict=True):
        os.utime(path, ns=ns)
    loaded, _ = load_directory(model_dir, "cpu", quantize="int8")
    assert torch.equal(logits(loaded), logits(fresh(model_dir, "int8")))
    assert len(saved_layouts(tmp_path)) == 1  # replaced, not added beside


def test_a_damaged_saved_layout_is_written_again(model_dir, tmp_path):
    load_directory(model_dir, "cpu", quantize="int4")
    [path] = saved_layouts(tmp_path)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:size // 2])
    loaded, _ = load_directory(model_dir, "cpu", quantize="int4")
    assert torch.equal(logits(loaded), logits(fresh(model_dir, "int4")))
    assert path.stat().st_size == size


def test_an_unwritable_cache_costs_a_warning_not_the_model(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path / "tiny", block_size=64)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not save the quantized weights"):
        loaded, _ = load_directory(model_dir, "cpu", quantize="int8")
    assert torch.equal(logits(loaded), logits(fresh(model_dir, "int8")))


def test_unquantized_layouts_are_not_saved(model_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_directory(model_dir, "cpu", fast=True)
    assert not (tmp_path / "cache").exists()
