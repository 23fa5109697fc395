"""Linear layers in the layouts that decode fastest, one per dtype and device.

Decoding one token reads every weight once, so a step's speed is the speed of a
matrix-vector product per linear layer. On CPU the kernel behind `nn.Linear` matters
more than the arithmetic (docs/performance.md has the measurements): MKL's fp32 GEMV
over an (out, in) weight runs at about half the speed of the same product over the
transposed (in, out) layout, and bf16 weights run fastest when pre-packed once into
oneDNN's blocked layout. `gptkit.inference.optimize_for_inference` picks among these:

| dtype / quantize | CPU                                   | CPU, compile=True        | GPU                |
| fp32             | `TransposedLinear` (addmm, (in, out)) | `RowLinear` (fp32)       | `nn.Linear`        |
| fp32, batch > 1  | `OneDnnLinear` (fp32, packed)         | `RowLinear` + packed     | `nn.Linear`        |
| bf16             | `OneDnnLinear` (pre-packed oneDNN)    | `RowLinear` (bf16)       | `nn.Linear` (bf16) |
| int8             | `Int8Linear` (int8 rows, bf16 math)   | `Int8Linear`             | `Int8Linear`       |

An fp32 LM head on CPU is a `TiledLinear`, compiled or not: its weight in tiles of 16
output features streams fastest both ways at batch 1; at a serving engine's batch sizes
("batch > 1": the rows one decode step is packed for) the packed oneDNN weight is faster.
A compiled serving model keeps both: the plain layout for its compiled one-row steps, a
packed copy for the eager steps over several rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.kernels.rowwise import fuses_rows, rowwise_matmul, tile_weight, tiled_matmul


class TransposedLinear(nn.Module):
    """fp32 linear over a weight stored (in, out), as GPT-2's Conv1D stores it: MKL's GEMV
    reads that layout about twice as fast as nn.Linear's (out, in) at batch 1."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat,
                                                                       self.weight_t)
        return y.view(*x.shape[:-1], y.size(-1))


class OneDnnLinear(nn.Module):
    """Linear over a weight pre-packed once into oneDNN's blocked layout for products of
    about `batch_size` rows. bf16: its AVX512-BF16 kernels read that layout several times
    faster than a plain bf16 weight at small batches. fp32 at batch 8-32 (a serving
    engine's decode step): 1.3-2.5x the speed of MKL's GEMM over the plain weight, the LM
    head gaining most.

    The packed weight is an opaque MKLDNN tensor, kept as a plain attribute: it cannot
    move devices or be saved, which an inference-only layer never needs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype = torch.bfloat16, batch_size: int = 1) -> None:
        super().__init__()
        self.packed = pack_weight(weight.to(dtype), batch_size)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight (out, in) reordered once into oneDNN's blocked layout for products of about
    `rows` rows: an opaque MKLDNN tensor that only `packed_linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def takes_packed_copy(packed: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a layer with a packed copy (`RowLinear`, `TiledLinear`) multiplies `x` by
    it: products over several rows, run eagerly (a compiled step reads the plain layout)."""
    return (packed is not None and x.numel() > x.size(-1)
            and not torch.compiler.is_compiling())


class RowLinear(nn.Module):
    """A linear layer for compiled decoding on CPU: weight (out, in), fp32 or bf16.

    Inside `torch.compile` a decode step's few rows are multiplied by `rowwise_matmul`,
    which the compiler turns into one pass over the weight; outside it (the prompt's
    prefill, or an eager fallback) it is a plain `F.linear`. With `packed_rows` it also
    keeps a oneDNN-packed copy for the eager products over several rows (a serving
    engine's batched steps and prefills): twice the memory, each path at its fastest.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed_rows: int | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.packed = None if packed_rows is None else pack_weight(weight, packed_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_packed_copy(self.packed, x):
            return packed_linear(x, self.packed, self.bias)
        flat = x.reshape(-1, x.size(-1))
        if not fuses_rows(flat):
            return F.linear(x, self.weight, self.bias)
        y = rowwise_matmul(flat, self.weight).to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], y.size(-1))


class TiledLinear(nn.Module):
    """An fp32 linear without bias over its weight in tiles of 16 output features (see
    `gptkit.kernels.rowwise.tiled_matmul`): the LM head's layout on CPU, where its 50k short rows
    are the largest product of a decode step. `packed_rows`: as `RowLinear`'s."""

    def __init__(self, weight: torch.Tensor, packed_rows: int | None = None) -> None:
        super().__init__()
        self.out_features = weight.size(0)
        self.register_buffer("tiles", tile_weight(weight.detach()))
        self.packed = None if packed_rows is None else pack_weight(weight, packed_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_packed_copy(self.packed, x):
            return packed_linear(x, self.packed, None)
        y = tiled_matmul(x.reshape(-1, x.size(-1)), self.tiles)[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (AVX512-BF16 / AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear
