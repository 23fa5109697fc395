"""Teaching views: --show-probs matches the model's softmax; attention weights reproduce it."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_model_dir

from gptkit import GPT, Tokenizer
from gptkit.errors import GptkitError
from gptkit.explain import attention_map, attention_weights, explain_steps, show_probs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("explain") / "m", n_embd=32, block_size=24)
    return path, GPT.from_pretrained(path), Tokenizer.from_pretrained(path)


def next_probs(model: GPT, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return (model(torch.tensor([ids]))[0, -1] / temperature).softmax(-1)


def test_greedy_steps_show_the_models_softmax(tiny):
    _, model, tok = tiny
    vocab = model.config.vocab_size
    ids = tok.encode("Hello")
    steps = list(explain_steps(model, tok, "Hello", max_new_tokens=4, top=vocab))
    assert len(steps) == 4
    for step in steps:
        expected = next_probs(model, ids)
        probs = torch.tensor([c.prob for c in step.top])
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)  # every token listed
        assert (probs[:-1] >= probs[1:]).all()  # most likely first
        for c in step.top[:5]:
            assert c.prob == pytest.approx(expected[c.token_id].item(), abs=1e-6)
            assert c.text == tok.decode([c.token_id])
        assert step.chosen.token_id == int(expected.argmax())
        ids.append(step.chosen.token_id)


def test_sampling_uses_the_temperature_and_the_seed(tiny):
    _, model, tok = tiny

    def run(seed: int) -> list:
        return list(explain_steps(model, tok, "ab", max_new_tokens=6, top=3, do_sample=True,
                                  temperature=2.5, seed=seed))

    first, again = run(7), run(7)
    assert [s.chosen for s in first] == [s.chosen for s in again]
    expected = next_probs(model, tok.encode("ab"), temperature=2.5)
    chosen = first[0].chosen
    assert chosen.prob == pytest.approx(expected[chosen.token_id].item(), abs=1e-6)
    assert first[0].top[0].prob == pytest.approx(expected.max().item(), abs=1e-6)


def test_show_probs_prints_a_line_per_step_and_the_text(tiny):
    _, model, tok = tiny
    out = io.StringIO()
    steps = show_probs(model, tok, "Hi", max_new_tokens=3, top=2, file=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 3 + 2 and lines[-1] == "Hi" + "".join(s.chosen.text for s in steps)
    assert f"{steps[0].top[1].prob:.1%}" in lines[1]


def test_attention_weights_reproduce_the_models_attention_output(tiny):
    _, model, tok = tiny
    ids = torch.tensor([tok.encode("The cat sat on the mat.")])
    T = ids.size(1)
    for layer in range(model.config.n_layer):
        attn = model.transformer.h[layer].attn
        outputs = []
        handle = attn.register_forward_hook(lambda m, args, out, store=outputs: store.append(out))
        weights, values = attention_weights(model, ids, layer)
        handle.remove()
        assert weights.shape == (1, model.config.n_head, T, T)
        assert torch.allclose(weights.sum(-1), torch.ones(1, model.config.n_head, T))
        assert (weights.triu(1) == 0).all()  # nothing attends to the future
        mixed = (weights @ values).transpose(1, 2).reshape(1, T, model.config.n_embd)
        assert torch.allclose(attn.c_proj(mixed), outputs[0], atol=1e-5)


def test_attention_map_png_and_bad_layer_or_head(tiny, tmp_path):
    _, model, tok = tiny
    out = attention_map(model, tok, "To be, or not to be", tmp_path / "a.png", layer=1, head=3)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    with pytest.raises(GptkitError, match="--layer 2 does not exist"):
        attention_map(model, tok, "x", tmp_path / "b.png", layer=2)
    with pytest.raises(GptkitError, match="--head 4 does not exist"):
        attention_map(model, tok, "x", tmp_path / "b.png", head=4)
    with pytest.warns(UserWarning, match="keeping the last 24"):
        attention_map(model, tok, "y" * 30, tmp_path / "c.png")


def gptkit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_cli_show_probs_and_attention(tiny, tmp_path):
    path, model, tok = tiny
    result = gptkit("generate", "--model", path, "Hello", "--show-probs", "--greedy", "--top", "3",
                    "--max-new-tokens", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    first = next_probs(model, tok.encode("Hello"))
    assert f"{first.max().item():.1%}" in result.stdout.splitlines()[1]
    result = gptkit("attention", "--model", path, "Hello", "--layer", "1", "--head", "0", "--out",
                    tmp_path / "h.png", "--device", "cpu")
    assert result.returncode == 0 and (tmp_path / "h.png").stat().st_size > 1000
    result = gptkit("generate", "--model", path, "Hello", "--show-probs", "--top-p", "0.5")
    assert result.returncode == 2 and "--top-p" in result.stderr
