"""The GPT-2 network: embeddings, causal self-attention, MLP, blocks, LM head, KV cache.

The network only: how its operations run fast (fused kernels, compiled forms, inference
layouts) is `gptkit.kernels`' business, and files are `gptkit.checkpoint`'s.

Module and parameter names mirror Hugging Face's `GPT2LMHeadModel` (transformer.wte,
transformer.h.0.attn.c_attn, ...) so checkpoints convert by name; the only layout
difference is that we use `nn.Linear` (out, in) where GPT-2 used Conv1D (in, out).

Shapes in comments: B batch, T new tokens, S cache slots, C = n_embd, nh heads,
hs = C // nh head size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from gptkit import checkpoint
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.kernels import attention, gelu_tanh, lm_head_loss

# The decode step's signature: (tokens (B, 1), input_pos, position_ids, attn_mask) -> logits (B, V)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class KVCache(nn.Module):
    """Static, preallocated keys and values of one layer, written slot by slot.

    Preallocating (instead of torch.cat per step) keeps every decode step the same
    shape, which is what lets `torch.compile` and CUDA graphs reuse one program.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, nh, S, hs)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def empty(cls, batch_size: int, n_head: int, max_slots: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str | None) -> KVCache:
        shape = (batch_size, n_head, max_slots, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 of this one, sharing its memory (a batch of
        requests that occupies part of a larger pool)."""
        return KVCache(self.k[start:stop], self.v[start:stop])

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at slots `input_pos` and return the whole cache.

        `input_pos` is (T,) when every row writes the same slots, or (B, T) when rows
        sit at different positions (continuous batching).
        """
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is (B, T, nh, hs)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(hs)) V over earlier positions only, for nh heads at once."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("a model with a KV cache needs input_pos (the cache slots to write)")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, S, hs)
        # Flash / memory-efficient kernels where available; the causal mask is implicit
        # in training and explicit (over cache slots and padding) in generation.
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and self.kv_cache is None,
                      dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: 4x wider, GELU (tanh approximation, as GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, attn_mask)
        return x + self.mlp(self.ln_2(x))


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without drawing random weights that a checkpoint will replace.

    Loading skips both the cost of initialising (seconds for large models) and the meta
    device, whose initialisers import torch's compiler stack (~1 s) on the way to the
    first generated token.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class GPT(nn.Module):
    """A GPT-2 language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output projection reuses the token
        # embedding, saving V*C parameters; GPT-2 does the same.
        self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        # The inference contract: `gptkit.inference` may install a compiled decode step,
        # which generation then runs instead of `forward` (see `gptkit.generate.decode_step`).
        self.compiled_decode: DecodeStep | None = None
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer): each block adds
        # two of them to the residual stream, whose variance would otherwise grow.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so its inputs and caches) live."""
        return self.transformer.wte.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, *, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T); (B, 1, V) with `last_only`.

        Training: call with `idx` alone (causal attention, positions 0..T-1), or with
        `targets` (B, T) to get the mean next-token cross-entropy instead of the logits
        (IGNORE_INDEX targets add nothing); the head and the loss then run as one step
        that never keeps the logits (see `gptkit.kernels.lm_head_loss`).
        Generation with a cache (see `setup_cache`): `input_pos` names the cache slots
        the T new tokens occupy, `position_ids` (B, T) their positions (they differ
        from slots under left padding), `attn_mask` (B, 1, T, S) which slots each
        token may attend to (True = attend). `last_only` skips the LM head for all but
        the last position, which is all a prompt's prefill needs (the head is the
        largest matmul of a small model).
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.block_size}")
        if position_ids is None:
            start = 0 if input_pos is None else input_pos.reshape(-1)[0]
            position_ids = (torch.arange(T, device=idx.device) + start).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, input_pos, attn_mask, use_reentrant=False)
            else:
                x = block(x, input_pos, attn_mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x)
        return lm_head_loss(x, self.lm_head, targets)

    # -- KV cache --------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_slots: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Preallocate a KV cache of `max_slots` positions for `batch_size` rows."""
        if max_slots > self.config.block_size:
            raise GptkitError(f"A cache of {max_slots} positions exceeds the model's context of "
                              f"{self.config.block_size}.")
        weight = self.transformer.wte.weight
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        device = device or self.device
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache.empty(batch_size, self.config.n_head, max_slots,
                                          self.config.head_dim, dtype, device)

    def clear_cache(self) -> None:
        self.kv_caches = [None] * len(self.transformer.h)

    @property
    def kv_caches(self) -> list[KVCache | None]:
        """Each layer's cache, so callers can save and restore them around generation."""
        return [block.attn.kv_cache for block in self.transformer.h]

    @kv_caches.setter
    def kv_caches(self, caches: list[KVCache | None]) -> None:
        for block, cache in zip(self.transformer.h, caches, strict=True):
            block.attn.kv_cache = cache

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Row i of every layer's cache becomes old row `rows[i]` (beam search)."""
        for cache in self.kv_caches:
            cache.k.copy_(cache.k.index_select(0, rows))
            cache.v.copy_(cache.v.index_select(0, rows))

    # -- model directories (Hugging Face GPT-2 layout) -------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> GPT:
        """Load a model directory written by gptkit or `transformers`, or a hub name like 'gpt2'."""
        directory = checkpoint.resolve_model_dir(name_or_dir)
        config, state = checkpoint.load(directory)
        return cls.from_state_dict(config, state, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state: dict[str, torch.Tensor],
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> GPT:
        """A model of `config` holding the tensors of `state` (checked by the caller), in eval mode."""
        with skip_weight_init():
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
        model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json, model.safetensors and generation_config.json atomically."""
        checkpoint.save_model(self, directory)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Hugging Face style `generate`; see `gptkit.generate.generate` for the arguments."""
        from gptkit.generate import generate

        return generate(self, input_ids, **kwargs)
