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
                       dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """The model and its tokenizer, in eval mode on the chosen device."""
    directory = resolve_model_dir(name_or_dir)
    model = GPT.from_pretrained(directory, device=pick_device(device), dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GptkitError(
            f"The tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary holds {model.config.vocab_size}; they do not belong together."
        )
    return model, tokenizer
