"""Attention and activation kernels, chosen per call for the device and the compiler.

The model asks for "causal attention over these heads" and "GELU"; this module decides
how to compute them. Outside `torch.compile` that is PyTorch's own fused kernels
(SDPA's flash and memory-efficient paths, `F.gelu`). While the compiler traces a CPU
graph, some are written out so that inductor fuses them into the surrounding kernels,
which measured faster there (docs/performance.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Below this many positions, compiled CPU attention is written out: SDPA's CPU flash
# kernel has a per-block overhead that dominates short contexts.
COMPILED_MATH_ATTENTION_MAX_T = 256
GELU_TWO_Z = 2 * math.sqrt(2 / math.pi)  # tanh(z) = 2 sigmoid(2z) - 1


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, dropout_p: float = 0.0, scale: float | None = None
              ) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hs)) V for q (B, nh, T, hs) over k, v (B, nkv, S, hs); `scale`
    replaces 1 / sqrt(hs) where a family says so (Gemma's query_pre_attn_scalar).

    Either `is_causal` (S == T, training and scoring), or `attn_mask` (B or 1, 1, T, S):
    the key slots each query may see (True = attend), as generation over a KV cache
    builds it. With fewer key/value heads than query heads (grouped-query attention,
    nh = g * nkv), key/value head j serves query heads j*g .. j*g + g-1.
    """
    if torch.compiler.is_compiling() and q.device.type == "cpu" and dropout_p == 0.0:
        if is_causal and q.size(-2) <= COMPILED_MATH_ATTENTION_MAX_T:
            return causal_attention(q, k, v, scale)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # a decode step: the written-out form fuses into the step's own kernels,
            # where SDPA stays a separate call with a fixed cost
            return masked_attention(q, k, v, attn_mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=k.size(1) != q.size(1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hs) + causal mask) V written out, (B, nh, T, hs) each: the
    textbook form, which the compiler fuses (scale, mask, softmax and their backward)."""
    i = torch.arange(q.size(-2), device=q.device)
    # an index comparison, not a bool triu mask with masked_fill, which inductor compiles
    # into a slower softmax
    return masked_attention(q, k, v, i[None, :] <= i[:, None], scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(hs)) V over the key slots where the bool `attn_mask` is True,
    written out for the compiler: q (B, nh, T, hs), k and v (B, nkv, S, hs); `scale`
    replaces 1 / sqrt(hs)."""
    B, nh, T, hs = q.shape
    nkv = k.size(1)
    if nkv != nh:  # grouped: each key/value head against its g query heads, never copied
        q, k, v = q.view(B, nkv, nh // nkv, T, hs), k.unsqueeze(2), v.unsqueeze(2)
        attn_mask = attn_mask if attn_mask.dim() < 3 else attn_mask.unsqueeze(2)  # (B, 1, 1, T, S)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs) if scale is None else scale)
    y = torch.where(attn_mask, scores, float("-inf")).softmax(-1) @ v
    return y.view(B, nh, T, hs)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with GPT-2's tanh approximation, 0.5 x (1 + tanh(z)), z = sqrt(2/pi)(x + 0.044715 x^3).

    While `torch.compile` traces it on CPU it is written as the identical x * sigmoid(2z):
    the compiler's vectorized exp makes that about twice as fast as its tanh, forward and
    backward.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid(x * (GELU_TWO_Z + GELU_TWO_Z * 0.044715 * x * x))
    return F.gelu(x, approximate="tanh")
