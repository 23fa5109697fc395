"""Language-model evaluation: loss and perplexity on a data directory or a text file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gptkit.errors import GptkitError
from gptkit.inference import load_for_inference
from gptkit.runtime import pick_device, pick_dtype
from gptkit.train import evaluate


def evaluate_lm(model_dir: str | Path, data: str | Path, *, batch_size: int = 8,
                max_batches: int | None = None, device: str = "auto") -> dict[str, float]:
    """`{"loss", "perplexity", "tokens"}` over non-overlapping context-sized windows.

    A data directory contributes its val split (checked against the model's tokenizer);
    a text file is tokenized with the model's tokenizer.
    """
    from gptkit.data import iter_eval_batches, load_meta, load_tokens

    model, tokenizer = load_for_inference(model_dir, device)
    data = Path(data)
    if data.is_dir():
        meta = load_meta(data)
        if meta["tokenizer_hash"] != tokenizer.hash:
            raise GptkitError(f"{data} was tokenized with a different tokenizer than the model in "
                              f"{model_dir}; prepare it with the model's tokenizer.")
        tokens = load_tokens(data, "val")
    elif data.is_file():
        text = data.read_bytes().decode("utf-8", errors="replace")
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    else:
        raise GptkitError(f"--data {data} does not exist; expected a data directory or a text file.")
    block_size = min(model.config.block_size, max(1, len(tokens) - 1))
    if len(tokens) < 2:
        raise GptkitError(f"{data} holds {len(tokens)} token(s); at least 2 are needed to score a model.")
    dev = pick_device(device)
    loss, count = evaluate(model, iter_eval_batches(tokens, block_size, batch_size, max_batches),
                           dev, pick_dtype("float32", dev))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
