"""The LM head and its cross-entropy as one autograd step, for training.

With a large vocabulary the head dominates a small model's step: for the `small` preset
(384 wide, 50k vocabulary) its three matmuls are two thirds of the FLOPs, and the
logits tensor (tokens x vocabulary, 400 MB at batch 8 x 256) is read and written about
ten times by the usual log_softmax -> nll -> backward chain. Here the softmax gradient
is computed in place in the logits buffer during the forward: a few passes over one big
buffer instead of three buffers, and the backward is two matmuls. On CPU, fp32 logits
are computed as weight @ hidden^T (vocabulary-major), the orientation in which MKL's GEMM
runs at full speed for this shape (about 30% faster than hidden @ weight^T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value (masked prompt tokens, padding) add no loss


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (in fp32) over targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, skipping IGNORE_INDEX.

    hidden (..., C), weight (V, C), targets (...). Equals
    `cross_entropy(F.linear(hidden, weight), targets)`, also under autocast, where the
    matmuls run in the autocast dtype and the loss is summed in fp32. With gradients
    enabled the forward also forms d(loss)/d(logits), so that the backward is two matmuls.
    A nonzero `softcap` first maps the logits z to softcap * tanh(z / softcap).
    """
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, softcap)
    with torch.autocast(device, enabled=False):
        logits = _vocabulary_major_logits(hidden.to(dtype), weight.to(dtype))
        _soft_cap(logits, softcap)
        return _exp_and_loss(logits, targets)[0]


def _soft_cap(logits: torch.Tensor, softcap: float) -> torch.Tensor | None:
    """Cap `logits` in place to softcap * tanh(logits / softcap); returns the slope of that
    map at each logit, 1 - tanh^2 (None when softcap is 0: no cap)."""
    if not softcap:
        return None
    logits.div_(softcap).tanh_()
    slope = 1 - logits.square()
    logits.mul_(softcap)
    return slope


def _vocabulary_major_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits as (V, N), each column one token. On CPU, MKL computes fp32 logits faster
    as weight @ hidden^T and bf16 ones faster as hidden @ weight^T, which is then viewed
    transposed (docs/performance.md has the timings)."""
    if weight.dtype == torch.float32 and weight.device.type == "cpu":
        return weight @ hidden.t()
    return (hidden @ weight.t()).t()


def _exp_and_loss(logits: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over valid targets; overwrites `logits` (V, N) with exp(logit - column max).

    Also returns, per column: the sum of those exps (the softmax's denominator), the
    column's weight in the mean (1/n for a valid target, 0 for an ignored one) and the
    row of its target (0 for an ignored one).
    """
    valid = targets != IGNORE_INDEX
    picked = torch.where(valid, targets, 0)
    target_logit = logits.gather(0, picked.unsqueeze(0)).squeeze(0).float()
    peak = logits.amax(0)
    total = logits.sub_(peak).exp_().sum(0, dtype=torch.float32)
    log_norm = peak.float() + total.log()  # log-sum-exp of each column
    weights = valid.float() / valid.sum().clamp(min=1)
    loss = ((log_norm - target_logit) * weights).sum()
    return loss, total, weights, picked


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and d(loss)/d(logits); backward is two matmuls."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype, softcap: float = 0.0) -> torch.Tensor:
        device = hidden.device.type
        with torch.autocast(device, enabled=False):
            hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
            logits = _vocabulary_major_logits(hidden_c, weight_c)
            slope = _soft_cap(logits, softcap)
            loss, total, weights, picked = _exp_and_loss(logits, targets)
            # softmax - one_hot(target): the gradient of each column's loss
            logits.div_(total.to(logits.dtype))
            logits[picked, torch.arange(targets.numel(), device=hidden.device)] -= 1
            if slope is not None:  # through the cap: d/dz = d/d(capped) * (1 - tanh^2)
                logits.mul_(slope)
        ctx.save_for_backward(hidden_c, weight_c, logits, weights)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden_c, weight_c, grad_logits, weights = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scale = (weights * grad_loss).unsqueeze(1)  # (N, 1): the mean, the upstream gradient
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits.t() @ weight_c).float() * scale).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits @ (hidden_c.float() * scale).to(hidden_c.dtype))
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None
