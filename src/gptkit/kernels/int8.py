"""Int8 weight-only quantization: a quarter of fp32's bytes to stream per decoded token.

Decoding reads every weight once per step, so its speed follows the bytes read. Each
row (output channel) i of a weight W (out, in) is stored as int8 round(W_i / s_i) with
its own scale s_i = max|W_i| / 127; activations stay floating point and the product is
rescaled per channel: y = (x @ Q^T) * s. Per-channel scales keep one outlier row from
costing the others their precision (perplexity rises well under 1%, see the tests).

    from gptkit.inference import optimize_for_inference
    optimize_for_inference(model, quantize="int8")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.kernels.rowwise import fuses_rows, rowwise_matmul

INT8_MAX = 127
GEMV_ROWS = 16  # up to this many rows the int8 kernel reads the weight fastest


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows (out, in) and their fp32 scales (out,) for a weight (out, in)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX  # an all-zero row stays zero
    q = torch.round(weight / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A linear layer over int8 weights, dequantized on the fly (never stored dequantized).

    On CPU the product runs in `torch._weight_int8pack_mm`, which reads the int8 rows
    directly with bf16 activations (fp32 activations take a slow scalar path there); on
    other devices the weight is widened to `compute_dtype` per call, which saves memory
    but not time.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        """The layer of int8 rows `weight` (out, in) with `scales` (out,) in the compute
        dtype; `quantized` makes them from a float weight."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def quantized(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype) -> Int8Linear:
        """The layer for a float `weight` (out, in) and `bias`, computing in `compute_dtype`."""
        q, scales = quantize_per_channel(weight)
        return cls(q, scales.to(compute_dtype), None if bias is None else bias.detach().clone())

    @classmethod
    def restored(cls, state: dict[str, torch.Tensor], prefix: str, out_features: int
                 ) -> Int8Linear:
        """The layer whose tensors a state dict holds under `prefix` (ending with a dot);
        `out_features` as for Int4Linear, whose rows are padded (int8's are not)."""
        return cls(state[prefix + "weight"], state[prefix + "scales"], state.get(prefix + "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        if fuses_rows(flat):
            y = rowwise_matmul(flat, self.weight) * self.scales.float()
        elif self.weight.device.type == "cpu" and flat.size(0) > GEMV_ROWS:
            # a prompt's many rows: widened int8 (exact in bf16) in one oneDNN GEMM, about
            # twice the int8 kernel's speed there
            y = F.linear(flat.to(self.scales.dtype), self.weight.to(self.scales.dtype)) * self.scales
        elif self.weight.device.type == "cpu":
            y = torch._weight_int8pack_mm(flat.to(self.scales.dtype), self.weight, self.scales)
        else:
            y = F.linear(flat.to(self.scales.dtype), self.weight.to(self.scales.dtype)) * self.scales
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
