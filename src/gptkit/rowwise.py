"""Row-wise products for compiled decoding on CPU: the weights stream at memory speed.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so its
speed is how fast the weights stream from memory. MKL's GEMV and oneDNN reach about half
the machine's read bandwidth on GPT-2's small matrices; the same product written as one
dot product per weight row, compiled by `torch.compile` (inductor's C++ backend), becomes
a single vectorized loop that reads each row once, widens bf16 or int8 in registers and
keeps one accumulator per input row, near full read bandwidth.
"""

from __future__ import annotations

import torch

MAX_FUSED_ROWS = 8  # decode batches up to this size take the compiled row-wise product


def fuses_rows(flat: torch.Tensor) -> bool:
    """Whether a product over `flat` (N, in) should use `rowwise_matmul`: only while
    `torch.compile` traces it, on CPU, for the few rows of a decode step."""
    return (torch.compiler.is_compiling() and flat.device.type == "cpu"
            and flat.size(0) <= MAX_FUSED_ROWS)


def rowwise_matmul(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """flat (N, in) @ weight (out, in)^T in fp32, written as N dot products per weight row.

    Eagerly this would be slow; under `torch.compile` on CPU the N reductions fuse into
    one vectorized loop that streams each weight row once, widens it (bf16, int8) in
    registers and keeps N accumulators. A decode step is a chain of such products, and
    this loop reads weights at nearly twice the speed of MKL's GEMV at batch 1-8 (see
    benchmarks/bench_generate.py).
    """
    w = weight.float()
    return torch.stack([(row.float() * w).sum(-1) for row in flat.unbind(0)])
