"""The fused LM head + cross-entropy gives the loss and gradients of the plain chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptkit import GPT, GPTConfig
from gptkit.inference import optimize_for_inference
from gptkit.kernels.crossentropy import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def inputs(dtype: torch.dtype, n: int = 37, width: int = 24, vocab: int = 301):
    torch.manual_seed(0)
    hidden = torch.randn(n, width, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, width, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[[0, 5, 6]] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, upstream: float = 2.5):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets)
    (loss * upstream).backward()  # an upstream gradient other than 1, as under grad_accum
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def plain(hidden, weight, targets):
    return cross_entropy(F.linear(hidden, weight), targets)


# float32 takes the CPU's vocabulary-major matmul, float64 the other orientation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_equal_the_plain_chain(dtype):
    hidden, weight, targets = inputs(dtype)
    expected = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    for a, b in zip(got, expected, strict=True):  # the plain chain's softmax runs in fp32
        torch.testing.assert_close(a.to(dtype), b.to(dtype), rtol=1e-5, atol=1e-6)
    assert got[1][[0, 5, 6]].abs().max() == 0  # ignored positions get no gradient


def test_under_bf16_autocast_matches_the_plain_chain_at_bf16_precision():
    hidden, weight, targets = inputs(torch.float32, n=64, width=64, vocab=1000)
    with torch.autocast("cpu", torch.bfloat16):
        expected = loss_and_grads(plain, hidden, weight, targets)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=2e-3, atol=0)
    for a, b in zip(got[1:], expected[1:], strict=True):
        assert (a - b).norm() / b.norm() < 2e-2


def test_without_gradients_it_only_computes_the_loss():
    hidden, weight, targets = inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain(hidden, weight, targets).detach())


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, weight, targets = inputs(torch.float32)
    targets[:] = IGNORE_INDEX
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert loss == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_model_with_targets_returns_the_loss_of_its_logits_and_the_same_gradients():
    model = tiny_model()
    x = torch.randint(0, 97, (3, 16))
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = IGNORE_INDEX
    cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = model(x, targets=y)
    loss.backward()
    torch.testing.assert_close(loss, cross_entropy(model(x), y))
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_compiled_model_traces_the_fused_loss_in_one_graph():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 16))
    expected = model(x, targets=x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, targets=x), expected)


def test_a_replaced_head_still_gives_the_loss():
    model = optimize_for_inference(tiny_model(), quantize="int8")
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(model(x, targets=x), cross_entropy(model(x), x))
