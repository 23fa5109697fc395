"""Row-wise and tiled products for decoding on CPU: the weights stream at memory speed.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so its
speed is how fast the weights stream from memory. MKL's GEMV and oneDNN reach about half
the machine's read bandwidth on GPT-2's small matrices; the same product written as one
dot product per weight row, compiled by `torch.compile` (inductor's C++ backend), becomes
a single vectorized loop that reads each row once, widens bf16 or int8 in registers and
keeps one accumulator per input row, near full read bandwidth.

The LM head, 50k rows of only a few hundred values, goes further with a tiled layout:
each weight row's dot product ends in a horizontal sum across a vector register, a
large part of the work for rows that short. Stored as tiles of 16
output features, (out/16, in, 16), a product reads each tile front to back and keeps its
16 sums in one register (see `tiled_matmul`).
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


# The op is declared with the low-level library API: `torch.library.custom_op` wraps its
# kernel in a guard that imports torch._dynamo (about a second) on the first call,
# which a compiled program makes at its first step.
_LIBRARY = torch.library.Library("gptkit", "DEF")
_LIBRARY.define("realize(Tensor x) -> Tensor")


def _copy(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


_LIBRARY.impl("realize", _copy, "CompositeExplicitAutograd")


@torch.library.register_fake("gptkit::realize")
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def realize(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that inductor cannot see through, so `x` is computed once into memory.

    Inductor inlines a cheap producer into its consumer's loop. Before the tiled head that
    can mean a parameter-free RMSNorm (nanochat's final norm) whose scalar square root and
    divisions are then redone for every weight element of the largest product of the step
    (docs/architectures.md has the measured cost).
    """
    return torch.ops.gptkit.realize(x)


TILE = 16  # output features per tile: one AVX-512 register of fp32 sums
TILED_GEMM_MAX_ROWS = 256  # above this, one GEMM over the untiled weight is faster


def tile_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) as tiles (ceil(out / 16), in, 16), the last one zero-padded: tile
    t holds output features 16t..16t+15, each input's 16 weights side by side."""
    out_features, in_features = weight.shape
    padded = weight.new_zeros(-(-out_features // TILE) * TILE, in_features)
    padded[:out_features] = weight
    return padded.view(-1, TILE, in_features).transpose(1, 2).contiguous()


def tiled_matmul(flat: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """flat (N, in) @ weight^T for the weight in `tiles` (see `tile_weight`): (N, padded out).

    Under `torch.compile` on CPU, for a decode step's few rows, each tile becomes one
    contiguous read that multiplies every input by a vector of 16 weights and adds into a
    vector of 16 sums: no horizontal sums, so a large LM head streams faster than as
    `rowwise_matmul`. Otherwise it is a batched GEMM over the tiles, which up to a few
    hundred rows is also faster than MKL over the plain layout; more rows (every logit of
    a long prompt) untile the weight into one GEMM (docs/performance.md has the timings).
    """
    if fuses_rows(flat):
        flat = realize(flat)
        return torch.stack([(row[None, :, None] * tiles).sum(1).flatten()
                            for row in flat.unbind(0)])
    if flat.size(0) > TILED_GEMM_MAX_ROWS:
        return flat @ tiles.transpose(1, 2).reshape(-1, tiles.size(1)).t()
    return torch.matmul(flat, tiles).transpose(0, 1).reshape(flat.size(0), -1)
