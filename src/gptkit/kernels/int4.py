"""Int4 weight-only quantization, group-wise: an eighth of fp32's bytes per weight plus a
step and an offset per group of 32 inputs, the layout of llama.cpp's Q4_1.

Each run of 32 inputs of a weight row (a group) is stored as 4-bit codes q in 0..15 with
its own step s = (max - min) / 15, so that w ~ min + q * s. The product runs in ATen's
int4 matrix kernel for CPU (`torch._weight_int4pack_mm_for_cpu`), which unpacks the codes
in registers and multiplies them with bf16 (or fp32) activations; it reads
`(q - 8) * s + z` with z = min + 8 s, so that is what is stored beside the codes. Per
weight that is 4 bits of code and, per group, a bf16 step and offset: 0.625 bytes, as
Q4_1.

    optimize_for_inference(model, quantize="int4")
"""

from __future__ import annotations

import torch
from torch import nn

from gptkit.errors import GptkitError

GROUP = 32
ROWS = 16  # the kernel's packing takes output features in blocks of 16
LEVELS = 15
MIDDLE = 8  # the kernel's codes are centred: (q - 8) * s + z


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in) int32 in 0..15, steps and minima (out, in / 32) fp32 of a weight
    (out, in) whose `in` is a multiple of 32: weight ~ minima + codes * steps per group."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().view(out_features, in_features // GROUP, GROUP)
    low, high = torch.aminmax(groups, dim=-1)
    steps = ((high - low) / LEVELS).clamp_(min=1e-8)
    codes = (groups - low[..., None]).div_(steps[..., None]).round_().clamp_(0, LEVELS)
    return codes.to(torch.int32).view(out_features, in_features), steps, low


def dequantize_groups(codes: torch.Tensor, steps: torch.Tensor, minima: torch.Tensor
                      ) -> torch.Tensor:
    """The fp32 weight (out, in) that `quantize_groups` describes."""
    out_features, in_features = codes.shape
    groups = codes.view(out_features, -1, GROUP).float()
    return (minima[..., None] + groups * steps[..., None]).view(out_features, in_features)


class Int4Linear(nn.Module):
    """A linear layer over group-wise int4 weights (see the module docstring), computed in
    `compute_dtype` (bf16 where the CPU has it natively, else fp32)."""

    def __init__(self, packed: torch.Tensor, steps_and_offsets: torch.Tensor,
                 bias: torch.Tensor | None, out_features: int) -> None:
        """The layer of the kernel's `packed` codes (out rounded up to 16, in / 2) and each
        group's step and offset (in / 32, out rounded up, 2) in the compute dtype;
        `quantized` makes them from a float weight."""
        super().__init__()
        self.out_features, self.in_features = out_features, packed.size(1) * 2
        self.register_buffer("packed", packed)
        self.register_buffer("steps_and_offsets", steps_and_offsets)
        self.register_buffer("bias", bias)

    @classmethod
    def quantized(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                  compute_dtype: torch.dtype) -> Int4Linear:
        """The layer for a float `weight` (out, in) and `bias`, computing in `compute_dtype`."""
        out_features, in_features = weight.shape
        if in_features % GROUP:
            raise GptkitError(f"int4 quantizes groups of {GROUP} inputs, but a layer of this "
                              f"model has {in_features}; use --quantize int8 for it.")
        padded = weight.detach()
        if out_features % ROWS:  # zero rows, sliced off the product
            padded = weight.new_zeros(-(-out_features // ROWS) * ROWS, in_features)
            padded[:out_features] = weight.detach()
        codes, steps, minima = quantize_groups(padded)
        offsets = minima + MIDDLE * steps
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # (in / 32, out, 2): each group's step and offset, as the kernel reads them
        steps_and_offsets = torch.stack([steps.t(), offsets.t()], dim=-1).to(compute_dtype)
        return cls(packed, steps_and_offsets.contiguous(),
                   None if bias is None else bias.detach().clone(), out_features)

    @classmethod
    def restored(cls, state: dict[str, torch.Tensor], prefix: str, out_features: int
                 ) -> Int4Linear:
        """The layer whose tensors a state dict holds under `prefix` (ending with a dot)."""
        return cls(state[prefix + "packed"], state[prefix + "steps_and_offsets"],
                   state.get(prefix + "bias"), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.steps_and_offsets.dtype)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.steps_and_offsets)
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4"
