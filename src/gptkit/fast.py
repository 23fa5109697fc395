"""Fast inference: weight layouts and dtypes that decode quickly, and a compiled decode step.

Decoding one token reads every weight once, so a step's speed is the speed of a
matrix-vector product per linear layer. On CPU the kernel behind `nn.Linear` matters
more than the arithmetic (see PERF-NOTES): MKL's fp32 GEMV over an (out, in) weight runs
at about half the speed of the same product over the transposed (in, out) layout, and
bf16 weights run fastest when pre-packed once into oneDNN's blocked layout. So
`optimize_for_inference` swaps every linear layer of the blocks, and the LM head, for
the layer that suits the dtype and device:

| dtype / quantize | CPU                                   | CPU, compile=True        | GPU                |
| fp32             | `TransposedLinear` (addmm, (in, out)) | `RowLinear` (fp32)       | `nn.Linear`        |
| bf16             | `OneDnnLinear` (pre-packed oneDNN)    | `RowLinear` (bf16)       | `nn.Linear` (bf16) |
| int8             | `Int8Linear` (int8 rows, bf16 math)   | `Int8Linear`             | `Int8Linear`       |

With `compile=True` on CPU the decode step's products become `gptkit.rowwise` loops that
the compiler fuses into one pass per weight, about twice MKL's GEMV speed at batch 1-8.
An fp32 LM head on CPU is a `TiledLinear` instead, compiled or not: its weight in tiles
of 16 output features streams fastest both ways.

The LM head is tied to the token embedding in training; here it gets its own copy in the
fast layout while the embedding stays as it is for lookups. On CPU every tensor of the
optimized model then moves into memory backed by 2 MiB pages (`gptkit.hugepages`), which
streams faster than torch's default 4 KiB pages. The model is changed in place and is for
inference only (its state dict is no longer a GPT-2 checkpoint).

    model = optimize_for_inference(GPT.from_pretrained("out"), dtype=torch.bfloat16)
    generate(model, ids, max_new_tokens=50)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptkit.errors import GptkitError
from gptkit.hugepages import move_to_huge_pages
from gptkit.model import GPT
from gptkit.quantize import Int8Linear
from gptkit.rowwise import fuses_rows, rowwise_matmul, tile_weight, tiled_matmul

QUANTIZE_CHOICES = ("int8",)


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
    """bf16 linear over a weight pre-packed once into oneDNN's blocked layout, which its
    AVX512-BF16 kernels read 2-3x faster than a plain bf16 weight at batch 1 and 8.

    The packed weight is an opaque MKLDNN tensor, kept as a plain attribute: it cannot
    move devices or be saved, which an inference-only layer never needs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(torch.bfloat16).contiguous(), 1)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class RowLinear(nn.Module):
    """A linear layer for compiled decoding on CPU: weight (out, in), fp32 or bf16.

    Inside `torch.compile` a decode step's few rows are multiplied by `rowwise_matmul`,
    which the compiler turns into one pass over the weight; outside it (the prompt's
    prefill, or an eager fallback) it is a plain `F.linear`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        if not fuses_rows(flat):
            return F.linear(x, self.weight, self.bias)
        y = rowwise_matmul(flat, self.weight).to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], y.size(-1))


class TiledLinear(nn.Module):
    """An fp32 linear without bias over its weight in tiles of 16 output features (see
    `gptkit.rowwise.tiled_matmul`): the LM head's layout on CPU, where its 50k short rows
    are the largest product of a decode step."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features = weight.size(0)
        self.register_buffer("tiles", tile_weight(weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tiled_matmul(x.reshape(-1, x.size(-1)), self.tiles)[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (AVX512-BF16 / AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def optimize_for_inference(model: GPT, dtype: torch.dtype = torch.float32,
                           quantize: str | None = None, compile: bool = False) -> GPT:
    """Put `model` (in place) into the fastest decoding layout for `dtype` and `quantize`.

    `dtype` (float32 or bfloat16) is the dtype of the activations and of every weight
    that is not quantized; `quantize="int8"` stores the linear layers' weights as int8
    with per-channel scales. bf16 on a device without native bf16 falls back to fp32
    with a warning. `compile=True` compiles the decode step (`torch.compile`; CUDA graphs
    on GPU); if compiling fails, generation warns and runs eagerly. Returns `model`.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise GptkitError(f"dtype must be torch.float32 or torch.bfloat16; got {dtype!r}.")
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise GptkitError(f"quantize must be None or 'int8'; got {quantize!r}.")
    device = model.transformer.wte.weight.device
    if dtype == torch.bfloat16 and not bf16_supported(device):
        warnings.warn(f"this {device.type} has no native bf16 support; using float32.",
                      stacklevel=2)
        dtype = torch.float32
    model.eval()
    make = _linear_factory(dtype, quantize, device, compile)
    for block in model.transformer.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                             (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            setattr(parent, name, make(getattr(parent, name)))
    # the head gets its own copy, untied from the embedding
    tiled = device.type == "cpu" and dtype == torch.float32 and quantize is None
    model.lm_head = TiledLinear(model.lm_head.weight) if tiled else make(model.lm_head)
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            module.to(dtype)
    if device.type == "cpu":
        move_to_huge_pages(model)
    model.compiled_decode = _compile_decode(model, device) if compile else None
    return model


def _linear_factory(dtype: torch.dtype, quantize: str | None, device: torch.device,
                    compile: bool) -> Callable[[nn.Linear], nn.Module]:
    """The function that turns one nn.Linear into its fast counterpart."""
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dtype)

    if quantize == "int8":
        # On CPU the int8 kernel is only fast with bf16 activations (see Int8Linear).
        compute = torch.bfloat16 if device.type == "cpu" and bf16_supported(device) else dtype
        return lambda lin: Int8Linear(lin.weight, cast(lin.bias), compute)
    if device.type != "cpu":
        return lambda lin: _plain_linear(cast(lin.weight), cast(lin.bias))
    if compile:
        return lambda lin: RowLinear(cast(lin.weight), cast(lin.bias))
    if dtype == torch.bfloat16:
        return lambda lin: OneDnnLinear(lin.weight, lin.bias)
    return lambda lin: TransposedLinear(cast(lin.weight), cast(lin.bias))


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


# -- the compiled decode step ----------------------------------------------------------------

class GuardedStep:
    """A compiled decode step that falls back to eager (with a warning) the first time
    compiling or running the compiled program fails, so `compile=True` never breaks
    generation. Called as `step(tokens, input_pos, position_ids, attn_mask)` -> logits (B, V).
    """

    def __init__(self, model: GPT, compiled: Callable[..., torch.Tensor] | None) -> None:
        self.model = model
        self.compiled = compiled

    def eager(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
              attn_mask: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, position_ids=position_ids, input_pos=input_pos,
                          attn_mask=attn_mask)[:, 0]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # any compiler failure: keep generating, eagerly
                _warn_fallback(exc)
                self.compiled = None
        return self.eager(*args)


def _compile_decode(model: GPT, device: torch.device) -> GuardedStep:
    step = GuardedStep(model, None)
    # CUDA: CUDA graphs. CPU: inductor inlines cheap elementwise producers (a LayerNorm,
    # a GELU) into their consumers, which for a row-wise product means recomputing them
    # once per weight row; realizing anything over 8 ops keeps the weight loops lean
    # (bf16 decoding of GPT-2 runs ~1.8x faster with it). The wrapper's size asserts
    # repeat what dynamo's guards check; dropping them saves 25-140 us a step (~90 asserts).
    settings = ({"mode": "reduce-overhead"} if device.type == "cuda"
                else {"options": {"realize_opcount_threshold": 8, "size_asserts": False}})
    try:
        # Every optimized model adds its own entry to the cache of the one `eager` function
        # that all of them compile; dynamo's default of 8 would fail the ninth model.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        step.compiled = torch.compile(step.eager, fullgraph=True, **settings)
    except Exception as exc:  # torch.compile itself unavailable (e.g. unsupported Python)
        _warn_fallback(exc)
    return step


def _warn_fallback(exc: Exception) -> None:
    warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "decoding without compilation.", stacklevel=3)
