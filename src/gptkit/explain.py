"""Teaching views of a GPT at work: next-token probabilities, and attention as a heat map.

    gptkit generate --model runs/mine "The whale" --show-probs --top 5
    gptkit attention --model runs/mine "To be or not to be" --layer 1 --head 0 --out attn.png

Both run the model's own weights through small, explicit code instead of the optimised
paths (no KV cache, no fused attention kernel), so that what is printed or drawn is
the textbook formula: `softmax(logits / temperature)` for the next token, and
`softmax(Q K^T / sqrt(hs))` with the causal mask for one attention head.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import torch

from gptkit.errors import GptkitError
from gptkit.generate import check_sampling
from gptkit.model import GPT, window_mask

if TYPE_CHECKING:
    from gptkit.tokenizer import Tokenizer

MAX_TICK_LABELS = 48  # beyond this many tokens the heat map's axes go unlabelled


@dataclass(frozen=True)
class Candidate:
    """One possible next token and its probability."""

    token_id: int
    text: str
    prob: float


@dataclass(frozen=True)
class StepProbs:
    """One generation step: the token taken and the most likely candidates."""

    chosen: Candidate
    top: list[Candidate]


def _prompt_ids(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    """Token ids of `text`, cut from the left (with a warning) to fit the context."""
    ids = tokenizer.encode(text)
    if not ids:
        raise GptkitError("The text encodes to no tokens; give at least one character.")
    if len(ids) > block_size:
        warnings.warn(f"The text has {len(ids)} tokens; keeping the last {block_size}, the "
                      "model's context.", stacklevel=3)
        ids = ids[-block_size:]
    return ids


# `gptkit generate` settings that --show-probs does not apply (it runs the plain fp32
# model, step by step), each with its unused value
NOT_WITH_SHOW_PROBS = {"task": None, "input": None, "top_k": None, "top_p": None,
                       "repetition_penalty": 1.0, "stop": None, "num_return_sequences": 1,
                       "num_beams": 1, "draft_model": None, "dtype": "float32", "quantize": None,
                       "compile": None}


def check_show_probs_settings(settings: Mapping[str, Any]) -> None:
    """Refuse in one sentence the settings of `gptkit generate` (by their flags' names) that
    --show-probs would ignore: it shows greedy choices or draws at a temperature only."""
    settings = {**settings, "compile": settings.get("compile") or None}  # --no-compile: as default
    unsupported = ["--" + name.replace("_", "-") for name, unused in NOT_WITH_SHOW_PROBS.items()
                   if settings.get(name, unused) != unused]
    if unsupported:
        raise GptkitError(f"--show-probs does not combine with {', '.join(unsupported)}; it shows "
                          "greedy choices or draws at --temperature only.")


def explain_steps(model: GPT, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 20,
                  top: int = 5, do_sample: bool = False, temperature: float = 1.0,
                  seed: int | None = None) -> Iterator[StepProbs]:
    """Generate token by token, yielding each step's choice and its `top` candidates.

    Probabilities are `softmax(logits / temperature)` when sampling (the distribution the
    token is drawn from) and `softmax(logits)` when greedy (temperature 0 is greedy). The
    window slides over the last `block_size` tokens; generation ends at end-of-text.
    The arguments are checked at the call, before the first step, as `generate` checks them.
    """
    # the temperature is checked even when greedy, without greedy decoding's warning
    check_sampling(do_sample=True, temperature=temperature, seed=seed)
    if max_new_tokens < 1 or top < 1:
        raise GptkitError("max_new_tokens and top must be at least 1.")
    ids = _prompt_ids(tokenizer, prompt, model.config.block_size)
    return _steps(model, tokenizer, ids, max_new_tokens, top, do_sample and temperature > 0,
                  temperature, seed)


def _steps(model: GPT, tokenizer: Tokenizer, ids: list[int], max_new_tokens: int, top: int,
           sampling: bool, temperature: float, seed: int | None) -> Iterator[StepProbs]:
    device = model.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    model.eval()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-model.config.block_size:]], device=device)
            logits = model(context, last_only=True)[0, -1].float()
            probs = (logits / temperature if sampling else logits).softmax(-1)
            if sampling:
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(probs.argmax())
            values, indices = probs.topk(min(top, probs.numel()))

            def candidate(token_id: int, p: float) -> Candidate:
                return Candidate(token_id, tokenizer.decode([token_id]), p)

            yield StepProbs(candidate(token, float(probs[token])),
                            [candidate(int(i), float(v)) for v, i in zip(values, indices,
                                                                          strict=True)])
            if token == tokenizer.eos_token_id:
                return
            ids.append(token)


def show_probs(model: GPT, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int = 20,
               top: int = 5, do_sample: bool = False, temperature: float = 1.0,
               seed: int | None = None, file: TextIO | None = None) -> list[StepProbs]:
    """Print each step's chosen token and top candidates, then the whole text; see
    `explain_steps` for the arguments."""
    file = file or sys.stdout
    steps = []
    explained = explain_steps(model, tokenizer, prompt, max_new_tokens=max_new_tokens, top=top,
                              do_sample=do_sample, temperature=temperature, seed=seed)
    print(f"{'step':>4}  {'chosen':<14} {'p':>6}   top {top} candidates", file=file)
    for number, step in enumerate(explained, start=1):
        steps.append(step)
        candidates = "  ".join(f"{c.text!r} {c.prob:.1%}" for c in step.top)
        print(f"{number:>4}  {step.chosen.text!r:<14} {step.chosen.prob:>6.1%}   {candidates}",
              file=file, flush=True)
    text = "".join(s.chosen.text for s in steps if s.chosen.token_id != tokenizer.eos_token_id)
    print(f"\n{prompt}{text}", file=file)
    return steps


class HeadAttention(NamedTuple):
    """Attention of every head of one layer: weights (B, nh, T, T), values (B, nh, T, hs)."""

    weights: torch.Tensor
    values: torch.Tensor


def attention_weights(model: GPT, ids: torch.Tensor, layer: int) -> HeadAttention:
    """Recompute layer `layer`'s attention weights from its input and its own projections.

    A forward hook captures what the attention module receives (the block input after
    ln_1, and the rotary angles of a RoPE model); Q, K, V come from the module's own
    `project` (QK-norm and rotation included), and the weights are
    softmax(Q K^T / sqrt(hs)) over earlier positions (the layer's own scale and sliding
    window where its family has them), as the fused kernel computes them.
    With grouped-query attention each key/value head is shown under every query head it
    serves.
    """
    n_layer = model.config.n_layer
    if not 0 <= layer < n_layer:
        raise GptkitError(f"--layer {layer} does not exist; the model has layers 0 to "
                          f"{n_layer - 1}.")
    attn = model.transformer.h[layer].attn
    captured: list[tuple] = []
    handle = attn.register_forward_pre_hook(lambda module, args: captured.append(args))
    try:
        model.eval()
        with torch.inference_mode():
            model(ids)
    finally:
        handle.remove()
    x, rope = captured[0][0], (captured[0][3] if len(captured[0]) > 3 else None)
    T = x.size(1)
    group = model.config.n_head // model.config.n_kv_head
    with torch.inference_mode():
        q, k, v = attn.project(x, rope)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = attn.scale if attn.scale is not None else 1 / math.sqrt(q.size(-1))
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
        slots = torch.arange(T, device=x.device)
        visible = window_mask(slots, T, attn.window if attn.window is not None else T)
        weights = scores.float().masked_fill(~visible, float("-inf")).softmax(-1)
    return HeadAttention(weights, v)


def _label(token: str) -> str:
    """A token as a tick label: whitespace-only tokens quoted so they stay visible."""
    return token if token.strip() else repr(token)


def attention_map(model: GPT, tokenizer: Tokenizer, text: str, out: str | Path, *,
                  layer: int = 0, head: int = 0) -> Path:
    """Draw one head's attention weights over `text` as a heat map PNG at `out`.

    Row i shows how much the token at position i attends to each earlier token.
    """
    from gptkit.plot import new_figure, save_figure

    n_head = model.config.n_head
    if not 0 <= head < n_head:
        raise GptkitError(f"--head {head} does not exist; the model has heads 0 to {n_head - 1}.")
    ids = _prompt_ids(tokenizer, text, model.config.block_size)
    device = model.device
    weights = attention_weights(model, torch.tensor([ids], device=device), layer).weights
    grid = weights[0, head].cpu().numpy()
    side = min(12.0, max(4.0, 0.25 * len(ids) + 2))
    figure = new_figure(side + 1, side)
    ax = figure.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    if len(ids) <= MAX_TICK_LABELS:
        labels = [_label(tokenizer.decode([i])) for i in ids]
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize="small")
        ax.set_yticks(range(len(ids)), labels, fontsize="small")
    ax.set(xlabel="attends to (key)", ylabel="token (query)",
           title=f"layer {layer}, head {head}")
    figure.subplots_adjust(left=0.15, bottom=0.15)
    return save_figure(figure, Path(out))
