"""Speed kernels: how the model's operations are computed, never what they compute.

The network in `gptkit.model` reads like a textbook and calls this package through one
seam: `attention`, `gelu_tanh` and `lm_head_loss` (what training's forward uses);
`gptkit.inference` builds its fast decoding layouts from `linear`, `int8`, `rowwise` and
`hugepages`. Every kernel here computes the same values as the plain PyTorch expression
it replaces (tests compare them); only time and memory differ.
"""

from __future__ import annotations

import torch
from torch import nn

from gptkit.kernels.crossentropy import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from gptkit.kernels.ops import attention, gelu_tanh

__all__ = ["IGNORE_INDEX", "attention", "gelu_tanh", "lm_head_loss"]


def lm_head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                 softcap: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `targets`, with the logits
    soft-capped to `softcap * tanh(logits / softcap)` when `softcap` is not 0.

    A plain bias-free linear head runs fused with its loss, never keeping the logits (see
    `crossentropy`); any other head (an inference layout, int8) computes logits first.
    """
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(hidden, head.weight, targets, softcap)
    logits = head(hidden)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return cross_entropy(logits, targets)
