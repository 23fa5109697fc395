"""Text generation: greedy, sampling, beam search and speculative decoding over a static KV cache.

Small functions in the style of gpt-fast rather than a logits-processor pipeline:
`prefill` and `decode_step` run the model over the preallocated cache, `sample_next`
picks tokens, and `generate` / `stream_generate` drive them. Semantics follow Hugging
Face's `generate` so that the same settings choose the same tokens.

Batched prompts of different lengths are LEFT padded (attention_mask 0 at pads). Cache
slot j holds token j of the padded row; a row's positions count its real tokens only
and its pad slots are masked out for every later token, so a batch decodes exactly as
its rows would one at a time.

    out = generate(model, ids, max_new_tokens=50, do_sample=True, top_p=0.9, seed=0)
    for piece in stream_generate(model, tokenizer, "Once upon", max_new_tokens=50):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError

if TYPE_CHECKING:  # `GPT.generate` calls into this module, so it never imports the model
    from gptkit.model import GPT

# Hugging Face's `max_length=20` counts the prompt, so a long prompt would get no new
# tokens at all; we default to 20 *new* tokens instead.
DEFAULT_MAX_NEW_TOKENS = 20
# Beam search marks impossible candidates with this score, as transformers does.
_NEG = -1.0e9


class TextCodec(Protocol):
    """What generation needs from a tokenizer (gptkit's `Tokenizer` or a HF one)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _prompt_ids(tokenizer: TextCodec, prompt: str) -> list[int]:
    """A text prompt's ids with the bos token its tokenizer starts texts with: gptkit's
    `Tokenizer.encode_prompt`; a transformers tokenizer's `encode` adds it itself."""
    return getattr(tokenizer, "encode_prompt", tokenizer.encode)(prompt)


@dataclass(frozen=True)
class Sampling:
    """How `sample_next` turns logits into a token; `do_sample=False` means argmax."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None


# -- the model steps ---------------------------------------------------------------------

def prefill(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
            attn_mask: torch.Tensor) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling cache slots `input_pos`; logits (B, V)
    of the last position, the only one generation needs."""
    return usable_logits(model, model(idx, position_ids=position_ids, input_pos=input_pos,
                                      attn_mask=attn_mask, last_only=True)[:, -1])


def usable_logits(model: GPT, logits: torch.Tensor) -> torch.Tensor:
    """`logits` (..., V) with the ids at or above `model.token_limit` (padding rows of the
    vocabulary that no tokenizer decodes) set to -inf, so no decoding path picks them."""
    if model.token_limit < logits.size(-1):
        logits[..., model.token_limit:] = float("-inf")
    return logits


def decode_step(model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor,
                position_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """One new token per row (B, 1) -> next-token logits (B, V).

    A pure function of its tensors with fixed shapes, so it compiles; it runs the compiled
    step that `gptkit.inference.optimize_for_inference(..., compile=True)` gave the model.
    """
    if model.compiled_decode is not None:
        logits = model.compiled_decode(tokens, input_pos, position_ids, attn_mask)
    else:
        logits = model(tokens, position_ids=position_ids, input_pos=input_pos,
                       attn_mask=attn_mask)[:, 0]
    return usable_logits(model, logits)


def attention_layout(prompt_mask: torch.Tensor, max_slots: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask (R, 1, S, S) and positions (R, S) of every cache slot, built once.

    Each step slices row `slot` out of these tables instead of building a mask. Pad slots
    are hidden from all tokens; a pad still attends to itself so that no softmax row is
    empty (which would give NaN keys and values that poison the masked matmul). A batch
    without padding gets R = 1, broadcast over the rows.
    """
    if bool(prompt_mask.all()):
        prompt_mask = prompt_mask[:1]
    rows, prompt_len = prompt_mask.shape
    device = prompt_mask.device
    valid = torch.ones(rows, max_slots, dtype=torch.bool, device=device)
    valid[:, :prompt_len] = prompt_mask.bool()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # count real tokens only
    slot = torch.arange(max_slots, device=device)
    causal = slot[:, None] >= slot[None, :]  # (S, S): query slot i sees key slots <= i
    eye = slot[:, None] == slot[None, :]
    attn = causal & (valid[:, None, :] | eye)  # (R, S, S)
    return attn.unsqueeze(1), positions


# -- choosing tokens ---------------------------------------------------------------------

def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) as transformers applies it: a token already in
    the row (`seen`, (B, V) bool) has its positive score divided, its negative score
    multiplied, by `penalty`."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def sample_next(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Next token (B,) from logits (B, V): repetition penalty, temperature, top-k, top-p,
    then argmax or a draw — transformers' order, so equal settings give equal tokens."""
    logits = logits.float()
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if not sampling.do_sample:
        return logits.argmax(-1)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        # Drop the least likely tokens whose total mass stays within 1 - top_p; the most
        # likely token always survives.
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1.0 - sampling.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=sampling.generator).squeeze(1)


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens each row's prompt holds (pads excluded)."""
    counts = torch.zeros(ids.size(0), vocab_size, device=ids.device)
    return counts.scatter_add_(1, ids, mask.float()) > 0


# -- cache lifetime ----------------------------------------------------------------------

def cache_size(needed: int, *models: GPT) -> int:
    """How many cache slots to give `models` (which share one attention layout) when a
    generation needs `needed`.

    A decode step compiled for fixed shapes (CUDA graphs) is specialized to the size of
    the cache it reads, so where one of them has such a step they get the next power of
    two (at most the shortest context): a handful of sizes then serve every prompt and
    length, where exact sizes would cost a compile per new length. The spare slots lie
    beyond every position, hidden by the causal mask. Eager models and the CPU's
    ahead-of-time step (dynamic in the number of slots) get exactly what they need.
    """
    if not any(getattr(model.compiled_decode, "fixed_shapes", False) for model in models):
        return needed
    context = min(model.config.block_size for model in models)
    return max(needed, min(1 << (needed - 1).bit_length(), context))


@contextmanager
def _cached(model: GPT, batch_size: int, max_slots: int) -> Iterator[None]:
    """Give `model` a fresh static cache in eval mode; put back its old cache and mode after,
    even when the caller stops early or fails."""
    saved = model.kv_caches
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model.setup_cache(batch_size, max_slots)
        yield
    finally:
        model.kv_caches = saved
        model.train(training)


# -- token sources: each yields the next token of every row, (B,), one position at a time --

def _sampled_tokens(model: GPT, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                    sampling: Sampling) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; the consumer stops it by closing the iterator."""
    batch, prompt_len = ids.shape
    slots_needed = prompt_len + max_new_tokens
    size = cache_size(slots_needed, model)
    with _cached(model, batch, size):
        with torch.inference_mode():
            attn, positions = attention_layout(mask, size)
            slots = torch.arange(size, device=ids.device)
            seen = (_seen_tokens(ids, mask, model.config.vocab_size)
                    if sampling.repetition_penalty != 1.0 else None)
            logits = prefill(model, ids, slots[:prompt_len], positions[:, :prompt_len],
                             attn[:, :, :prompt_len])
            token = sample_next(logits, sampling, seen)
        for slot in range(prompt_len, slots_needed - 1):
            yield token
            with torch.inference_mode():
                if seen is not None:
                    seen.scatter_(1, token[:, None], True)
                logits = decode_step(model, token[:, None], slots[slot:slot + 1],
                                     positions[:, slot:slot + 1], attn[:, :, slot:slot + 1])
                token = sample_next(logits, sampling, seen)
        yield token


def _speculative_tokens(model: GPT, draft: GPT, ids: torch.Tensor, mask: torch.Tensor,
                        max_new_tokens: int, num_draft_tokens: int) -> Iterator[torch.Tensor]:
    """Greedy decoding where `draft` guesses a few tokens and `model` checks them in one pass.

    The target keeps the longest prefix it agrees with plus its own next token, so the
    output is the target's greedy output. Rejected guesses need no undo: their cache slots
    lie beyond the current position, hidden by the causal mask and overwritten later.
    """
    prompt_len = ids.size(1)
    slots_needed = prompt_len + max_new_tokens
    size = cache_size(slots_needed, model, draft)
    with _cached(model, 1, size), _cached(draft, 1, size):
        with torch.inference_mode():
            attn, positions = attention_layout(mask, size)
            slots = torch.arange(size, device=ids.device)
            prompt = (slots[:prompt_len], positions[:, :prompt_len], attn[:, :, :prompt_len])
            token = prefill(model, ids, *prompt).argmax(-1)  # (1,)
            prefill(draft, ids, *prompt)
        yield token
        slot, emitted = prompt_len, 1  # `token` goes into `slot` next
        while emitted < max_new_tokens:
            with torch.inference_mode():
                k = min(num_draft_tokens, max_new_tokens - emitted - 1)
                guesses = [token]
                for i in range(k):
                    at = slot + i
                    logits = decode_step(draft, guesses[-1][:, None], slots[at:at + 1],
                                         positions[:, at:at + 1], attn[:, :, at:at + 1])
                    guesses.append(logits.argmax(-1))
                run = torch.cat(guesses)[None]  # (1, k + 1): current token, then the guesses
                span = slice(slot, slot + k + 1)
                verified = usable_logits(model, model(
                    run, input_pos=slots[span], position_ids=positions[:, span],
                    attn_mask=attn[:, :, span])[0]).argmax(-1)  # (k + 1,)
                agree = int((verified[:k] == run[0, 1:]).long().cumprod(0).sum())
                if agree == k:  # the draft never saw its last guess; give it that slot
                    at = slot + k
                    decode_step(draft, run[:, k:], slots[at:at + 1], positions[:, at:at + 1],
                                attn[:, :, at:at + 1])
                accepted = verified[:agree + 1]
            for new in accepted:
                yield new[None]
            slot, emitted = slot + agree + 1, emitted + agree + 1
            token = accepted[-1:]


# -- argument checks -----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                    repetition_penalty: float) -> None:
    if not isinstance(do_sample, bool):
        raise GptkitError(f"do_sample must be True or False; got {do_sample!r}.")
    if not _is_number(temperature) or temperature < 0:
        raise GptkitError(
            f"temperature must be a number >= 0 (0 means greedy); got {temperature!r}."
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise GptkitError(f"top_k must be an integer >= 0 (0 disables it); got {top_k!r}.")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise GptkitError(f"top_p must be a number in (0, 1]; got {top_p!r}.")
    if not _is_number(repetition_penalty) or repetition_penalty <= 0:
        raise GptkitError(
            "repetition_penalty must be a number > 0 (1.0 disables it); "
            f"got {repetition_penalty!r}."
        )
    if not do_sample and (temperature not in (0, 1.0) or top_k is not None or top_p is not None):
        warnings.warn("temperature, top_k and top_p only apply with do_sample=True; "
                      "decoding greedily.", stacklevel=4)


def check_sampling(*, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, repetition_penalty: float = 1.0,
                   seed: int | None = None) -> None:
    """Refuse invalid sampling settings in one sentence, before any text is generated (for
    callers such as `gptkit chat` that generate later, turn after turn)."""
    _check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty)
    if seed is not None and not _is_int(seed):
        raise GptkitError(f"seed must be an integer; got {seed!r}.")


def _check_count(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise GptkitError(f"{name} must be an integer >= 1; got {value!r}.")


def _make_generator(seed: int | None, generator: torch.Generator | None,
                    device: torch.device) -> torch.Generator | None:
    if seed is None:
        return generator
    if generator is not None:
        raise GptkitError("Pass either seed or generator, not both.")
    if not _is_int(seed):
        raise GptkitError(f"seed must be an integer; got {seed!r}.")
    return torch.Generator(device=device).manual_seed(seed)


def _check_prompt(input_ids: Any, attention_mask: Any, vocab_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids and mask as (B, P) tensors on the model's device, validated."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise GptkitError(
            "input_ids must be a non-empty 2-D tensor of token ids (batch, length); "
            f"got {_describe(input_ids)}."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise GptkitError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}.")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise GptkitError(
            f"input_ids holds ids from {int(input_ids.min())} to {int(input_ids.max())}; "
            f"expected ids in [0, {vocab_size}) for this model's vocabulary."
        )
    ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise GptkitError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}; "
            f"got {_describe(attention_mask)}."
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GptkitError("attention_mask must hold only 0 (pad) and 1 (token).")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    if not bool(mask[:, -1].all()):
        raise GptkitError(
            "attention_mask has a pad in the last column; pad prompts on the LEFT "
            "(tokenizer padding_side='left') so that every row ends with a real token."
        )
    return ids, mask


def _fit_context(ids: torch.Tensor, mask: torch.Tensor, max_length: int | None,
                 max_new_tokens: int | None, block_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Resolve the number of new tokens and make prompt + new tokens fit the context."""
    prompt_len = ids.size(1)
    if max_length is not None and max_new_tokens is not None:
        raise GptkitError(
            "Pass either max_length (which counts the prompt) or max_new_tokens, not both."
        )
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise GptkitError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}.")
    if max_length is not None:
        if not _is_int(max_length) or max_length <= prompt_len:
            raise GptkitError(
                f"max_length counts the prompt, so it must be an integer above the prompt length "
                f"{prompt_len}; got {max_length!r}."
            )
        max_new_tokens = max_length - prompt_len
    new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if prompt_len + new <= block_size:
        return ids, mask, new
    if prompt_len < block_size:
        warnings.warn(
            f"The prompt of {prompt_len} tokens leaves room for {block_size - prompt_len} new "
            f"tokens in the context of {block_size}; generating {block_size - prompt_len} "
            f"instead of {new}.",
            stacklevel=4,
        )
        return ids, mask, block_size - prompt_len
    if new >= block_size:
        raise GptkitError(
            f"max_new_tokens must be below the model's context of {block_size} tokens to leave "
            f"room for the prompt; got {new}."
        )
    keep = block_size - new
    warnings.warn(
        f"The prompt of {prompt_len} tokens is longer than the context of {block_size}; dropped "
        f"its first {prompt_len - keep} tokens to keep the last {keep} and generate {new}.",
        stacklevel=4,
    )
    ids, mask = ids[:, -keep:], mask[:, -keep:]
    if not bool(mask.any(1).all()):
        raise GptkitError("A prompt row holds only padding after truncation to the context.")
    return ids, mask, new


def _token_id(value: Any, name: str, vocab_size: int) -> int:
    if not _is_int(value) or not 0 <= value < vocab_size:
        raise GptkitError(f"{name} must be a token id below {vocab_size}; got {value!r}.")
    return value


def _eos_ids(eos_token_id: int | Sequence[int] | None, model: GPT, tokenizer: Any) -> list[int]:
    """End-of-text ids: the argument ([] for none), else the model config's, else the
    tokenizer's."""
    from_tokenizer = getattr(tokenizer, "eos_token_id", None)
    for value in (eos_token_id, model.config.eos_token_id, from_tokenizer):
        if value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [_token_id(v, "eos_token_id", model.config.vocab_size) for v in values]
    return []


def _check_stop(stop: list[str] | None, tokenizer: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise GptkitError(f"stop must be a list of non-empty strings; got {stop!r}.")
    if stop and tokenizer is None:
        raise GptkitError(
            "stop strings need a tokenizer to decode the generated tokens; pass tokenizer=."
        )
    return list(stop)


def _token_source(model: GPT, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                  sampling: Sampling, draft_model: GPT | None,
                  num_draft_tokens: int) -> Iterator[torch.Tensor]:
    """The plain or speculative decoder for these settings, checked."""
    if draft_model is None:
        return _sampled_tokens(model, ids, mask, max_new_tokens, sampling)
    if sampling.do_sample or sampling.repetition_penalty != 1.0:
        raise GptkitError(
            "draft_model (speculative decoding) supports greedy decoding only; "
            "drop do_sample and repetition_penalty."
        )
    if ids.size(0) != 1:
        raise GptkitError(f"draft_model supports a batch of one prompt; got {ids.size(0)} rows.")
    if not _is_int(num_draft_tokens) or num_draft_tokens < 1:
        raise GptkitError(f"num_draft_tokens must be an integer >= 1; got {num_draft_tokens!r}.")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise GptkitError(
            f"draft_model has vocab_size {draft_model.config.vocab_size} but the model has "
            f"{model.config.vocab_size}; they must share a vocabulary."
        )
    if draft_model.config.block_size < ids.size(1) + max_new_tokens:
        raise GptkitError(
            f"draft_model's context of {draft_model.config.block_size} tokens is shorter than "
            f"prompt + new tokens ({ids.size(1) + max_new_tokens})."
        )
    return _speculative_tokens(model, draft_model, ids, mask, max_new_tokens, num_draft_tokens)


# -- public API ----------------------------------------------------------------------------

def generate(
    model: GPT,
    input_ids: torch.Tensor,
    *,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    stop: list[str] | None = None,
    tokenizer: TextCodec | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    streamer: Callable[[torch.Tensor], None] | None = None,
    draft_model: GPT | None = None,
    num_draft_tokens: int = 4,
) -> torch.Tensor:
    """Continue each prompt row of `input_ids` (B, P); returns (B * num_return_sequences, P + n).

    Hugging Face semantics: the result includes the prompt; `max_length` counts the prompt
    (default: 20 new tokens); `eos_token_id` defaults to the model config's (the tokenizer's
    if it has none; [] for none); a row that ends early (eos, or a stop string) is padded with
    `pad_token_id` (default: the eos id) while the others go on, and generation ends when
    all rows have ended. Like transformers, a row that hits a stop string keeps the tokens
    that spelled it. `temperature=0` is greedy. `streamer(tokens)` receives each step's
    new tokens (rows,), pads included. Pad batched prompts on the left (`attention_mask`).
    A prompt longer than the context is cut from the left with a warning.
    """
    config = model.config
    device = model.device
    _check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty)
    ids, mask = _check_prompt(input_ids, attention_mask, config.vocab_size, device)
    ids, mask, new = _fit_context(ids, mask, max_length, max_new_tokens, config.block_size)
    eos = _eos_ids(eos_token_id, model, tokenizer)
    pad = (_token_id(pad_token_id, "pad_token_id", config.vocab_size)
           if pad_token_id is not None else (eos[0] if eos else None))
    stops = _check_stop(stop, tokenizer)
    if stops and pad is None:
        raise GptkitError(
            "stop strings need pad_token_id (or eos_token_id) to pad rows that stop early."
        )
    _check_count("num_return_sequences", num_return_sequences)
    _check_count("num_beams", num_beams)
    sampling = Sampling(do_sample and temperature > 0, temperature, top_k, top_p,
                        repetition_penalty, _make_generator(seed, generator, device))
    if num_beams > 1:
        if do_sample or draft_model is not None or stops or streamer is not None:
            raise GptkitError(
                "num_beams > 1 (beam search) does not support do_sample, draft_model, stop or "
                "streamer; use num_beams=1 for those."
            )
        if num_return_sequences > num_beams:
            raise GptkitError(
                f"num_return_sequences ({num_return_sequences}) must not exceed "
                f"num_beams ({num_beams})."
            )
        if not _is_number(length_penalty):
            raise GptkitError(f"length_penalty must be a number; got {length_penalty!r}.")
        if early_stopping not in (True, False, "never"):
            raise GptkitError(
                f"early_stopping must be True, False or 'never'; got {early_stopping!r}."
            )
        with torch.inference_mode():
            return _beam_search(model, ids, mask, new, num_beams=num_beams,
                                num_return_sequences=num_return_sequences,
                                length_penalty=float(length_penalty),
                                early_stopping=early_stopping, eos=eos, pad=pad,
                                repetition_penalty=repetition_penalty)
    ids = ids.repeat_interleave(num_return_sequences, 0)
    mask = mask.repeat_interleave(num_return_sequences, 0)
    tokens = _token_source(model, ids, mask, new, sampling, draft_model, num_draft_tokens)
    with torch.inference_mode(), closing(tokens):
        return _collect(tokens, ids, new, eos, pad, stops, tokenizer, streamer)


def _collect(tokens: Iterator[torch.Tensor], ids: torch.Tensor, max_new_tokens: int,
             eos: list[int], pad: int | None, stops: list[str], tokenizer: TextCodec | None,
             streamer: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """Write the tokens after the prompts, pad rows that have ended, stop when all have."""
    rows, prompt_len = ids.shape
    out = torch.full((rows, prompt_len + max_new_tokens), 0 if pad is None else pad,
                     dtype=torch.long, device=ids.device)
    out[:, :prompt_len] = ids
    # Bookkeeping in Python ints: a decode step's token is a few numbers, and tensor ops
    # on them would cost more than they check.
    ended = [False] * rows
    eos_set = set(eos)
    texts = [TextStream(tokenizer, stops) for _ in range(rows)] if stops else []
    end = prompt_len
    for token in tokens:
        if pad is not None and any(ended):
            token = token.masked_fill(torch.tensor(ended, device=token.device), pad)
        out[:, end] = token
        end += 1
        if streamer is not None:
            streamer(token)
        for row, value in enumerate(token.tolist()):
            if not ended[row]:  # an eos token ends the row before its text is pushed
                ended[row] = value in eos_set or (bool(texts) and texts[row].push(value)[1])
        if all(ended):
            break
    return out[:, :end]


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class TextStream:
    """Tokens in, printable text out, one token at a time, for every streaming consumer.

    Only the tokens since the text last ended on a whole character are decoded again, so
    a long generation costs linear time. Text is released once it decodes without a
    trailing U+FFFD (a character split across tokens, as most CJK characters are in
    byte-level BPE, arrives whole) and once it cannot be the start of a stop string; a
    stop string ends the stream and is not released.
    """

    def __init__(self, tokenizer: TextCodec, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.pending: list[int] = []  # tokens since the text last ended on a whole character
        self.shown = 0  # characters of decode(pending) already moved to `held`
        self.held = ""  # decoded text not yet released: it might begin a stop string

    def push(self, token: int) -> tuple[str, bool]:
        """The text `token` makes ready, and whether a stop string has now appeared."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        # UTF-8 decoders give one U+FFFD for a sequence whose other bytes are to come.
        whole = len(text) - text.endswith("\ufffd")
        self.held += text[self.shown:whole]
        self.shown = whole
        if whole == len(text):
            self.pending.clear()
            self.shown = 0
        hits = [self.held.find(s) for s in self.stops if s in self.held]
        if hits:
            ready, self.held = self.held[:min(hits)], ""
            return ready, True
        cut = len(self.held) - _partial_stop(self.held, self.stops)
        ready, self.held = self.held[:cut], self.held[cut:]
        return ready, False

    def rest(self) -> str:
        """Everything not yet released, for when generation ends without a stop string."""
        tail = self.held + (self.tokenizer.decode(self.pending)[self.shown:] if self.pending else "")
        self.pending, self.shown, self.held = [], 0, ""
        return tail


def stream_generate(
    model: GPT,
    tokenizer: TextCodec,
    prompt: str,
    *,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    stop: list[str] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    draft_model: GPT | None = None,
    num_draft_tokens: int = 4,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as they are printable.

    Text is yielded once it decodes without a trailing U+FFFD, so a character split
    across tokens (most CJK characters in byte-level BPE) arrives whole. Ends at
    eos or at a stop string; neither is yielded, and text that might begin a stop string
    is held back until it is clear. Arguments mean what they mean for `generate`; they are
    checked at the call, before any text exists. The model is in eval mode with a cache
    until the iterator is exhausted or closed.
    """
    config = model.config
    device = model.device
    if not isinstance(prompt, str):
        raise GptkitError(f"prompt must be a string; got {type(prompt).__name__}.")
    _check_sampling(do_sample, temperature, top_k, top_p, repetition_penalty)
    encoded = _prompt_ids(tokenizer, prompt)
    if not encoded:
        raise GptkitError("prompt encodes to no tokens; give at least one character of text.")
    ids, mask = _check_prompt(torch.tensor([encoded]), None, config.vocab_size, device)
    ids, mask, new = _fit_context(ids, mask, max_length, max_new_tokens, config.block_size)
    eos = set(_eos_ids(eos_token_id, model, tokenizer))
    stops = _check_stop(stop, tokenizer)
    sampling = Sampling(do_sample and temperature > 0, temperature, top_k, top_p,
                        repetition_penalty, _make_generator(seed, generator, device))
    tokens = _token_source(model, ids, mask, new, sampling, draft_model, num_draft_tokens)
    return _text_pieces(tokens, TextStream(tokenizer, stops), eos)


def _text_pieces(tokens: Iterator[torch.Tensor], text: TextStream, eos: set[int]
                 ) -> Iterator[str]:
    """The printable text of a one-row token source, up to eos or a stop string."""
    with closing(tokens):
        for token in tokens:
            token_id = int(token[0])
            if token_id in eos:
                break
            ready, stopped = text.push(token_id)
            if ready:
                yield ready
            if stopped:
                return
    tail = text.rest()
    if tail:
        yield tail


def beam_texts(model: GPT, tokenizer: TextCodec, prompt: str, *, num_beams: int,
               num_return_sequences: int = 1, **settings: Any) -> list[str]:
    """Beam search on one text prompt: the `num_return_sequences` best whole texts (prompt
    included, eos dropped), best first. `settings` are more of `generate`'s arguments
    (max_new_tokens, repetition_penalty, ...); it refuses those beam search cannot honour."""
    ids = torch.tensor([_prompt_ids(tokenizer, prompt)])
    out = generate(model, ids, num_beams=num_beams, num_return_sequences=num_return_sequences,
                   tokenizer=tokenizer, **settings)
    eos = model.config.eos_token_id
    return [tokenizer.decode([t for t in row if t != eos]) for row in out.tolist()]


# -- the generate command ------------------------------------------------------------------

SEPARATOR = "-" * 40  # the line between the sequences `gptkit generate` prints


def sampling_settings(*, greedy: bool, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, repetition_penalty: float = 1.0,
                      seed: int | None = None) -> dict[str, Any]:
    """`generate`'s sampling arguments for the command line's flags.

    Every value is checked, even those `greedy` leaves unused, so a bad one is refused
    rather than ignored. Greedy gives no sampling arguments at all: the flags' defaults
    (temperature 0.8) would otherwise warn that greedy decoding ignores them.
    """
    check_sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed)
    settings: dict[str, Any] = {} if greedy else dict(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if repetition_penalty != 1.0:
        settings["repetition_penalty"] = repetition_penalty
    return settings


def print_generations(model: GPT, tokenizer: TextCodec, prompt: str, *, sampling: dict[str, Any],
                      num_return_sequences: int = 1, num_beams: int = 1,
                      max_new_tokens: int | None = None, stop: list[str] | None = None,
                      draft_model: GPT | None = None) -> None:
    """What `gptkit generate PROMPT` prints: each sequence streamed as it is generated, or
    with `num_beams` > 1 the best whole texts of beam search (greedy: it ignores the
    sampling settings but their repetition penalty), with a line between sequences.

    Every setting is checked before the first character is printed. With a seed, sequence
    i draws with seed + i, so the sequences differ and a run can be repeated.
    """
    _check_count("num_return_sequences", num_return_sequences)
    if num_beams > 1:
        texts = beam_texts(model, tokenizer, prompt, num_beams=num_beams,
                           num_return_sequences=num_return_sequences,
                           max_new_tokens=max_new_tokens, stop=stop, draft_model=draft_model,
                           repetition_penalty=sampling.get("repetition_penalty", 1.0))
        print(f"\n{SEPARATOR}\n".join(texts))
        return
    for index in range(num_return_sequences):
        if index:
            print(f"\n{SEPARATOR}")
        settings = dict(sampling)
        if settings.get("seed") is not None:
            settings["seed"] += index
        pieces = stream_generate(  # checks every setting before anything is printed
            model, tokenizer, prompt, max_new_tokens=max_new_tokens, stop=stop,
            draft_model=draft_model, **settings)
        print(prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()


# -- beam search -----------------------------------------------------------------------------

def _beam_search(model: GPT, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *,
                 num_beams: int, num_return_sequences: int, length_penalty: float,
                 early_stopping: bool | str, eos: list[int], pad: int | None,
                 repetition_penalty: float) -> torch.Tensor:
    """Beam search as transformers (>= 4.50) runs it, step for step, so tokens match.

    Each step keeps the best K = max(2, 1 + len(eos)) * num_beams continuations of all
    beams (so enough stay open when some end), continues the best num_beams unfinished
    ones, and merges ended ones (score / length ** length_penalty) into a per-prompt list
    of the num_beams best finished hypotheses. Shapes: B prompts, N beams, L max length.
    """
    batch, prompt_len = ids.shape
    beams, vocab = num_beams, model.config.vocab_size
    total = prompt_len + max_new_tokens
    keep = max(2, 1 + len(eos)) * beams
    rows = batch * beams
    device = ids.device
    ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    top_beams = torch.arange(keep, device=device) < beams  # only these may end a hypothesis
    row_base = torch.arange(batch, device=device)[:, None] * beams

    running = torch.full((batch, beams, total), 0 if pad is None else pad, dtype=torch.long,
                         device=device)
    running[:, :, :prompt_len] = ids.view(batch, beams, prompt_len)
    finished = running.clone()
    # Only beam 0 starts live, so the first step does not pick the same token N times.
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG
    finished_scores = torch.full((batch, beams), _NEG, device=device)
    finished_lens = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    seen = _seen_tokens(ids, mask, vocab) if repetition_penalty != 1.0 else None

    def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.take_along_dim(index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)

    size = cache_size(total, model)
    with _cached(model, rows, size):
        attn, positions = attention_layout(mask, size)
        slots = torch.arange(size, device=device)
        logits = prefill(model, ids, slots[:prompt_len], positions[:, :prompt_len],
                         attn[:, :, :prompt_len])
        for cur in range(prompt_len, total):
            log_probs = F.log_softmax(logits.float(), dim=-1)
            if seen is not None:
                log_probs = apply_repetition_penalty(log_probs, seen, repetition_penalty)
            log_probs = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None])
            top_scores, top_index = log_probs.view(batch, beams * vocab).topk(keep)
            source = top_index // vocab  # (B, K) which beam each candidate extends
            token = top_index % vocab
            candidates = gather(running, source)
            candidates[:, :, cur] = token
            ends = torch.isin(token, eos_ids) | (cur + 1 >= total)

            # The best N candidates that have not ended go on.
            open_scores = top_scores + ends.float() * _NEG
            chosen = open_scores.topk(beams)[1]
            running = gather(candidates, chosen)
            running_scores = gather(open_scores, chosen)

            # Ended candidates among the top N compete for the finished list.
            just_ended = ends & top_beams[None, :]
            scores = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
            full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
            scores += full.float() * _NEG
            scores += (~improvable).float() * _NEG
            scores += (~just_ended).float() * _NEG
            merged = torch.cat((finished_scores, scores), 1).topk(beams)[1]
            finished = gather(torch.cat((finished, candidates), 1), merged)
            finished_scores = gather(torch.cat((finished_scores, scores), 1), merged)
            finished_lens = gather(torch.cat(
                (finished_lens, torch.full_like(token, cur + 1 - prompt_len)), 1), merged)
            is_finished = gather(torch.cat((is_finished, just_ended), 1), merged)

            # Could a running beam still beat the worst finished hypothesis?
            best_len = (total - prompt_len if early_stopping == "never" and length_penalty > 0
                        else cur + 1 - prompt_len)
            best_running = running_scores[:, :1] / (best_len ** length_penalty)
            worst = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], _NEG)
            improvable = improvable & (best_running > worst).any(-1, keepdim=True)
            if (not bool(improvable.any()) or bool(ends.all())
                    or (early_stopping is True and bool(is_finished.all()))):
                break

            parents = (gather(source, chosen) + row_base).view(rows)
            model.reorder_cache(parents)
            last = running[:, :, cur].reshape(rows, 1)
            if seen is not None:
                seen = seen[parents].scatter_(1, last, True)
            logits = decode_step(model, last, slots[cur:cur + 1], positions[:, cur:cur + 1],
                                 attn[:, :, cur:cur + 1])
    best = finished[:, :num_return_sequences].reshape(batch * num_return_sequences, total)
    return best[:, :prompt_len + int(finished_lens[:, :num_return_sequences].max())]
