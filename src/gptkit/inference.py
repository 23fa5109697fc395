"""Loading a model directory for use: weights, tokenizer, device, in one checked call."""

from __future__ import annotations

from pathlib import Path

import torch

from gptkit.checkpoint import resolve_model_dir
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.runtime import pick_device
from gptkit.tokenizer import Tokenizer


def load_for_inference(name_or_dir: str | Path, device: str | None = "auto",
                       dtype: torch.dtype | None = None, *, fast: bool = False,
                       quantize: str | None = None, compile: bool = False
                       ) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, in eval mode on the chosen device.

    With `fast` (implied by `quantize` or `compile`) the model is put into the fast
    decoding layout of `gptkit.fast.optimize_for_inference` (dtype float32 unless given;
    int8 weights are quantized from the checkpoint's full-precision ones); it can then
    generate but no longer be trained or saved.
    """
    directory = resolve_model_dir(name_or_dir)
    fast = fast or quantize is not None or compile
    model = GPT.from_pretrained(directory, device=pick_device(device),
                                dtype=None if fast else dtype)
    if fast:
        from gptkit.fast import optimize_for_inference

        optimize_for_inference(model, dtype=dtype or torch.float32, quantize=quantize,
                               compile=compile)
    tokenizer = Tokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptkitError(
            f"The tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary holds {model.config.vocab_size}; they do not belong together."
        )
    return model, tokenizer
