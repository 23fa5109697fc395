"""Models ready to generate: loading a directory in one checked call, and the fast
decoding layouts (`optimize_for_inference`) with their compiled decode step.

`optimize_for_inference` swaps every linear layer of the blocks, and the LM head, for
the layer of `gptkit.kernels.linear` that suits the dtype and device (the same four
layers per block in every architecture family). A tied LM head gets its own copy in the
fast layout while the embedding stays as it is for lookups. On CPU every streamed tensor of
the optimized model then moves into memory backed by 2 MiB pages (`gptkit.kernels.hugepages`),
which streams faster than torch's default 4 KiB pages. The model is changed in place and
is for inference only (its state dict is no longer a checkpoint of its family). Loading a
directory with `quantize` on CPU saves the quantized layout for the next load
(`gptkit.kernels.layout_cache`), which then skips reading and quantizing the checkpoint.

    model = optimize_for_inference(GPT.from_pretrained("out"), dtype=torch.bfloat16)
    generate(model, ids, max_new_tokens=50)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from gptkit import checkpoint
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.kernels.aot import load_or_compile, model_tensors
from gptkit.kernels.hugepages import move_to_huge_pages
from gptkit.kernels.int4 import Int4Linear
from gptkit.kernels.int8 import Int8Linear
from gptkit.kernels.layout_cache import LayoutCache
from gptkit.kernels.linear import (
    OneDnnLinear,
    RowLinear,
    TiledLinear,
    TransposedLinear,
    bf16_supported,
    plain_linear,
)
from gptkit.model import GPT, UnitOffsetRMSNorm, decode_logits, skip_weight_init
from gptkit.runtime import pick_device, pick_dtype
from gptkit.tokenizer import Tokenizer

QUANTIZE_CHOICES = ("int8", "int4")
QUANTIZED_LAYERS: dict[str, type[Int8Linear | Int4Linear]] = {"int8": Int8Linear, "int4": Int4Linear}
COMPILE_ENV = "GPTKIT_COMPILE"


def load_for_inference(name_or_dir: str | Path, device: str | None = "auto",
                       dtype: torch.dtype | str | None = None, *, fast: bool = False,
                       quantize: str | None = None, compile: bool | None = False
                       ) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, in eval mode on the chosen device.

    With `fast` (implied by `quantize` or `compile`) the model is put into the fast
    decoding layout of `optimize_for_inference` (dtype float32 unless given;
    int8 weights are quantized from the checkpoint's full-precision ones); it can then
    generate but no longer be trained or saved. `dtype` may be named ("bfloat16"), as
    the --dtype flags name it. `compile=None` compiles where that is the default (see
    `compile_by_default`).
    """
    return load_directory(checkpoint.resolve_model_dir(name_or_dir), device, dtype, fast=fast,
                          quantize=quantize, compile=compile)


def load_directory(directory: Path, device: str | None = "auto",
                   dtype: torch.dtype | str | None = None, *, fast: bool = False,
                   quantize: str | None = None, compile: bool | None = False,
                   batch_size: int = 1) -> tuple[GPT, Tokenizer]:
    """`load_for_inference` for a directory the caller already resolved (with
    `checkpoint.resolve_model_dir`) because it reads other files of it too; `batch_size`
    is that of `optimize_for_inference`."""
    chosen = pick_device(device)
    compile = compile_by_default(chosen) if compile is None else compile
    fast = fast or quantize is not None or compile
    if isinstance(dtype, str):
        dtype = pick_dtype(dtype, chosen)
    if fast:
        model = _load_optimized(directory, chosen, dtype or torch.float32, quantize, compile,
                                batch_size)
    else:
        config, state = checkpoint.load(directory)
        model = GPT.from_state_dict(config, state, device=chosen, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptkitError(
            f"The tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary holds {model.config.vocab_size}; they do not belong together."
        )
    model.token_limit = tokenizer.vocab_size  # padded rows beyond it are never generated
    return model, tokenizer


def compile_by_default(device: torch.device) -> bool:
    """Whether `gptkit generate`, `chat` and `serve` compile the decode step when not told:
    on CPU, where a compiled step is cached on disk and loads in well under a second after
    the first run (`gptkit.kernels.aot`), unless $GPTKIT_COMPILE is 0; not on GPUs, where
    compiling (CUDA graphs) happens anew in every process."""
    return device.type == "cpu" and os.environ.get(COMPILE_ENV, "1") != "0"


def optimize_for_inference(model: GPT, dtype: torch.dtype = torch.float32,
                           quantize: str | None = None, compile: bool = False,
                           batch_size: int = 1) -> GPT:
    """Put `model` (in place) into the fastest decoding layout for `dtype` and `quantize`.

    `dtype` (float32 or bfloat16) is the dtype of the activations and of every weight
    that is not quantized; `quantize="int8"` stores the linear layers' weights as int8
    with per-channel scales, `quantize="int4"` as 4-bit codes with a step and an offset
    per group of 32 inputs (`gptkit.kernels.int4`, CPU only). bf16 on a device without
    native bf16 falls back to fp32 with a warning. `compile=True` compiles the decode
    step: on CPU ahead of time, once per model shape and machine (`gptkit.kernels.aot`),
    for steps of one row; on GPU with `torch.compile` and CUDA graphs. If compiling
    fails, generation warns and runs eagerly. `batch_size` is the number of rows a decode
    step usually carries: a serving engine's batch (> 1) gets weights packed for
    products of that many rows on CPU (with `compile`, as a copy beside the plain layout
    that the compiled one-row step reads). Returns `model`.
    """
    dtype = _layout_dtype(dtype, quantize, model.device)
    _swap_layers(model, dtype, quantize, compile, batch_size)
    return _finish(model, compile)


def _load_optimized(directory: Path, device: torch.device, dtype: torch.dtype,
                    quantize: str | None, compile: bool, batch_size: int) -> GPT:
    """`optimize_for_inference` of the model in `directory`. A quantized CPU layout is
    read from the layout cache where an earlier load saved it, and saved there otherwise."""
    dtype = _layout_dtype(dtype, quantize, device)
    cache = (LayoutCache(directory, f"{quantize}-{str(dtype).removeprefix('torch.')}")
             if quantize is not None and device.type == "cpu" else None)
    saved = cache.read() if cache is not None else None
    model = (_from_saved_layout(checkpoint.load_config(directory), saved, quantize)
             if saved is not None else None)
    restored = model is not None
    if not restored:
        config, state = checkpoint.load(directory)
        model = GPT.from_state_dict(config, state, device=device)
        _swap_layers(model, dtype, quantize, compile, batch_size)
        if cache is not None:
            cache.write(model_tensors(model))
    # restored tensors are mapped from the file, at any byte: copied where they are used
    return _finish(model, compile, align=restored)


def _from_saved_layout(config: GPTConfig, saved: dict[str, torch.Tensor], quantize: str
                       ) -> GPT | None:
    """A model of `config` in the quantized layout, holding the `saved` tensors without
    quantizing anything; None where they do not fit it. Its modules are built without
    initialising their weights (`skip_weight_init`), then given the saved tensors."""
    layer = QUANTIZED_LAYERS[quantize]
    with skip_weight_init():
        model = GPT(config)
    try:
        for path, parent, name in [*_linear_layers(model), ("lm_head", model, "lm_head")]:
            linear = getattr(parent, name)
            setattr(parent, name, layer.restored(saved, path + ".", linear.out_features))
        missing, _ = model.load_state_dict(saved, strict=False, assign=True)
    except (KeyError, RuntimeError):  # a layout of other shapes or names
        return None
    return None if missing else model.eval()


def _layout_dtype(dtype: torch.dtype, quantize: str | None, device: torch.device) -> torch.dtype:
    """`dtype`, checked, or float32 (with a warning) where the device lacks native bf16."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise GptkitError(f"dtype must be torch.float32 or torch.bfloat16; got {dtype!r}.")
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise GptkitError(f"quantize must be None, 'int8' or 'int4'; got {quantize!r}.")
    if quantize == "int4" and device.type != "cpu":
        raise GptkitError(f"quantize='int4' runs on CPU only; on {device.type} use 'int8'.")
    if dtype == torch.bfloat16 and not bf16_supported(device):
        warnings.warn(f"this {device.type} has no native bf16 support; using float32.",
                      stacklevel=3)
        return torch.float32
    return dtype


def _swap_layers(model: GPT, dtype: torch.dtype, quantize: str | None, compile: bool,
                 batch_size: int) -> None:
    """The layer swaps and casts of `optimize_for_inference`."""
    model.eval()
    device = model.device
    # a serving engine's decode steps carry many rows: weights packed for that many
    packed_rows = (batch_size if device.type == "cpu" and batch_size > 1
                   and torch.backends.mkldnn.is_available() else None)
    make = _linear_factory(dtype, quantize, device, compile, packed_rows)
    for _, parent, name in _linear_layers(model):
        setattr(parent, name, make(getattr(parent, name)))
    # the head gets its own copy, untied from the embedding
    tiled = (device.type == "cpu" and dtype == torch.float32 and quantize is None
             and (packed_rows is None or compile))
    model.lm_head = (TiledLinear(model.lm_head.weight, packed_rows) if tiled
                     else make(model.lm_head))
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm, UnitOffsetRMSNorm)):
            module.to(dtype)


def _finish(model: GPT, compile: bool, align: bool = False) -> GPT:
    """The last steps of `optimize_for_inference`: huge pages (or, with `align`, at least
    aligned memory), the compiled decode step."""
    if model.device.type == "cpu":
        move_to_huge_pages(model, align_anyway=align)
    model.compiled_decode = None
    if compile:
        model.compiled_decode = (load_or_compile(model) if model.device.type == "cpu"
                                 else _compile_decode(model))
    return model


def _linear_layers(model: GPT) -> Iterator[tuple[str, nn.Module, str]]:
    """The blocks' linear layers, the same four per block in every family: (path, the
    module that holds one, its attribute name)."""
    for i, block in enumerate(model.transformer.h):
        for part, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                           ("mlp", "c_proj")):
            yield f"transformer.h.{i}.{part}.{name}", getattr(block, part), name


def _linear_factory(dtype: torch.dtype, quantize: str | None, device: torch.device,
                    compile: bool, packed_rows: int | None) -> Callable[[nn.Linear], nn.Module]:
    """The function that turns one nn.Linear into its fast counterpart; `packed_rows`:
    pack CPU weights for products of that many rows."""
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dtype)

    if quantize is not None:
        # On CPU the int8 kernel is only fast with bf16 activations (see Int8Linear), and
        # int4's widened weights multiply fastest in bf16 where it is native.
        compute = torch.bfloat16 if device.type == "cpu" and bf16_supported(device) else dtype
        return lambda lin: QUANTIZED_LAYERS[quantize].quantized(lin.weight, cast(lin.bias), compute)
    if device.type != "cpu":
        return lambda lin: plain_linear(cast(lin.weight), cast(lin.bias))
    if compile:  # a serving engine's batches (packed_rows) read a packed copy
        return lambda lin: RowLinear(cast(lin.weight), cast(lin.bias), packed_rows)
    if dtype == torch.bfloat16 or packed_rows is not None:
        return lambda lin: OneDnnLinear(lin.weight, lin.bias, dtype, packed_rows or 1)
    return lambda lin: TransposedLinear(cast(lin.weight), cast(lin.bias))


# -- the compiled decode step ----------------------------------------------------------------

class GuardedStep:
    """A compiled decode step that falls back to eager (with a warning) the first time
    compiling or running the compiled program fails, so `compile=True` never breaks
    generation. Called as `step(tokens, input_pos, position_ids, attn_mask)` -> logits (B, V).
    """

    fixed_shapes = True  # CUDA graphs replay one cache size each (see generate.cache_size)

    def __init__(self, model: GPT, compiled: Callable[..., torch.Tensor] | None) -> None:
        self.model = model
        self.compiled = compiled

    def eager(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
              attn_mask: torch.Tensor) -> torch.Tensor:
        return decode_logits(self.model, tokens, input_pos, position_ids, attn_mask)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # any compiler failure: keep generating, eagerly
                _warn_fallback(exc)
                self.compiled = None
        return self.eager(*args)


def _compile_decode(model: GPT) -> GuardedStep:
    """The decode step under `torch.compile` with CUDA graphs (GPU)."""
    step = GuardedStep(model, None)
    try:
        # Every optimized model adds its own entry to the cache of the one `eager` function
        # that all of them compile; dynamo's default of 8 would fail the ninth model.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        step.compiled = torch.compile(step.eager, fullgraph=True, mode="reduce-overhead")
    except Exception as exc:  # torch.compile itself unavailable (e.g. unsupported Python)
        _warn_fallback(exc)
    return step


def _warn_fallback(exc: Exception) -> None:
    warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                  "decoding without compilation.", stacklevel=3)
