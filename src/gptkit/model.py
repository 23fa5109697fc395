"""The network: embeddings, positions, attention, MLP, norms, blocks, LM head, KV cache.

One implementation builds every architecture family of `gptkit.families`: GPT-2
(learned positions, LayerNorm, GELU), Llama (rotary positions, RMSNorm, SwiGLU,
grouped-query attention), Qwen3 (Llama plus QK-norm) and nanochat (rotary positions,
parameter-free RMSNorm also after the embedding, QK-norm, ReLU², soft-capped logits) and
Gemma 3 (sliding-window layers with their own rotary base, sandwich norms, GeGLU, scaled
embeddings). The config says which; the code below differs between them only where the
families do.

The network only: how its operations run fast (fused kernels, compiled forms, inference
layouts) is `gptkit.kernels`' business, and files are `gptkit.checkpoint`'s.

Module and parameter names are GPT-2's (`GPT2LMHeadModel`: transformer.wte,
transformer.h.0.attn.c_attn, ...) for every family, with q, k, v in one projection
(`c_attn`) and a gated MLP's gate and up projections in one (`c_fc`), so that inference
layouts and LoRA see the same four linear layers per block; `gptkit.checkpoint` splits
and renames them into each family's Hugging Face tensors. We use `nn.Linear` (out, in)
where GPT-2 used Conv1D (in, out).

Shapes in comments: B batch, T new tokens, S cache slots, C = n_embd, nh query heads,
nkv key/value heads, hs head size, I MLP width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gptkit import checkpoint
from gptkit.config import GATED_MLPS, GPTConfig
from gptkit.errors import GptkitError
from gptkit.families import rope
from gptkit.kernels import attention, gelu_tanh, lm_head_loss

# The decode step's signature: (tokens (B, 1), input_pos, position_ids, attn_mask) -> logits (B, V)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin of each position's angles, (B or 1, 1, T, hs)


class KVCache(nn.Module):
    """Static, preallocated keys and values of one layer, written slot by slot.

    Preallocating (instead of torch.cat per step) keeps every decode step the same
    shape, which is what lets `torch.compile` and CUDA graphs reuse one program.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, nkv, S, hs)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def empty(cls, batch_size: int, n_head: int, max_slots: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str | None,
              zeroed: bool = True) -> KVCache:
        shape = (batch_size, n_head, max_slots, head_dim)
        make = torch.zeros if zeroed else torch.empty
        return cls(make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device))

    def rows(self, start: int, stop: int, slots: int | None = None) -> KVCache:
        """A cache over rows start..stop-1 (and the first `slots` slots) of this one, sharing
        its memory: a batch of requests that occupies part of a larger pool, whose
        attention need not read slots no row has reached yet."""
        return KVCache(self.k[start:stop, :, :slots], self.v[start:stop, :, :slots])

    def gather(self, rows: torch.Tensor, slots: int) -> KVCache:
        """A copy of some rows (B,), adjacent or not, over the first `slots` slots: rows that
        no view can share run a forward pass in it, then go back with `scatter`."""
        return KVCache(self.k[rows, :, :slots], self.v[rows, :, :slots])

    def scatter(self, rows: torch.Tensor, part: KVCache) -> None:
        """Write `part`, a `gather` of `rows`, back into those rows."""
        slots = part.k.size(2)
        self.k[rows, :, :slots] = part.k
        self.v[rows, :, :slots] = part.v

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at slots `input_pos` and return the whole cache.

        `input_pos` is (T,) when every row writes the same slots, or (B, T) when rows
        sit at different positions (continuous batching).
        """
        if input_pos.dim() == 1 or input_pos.size(0) == 1:  # one set of slots: a cheap copy
            self.k.index_copy_(2, input_pos.view(-1), k)
            self.v.index_copy_(2, input_pos.view(-1), v)
        else:
            rows = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is (B, T, nkv, hs)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The family's normalisation over the last `dim` features.

    LayerNorm (GPT-2) subtracts the mean and divides by the standard deviation, then
    applies a gain and a bias. RMSNorm (Zhang & Sennrich 2019; Llama, Qwen3) only
    divides by the root mean square, x / sqrt(mean(x^2) + eps), then applies a gain;
    nanochat drops the gain too, so its norms have no parameters at all; Gemma's gain is
    1 + weight (`UnitOffsetRMSNorm`).
    """
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.layer_norm_epsilon)
    if config.norm == "rmsnorm_unit_offset":
        return UnitOffsetRMSNorm(dim, eps=config.layer_norm_epsilon)
    return nn.RMSNorm(dim, eps=config.layer_norm_epsilon,
                      elementwise_affine=config.norm == "rmsnorm")


class UnitOffsetRMSNorm(nn.Module):
    """RMSNorm whose gain is 1 + weight, the weight starting at 0 (Gemma): computed in fp32
    and rounded once at the end, as transformers' Gemma3RMSNorm does in any dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rope_frequencies(config: GPTConfig, device: torch.device | str | None = None,
                     local: bool = False) -> torch.Tensor:
    """Rotary positions' angular frequencies, theta^(-2i/hs) for i < hs/2 (hs/2,), fp32.

    Pair i turns by position * frequency[i]: the first pairs fast, the last ones slowly,
    like the hands of a clock. `rope_scaling` stretches the slow ones for longer contexts
    (`gptkit.families.rope.scale_frequencies`). `local`: the sliding-window layers' own
    base, `rope_local_theta`, never scaled (their window is shorter than any context).
    """
    hs = config.head_dim
    exponents = torch.arange(0, hs, 2, dtype=torch.int64, device=device).float() / hs
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** exponents)
    return rope.scale_frequencies(inv_freq, None if local else config.rope_scaling, torch.where)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021): the angles cos and sin by which
    each position turns its queries' and keys' dimension pairs.

    Rotating q at position m by m*f and k at position n by n*f makes their dot product
    depend on m - n only: attention sees relative positions, with no learned table and
    no fixed maximum. The frequencies are constants of the config: they follow the
    model's device but stay fp32 whatever dtype the model is cast to.
    """

    def __init__(self, config: GPTConfig, local: bool = False) -> None:
        super().__init__()
        self.config, self.local = config, local
        self.register_buffer("inv_freq", rope_frequencies(config, local=local), persistent=False)
        self.sin_sign = config.family.rope_sin_sign  # -1: the family turns the other way

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rope:
        """cos, sin (B or 1, 1, T, hs) for positions (B or 1, T)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hs/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # dimension i pairs with i + hs/2
        return (angles.cos().to(dtype).unsqueeze(1),
                (self.sin_sign * angles.sin()).to(dtype).unsqueeze(1))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> RotaryEmbedding:
        super()._apply(fn, recurse)
        # fp32 again
        self.inv_freq = rope_frequencies(self.config, self.inv_freq.device, self.local)
        return self


def window_mask(query: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """(..., T, S) True where key slot s lies in the sliding window of query slot q (`query`
    (..., T)): q - window < s <= q, the `window` slots up to and including its own, as
    transformers' sliding layers see them. A row's tokens fill consecutive slots (after any
    left padding), so slot distance is position distance."""
    distance = query[..., None] - torch.arange(n_keys, device=query.device)
    return (distance >= 0) & (distance < window)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its angle.

    The "rotate half" layout of Hugging Face's Llama: (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin) with x1, x2 the two halves of each head.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(hs)) V over earlier positions only, for nh heads at once.

    With grouped-query attention (Ainslie et al. 2023) nkv < nh: each key/value head
    serves nh / nkv consecutive query heads, which shrinks the KV cache by that factor.
    A sliding-window layer (Gemma 3; Beltagy et al. 2020) sees only its last `window` slots,
    which bounds what a long context costs it.
    """

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.window = config.window(layer)  # None: every earlier slot
        self.scale = config.attn_scale  # None: 1 / sqrt(hs)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_width, self.kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.dropout = config.dropout
        # q, k, v in one matmul: (C) -> (nh + 2 nkv) * hs
        self.c_attn = nn.Linear(config.n_embd, self.q_width + 2 * self.kv_width,
                                bias=config.has_qkv_bias)
        self.c_proj = nn.Linear(self.q_width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm (Qwen3, nanochat): each head's queries and keys RMS-normalised, which
        # bounds the attention logits and so steadies training at high learning rates
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.kv_cache: KVCache | None = None

    def project(self, x: torch.Tensor, rope: Rope | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of x (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.q_width, self.kv_width, self.kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            # Qwen3 normalises, then rotates; nanochat rotates, then normalises. A rotation
            # keeps a head's length, so the order changes nothing but rounding.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("a model with a KV cache needs input_pos (the cache slots to write)")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hs)
        if self.window is not None:  # the slots of the new tokens' queries, against all keys
            query = input_pos if self.kv_cache is not None else torch.arange(T, device=x.device)
            band = window_mask(query, k.size(2), self.window)  # (T, S) or (B, T, S)
            band = band.unsqueeze(-3) if band.dim() == 3 else band
            attn_mask = band if attn_mask is None else attn_mask & band
        # Flash / memory-efficient kernels where available; the causal mask is implicit
        # in training and explicit (over cache slots and padding) in generation.
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and self.kv_cache is None,
                      dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, self.q_width)  # heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, C -> I -> C, with the family's nonlinearity.

    gelu (GPT-2): GELU in its tanh approximation, I = 4C. relu2 (nanochat): relu(x)^2,
    as cheap as ReLU and as smooth near 0 as GELU needs (So et al. 2021). swiglu (Llama,
    Qwen3): silu(x W_gate) * (x W_up), a gate learnt per feature (Shazeer 2020); geglu
    (Gemma) gates with GPT-2's GELU instead of silu. The two input projections of a gated
    MLP are one matrix here, c_fc (C -> 2I), gate rows first.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        width = config.intermediate_size
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.kind in GATED_MLPS else width,
                              bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, I), or (B, T, 2I) for a gated MLP
        if self.kind in GATED_MLPS:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.kind == "swiglu" else gelu_tanh(gate)) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = gelu_tanh(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With sandwich norms (Gemma 2 and 3) each sublayer's output is normalised too before
    it joins the residual stream, x + norm(attn(norm(x))), which keeps every block's
    contribution at a bounded scale however large its weights grow.
    """

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        sandwich = config.sandwich_norm
        self.ln_post_attn = make_norm(config, config.n_embd) if sandwich else nn.Identity()
        self.ln_post_mlp = make_norm(config, config.n_embd) if sandwich else nn.Identity()

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.ln_post_attn(self.attn(self.ln_1(x), input_pos, attn_mask, rope))
        return x + self.ln_post_mlp(self.mlp(self.ln_2(x)))


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
    """A decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if not config.rope:  # GPT-2's learned position embeddings
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.embed_norm:  # nanochat normalises the embedding before the first block
            layers["ln_emb"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.rotary = RotaryEmbedding(config) if config.rope else None
        # the sliding-window layers' own rotary base (Gemma 3), else they share `rotary`
        self.rotary_local = (RotaryEmbedding(config, local=True)
                             if config.rope and config.rope_local_theta is not None else None)
        # Gemma scales the embeddings by sqrt(C), rounded to their dtype as transformers does
        self.register_buffer("embed_scale", torch.tensor(config.n_embd ** 0.5)
                             if config.embed_scale else None, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # Weight tying (Press & Wolf 2017): the output projection reuses the token
            # embedding, saving V*C parameters; GPT-2 does the same.
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        # The inference contract: `gptkit.inference` may install a compiled decode step,
        # which generation then runs instead of `forward` (see `gptkit.generate.decode_step`).
        self.compiled_decode: DecodeStep | None = None
        # Token ids at or above this are never generated: a vocabulary padded beyond its
        # tokenizer's (GPT-2's 50,257 to 50,304) has rows no tokenizer can decode.
        self.token_limit: int = config.vocab_size
        if config.family.init == "nanochat":
            self._init_nanochat()
            return
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

    def _init_nanochat(self) -> None:
        """nanochat's initialisation: each matrix at std 1/sqrt(fan_in) (shrunk for wide
        inputs, arXiv 2310.17022), embeddings at std 1 (a norm follows them), and the
        residual projections and the head at zero, so every block starts as the identity
        and the first logits are uniform."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if not self.config.tie_word_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so its inputs and caches) live."""
        return self.transformer.wte.weight.device

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

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
        x = self.hidden_states(idx, position_ids, input_pos, attn_mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        # nanochat's soft-cap, cap * tanh(logits / cap), keeps logits in (-cap, cap)
        cap = self.config.logit_softcap
        if targets is None:
            logits = self.lm_head(x)
            return cap * torch.tanh(logits / cap) if cap else logits
        return lm_head_loss(x, self.lm_head, targets, softcap=cap)

    def hidden_states(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                      input_pos: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output (B, T, C), before the final norm and the LM head; with
        a cache it has also written the tokens' keys and values. A serving engine calls it
        for prompt tokens whose next-token logits nobody needs. Arguments as `forward`."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.block_size}")
        if position_ids is None:
            start = 0 if input_pos is None else input_pos.reshape(-1)[0]
            position_ids = (torch.arange(T, device=idx.device) + start).unsqueeze(0)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        rope = local = None
        if self.rotary is not None:
            rope = local = self.rotary(position_ids, x.dtype)  # positions enter inside attention
            if self.rotary_local is not None:
                local = self.rotary_local(position_ids, x.dtype)
        else:
            x = x + self.transformer.wpe(position_ids)
        if self.config.embed_norm:
            x = self.transformer.ln_emb(x)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            angles = rope if block.attn.window is None else local
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, input_pos, attn_mask, angles, use_reentrant=False)
            else:
                x = block(x, input_pos, attn_mask, angles)
        return x

    # -- KV cache --------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_slots: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, zeroed: bool = True) -> None:
        """Preallocate a KV cache of `max_slots` positions for `batch_size` rows.

        `zeroed=False` leaves it uninitialized, for a caller that zeroes every slot before
        attention first reads it: memory never reached is then never touched (a serving
        engine's pool, sized for its longest possible rows)."""
        if max_slots > self.config.block_size:
            raise GptkitError(f"A cache of {max_slots} positions exceeds the model's context of "
                              f"{self.config.block_size}.")
        weight = self.transformer.wte.weight
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        device = device or self.device
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache.empty(batch_size, self.config.n_kv_head, max_slots,
                                                self.config.head_dim, dtype, device, zeroed)

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

    # -- model directories (the family's Hugging Face layout) --------------------------

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
        """A model of `config` holding the tensors of `state` (checked by the caller), in eval
        mode, its weights `dtype` or else float32 whatever the file's type (hub models are
        mostly saved in bfloat16; gptkit computes in float32 unless asked otherwise)."""
        with skip_weight_init():
            model = cls(config)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
        model.to(device=device, dtype=dtype or torch.float32)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json, model.safetensors and generation_config.json atomically."""
        checkpoint.save_model(self, directory)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Hugging Face style `generate`; see `gptkit.generate.generate` for the arguments."""
        from gptkit.generate import generate

        return generate(self, input_ids, **kwargs)


def decode_logits(model: GPT, tokens: torch.Tensor, input_pos: torch.Tensor,
                  position_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The uncompiled decode step (a `DecodeStep`): next-token logits (B, V) for one new
    token per row (B, 1), reading and writing the model's KV cache."""
    return model(tokens, position_ids=position_ids, input_pos=input_pos, attn_mask=attn_mask)[:, 0]
