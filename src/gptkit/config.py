"""Model configuration: one dataclass, the architecture families, named presets, HF JSON in and out.

`GPTConfig` is saved as the Hugging Face `config.json` of its family (`gptkit.families`
translates each) next to every model, so `transformers` opens our directories and we open
theirs. This module must stay light (no torch) so that `gptkit --help` is fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError, closest
from gptkit.families import FAMILIES, Family, by_model_type, family, rope, unknown

GPT2_VOCAB_SIZE = 50257

# Architecture presets. `tiny` and `small` are for laptops and tests; the rest are
# the published GPT-2 shapes (Radford et al. 2019).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}

# MLPs whose first projection gives a gate and an up half (two matrices in one)
GATED_MLPS = ("swiglu", "geglu")
# `GPTConfig.layer_types` entries, as Hugging Face names them
LAYER_TYPES = ("full_attention", "sliding_attention")

# `TrainConfig.optimizer` values (see gptkit.optim).
OPTIMIZERS = ("adamw", "muon")

# Sizes beyond these are certainly a corrupted or hostile config.json; refusing them
# early avoids a giant allocation.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 20


@dataclass
class GPTConfig:
    """Shape and architecture of a decoder-only Transformer (GPT-2, Llama, Qwen3 or nanochat).

    Fields left at None take `arch`'s default; a value the family's transformers class
    cannot express is refused, so every config saves as that family's config.json.
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 1024  # context length (GPT-2's n_positions, max_position_embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float | None = None  # epsilon of every norm (LayerNorm or RMSNorm)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    arch: str = "gpt2"  # a family of gptkit.families
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); n_head
    head_dim: int | None = None  # width of one head; n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; 4 n_embd (SwiGLU: ~8/3 n_embd)
    norm: str | None = None  # "layernorm", "rmsnorm", "rmsnorm_unweighted", "rmsnorm_unit_offset"
    mlp: str | None = None  # "gelu", "swiglu", "geglu" or "relu2"
    qk_norm: bool | None = None
    bias: bool | None = None  # biases in the blocks' linear layers
    qkv_bias: bool | None = None  # biases in the query/key/value projection; None: as `bias`
    tie_word_embeddings: bool | None = None  # the LM head reuses the token embedding
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); 0 = none
    rope_theta: float | None = None  # base wavelength of rotary positions; 10000
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    # sliding-window attention (Gemma 3): each layer's LAYER_TYPES entry (None: all full), the
    # cache slots a sliding layer's query sees (its own and the sliding_window - 1 before it),
    # and the rope base of the sliding layers, whose positions are never scaled (None: rope_theta)
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: int | None = None  # attention scores are q.k / sqrt(this); head_dim

    def __post_init__(self) -> None:
        limits = dict(
            vocab_size=MAX_VOCAB, block_size=MAX_CONTEXT, n_layer=MAX_LAYERS,
            n_head=MAX_DIM, n_embd=MAX_DIM,
        )
        for name, limit in limits.items():
            _check_int(name, getattr(self, name), limit)
        if self.arch not in FAMILIES:
            raise unknown("Model config arch", self.arch)
        arch = family(self.arch)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise GptkitError(
                    f"Model config n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "each attention head needs an equal share of the width."
                )
            self.head_dim = self.n_embd // self.n_head
        _check_int("head_dim", self.head_dim, MAX_DIM)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_int("n_kv_head", self.n_kv_head, MAX_DIM)
        if self.n_head % self.n_kv_head:
            raise GptkitError(
                f"Model config n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; "
                "each key/value head serves an equal group of query heads."
            )
        if arch.rope and self.head_dim % 2:
            raise GptkitError(
                f"Model config head size {self.head_dim} is odd; rotary positions (arch "
                f"'{self.arch}') rotate pairs of dimensions, so the head size must be even."
            )
        defaults = dict(norm=arch.norms[0], mlp=arch.mlps[0], qk_norm=arch.qk_norm,
                        bias=arch.biases[0], tie_word_embeddings=arch.tied[0],
                        logit_softcap=arch.logit_softcap, layer_norm_epsilon=arch.eps,
                        rope_theta=arch.rope_theta if arch.rope else None,
                        layer_types=arch.layer_types(self.n_layer),
                        sliding_window=arch.sliding_window, rope_local_theta=arch.rope_local_theta)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if arch.qkv_biases and self.qkv_bias is None:
            self.qkv_bias = arch.qkv_biases[0]
        elif not arch.qkv_biases and self.qkv_bias == self.bias:
            self.qkv_bias = None  # as `bias`, which the family's class ties it to
        if self.intermediate_size is None:
            self.intermediate_size = _default_intermediate(self.n_embd, self.mlp)
        _check_int("intermediate_size", self.intermediate_size, 1 << 20)
        # what the family's transformers class can express, and nothing else
        allowed: dict[str, tuple[Any, ...]] = dict(
            norm=arch.norms, mlp=arch.mlps, qk_norm=(arch.qk_norm,), bias=arch.biases,
            tie_word_embeddings=arch.tied, qkv_bias=arch.qkv_biases or (None,),
        ) | arch.constraints(self)
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                expected = " or ".join(repr(c) for c in choices) or "n_embd divisible by n_head"
                raise GptkitError(
                    f"Model config {name}={getattr(self, name)!r} does not fit arch '{self.arch}' "
                    f"(transformers' {arch.hf_class}); expected {expected}."
                )
        if not isinstance(self.logit_softcap, (int, float)) or self.logit_softcap < 0:
            raise GptkitError(f"Model config logit_softcap is {self.logit_softcap!r}; expected a "
                              "number >= 0 (0: no soft-cap).")
        if arch.rope and (not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 1):
            raise GptkitError(f"Model config rope_theta is {self.rope_theta!r}; expected a number "
                              "above 1 (10000 is usual).")
        if self.rope_scaling is not None:
            self.rope_scaling = rope.check_scaling(self.rope_scaling)
        self._check_attention_layers()
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not 0 < self.layer_norm_epsilon < 1:
            raise GptkitError(f"Model config layer_norm_epsilon is {self.layer_norm_epsilon!r}; "
                              "expected a small positive number.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise GptkitError(f"Model config dropout is {self.dropout!r}; expected a number in [0, 1).")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise GptkitError(
                    f"Model config {name} is {value!r}; expected an id below vocab_size={self.vocab_size}."
                )

    @property
    def family(self) -> Family:
        """The architecture family (`gptkit.families`): the network's flags, its files."""
        return family(self.arch)

    @property
    def has_qkv_bias(self) -> bool:
        """The query/key/value projection has a bias (`qkv_bias`, or else `bias`)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def rope(self) -> bool:
        """Rotary positions (Llama and later) rather than learned ones (GPT-2)."""
        return self.family.rope

    @property
    def embed_norm(self) -> bool:
        """A norm right after the token embedding (nanochat)."""
        return self.family.embed_norm

    @property
    def embed_scale(self) -> bool:
        """Token embeddings multiplied by sqrt(n_embd) (Gemma)."""
        return self.family.embed_scale

    @property
    def sandwich_norm(self) -> bool:
        """A norm of each sublayer's output before the residual add (Gemma)."""
        return self.family.sandwich_norm

    @property
    def attn_scale(self) -> float | None:
        """The factor of the attention scores q.k, 1 / sqrt(query_pre_attn_scalar); None:
        the usual 1 / sqrt(head_dim)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

    def window(self, layer: int) -> int | None:
        """How many cache slots a query of layer `layer` sees, its own included (None: all
        before it)."""
        if self.layer_types is None or self.layer_types[layer] == "full_attention":
            return None
        return self.sliding_window

    def _check_attention_layers(self) -> None:
        """Refuse sliding-window settings the network cannot build (one sentence each)."""
        if self.layer_types is not None and (
                not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layer
                or any(kind not in LAYER_TYPES for kind in self.layer_types)):
            raise GptkitError(f"Model config layer_types is {self.layer_types!r}; expected a list "
                              f"of {self.n_layer} entries (one per layer), each "
                              f"{' or '.join(map(repr, LAYER_TYPES))}.")
        if "sliding_attention" in (self.layer_types or []):
            _check_int("sliding_window", self.sliding_window, MAX_CONTEXT)
        if self.rope_local_theta is not None and (
                not isinstance(self.rope_local_theta, (int, float)) or self.rope_local_theta <= 1):
            raise GptkitError(f"Model config rope_local_theta is {self.rope_local_theta!r}; "
                              "expected a number above 1 (10000 is usual).")
        if self.query_pre_attn_scalar is not None:
            _check_int("query_pre_attn_scalar", self.query_pre_attn_scalar, MAX_DIM)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Our state dict's tensor shapes for this config (a tied lm_head left out)."""
        C, V, hs, width = self.n_embd, self.vocab_size, self.head_dim, self.intermediate_size
        q, kv = self.n_head * hs, self.n_kv_head * hs
        shapes = {"transformer.wte.weight": (V, C)}
        if not self.rope:
            shapes["transformer.wpe.weight"] = (self.block_size, C)
        norm = {"layernorm": ("weight", "bias"), "rmsnorm": ("weight",),
                "rmsnorm_unweighted": (), "rmsnorm_unit_offset": ("weight",)}[self.norm]
        shapes.update({f"transformer.ln_f.{kind}": (C,) for kind in norm})
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        norms = ("ln_1", "ln_post_attn", "ln_2", "ln_post_mlp") if self.sandwich_norm \
            else ("ln_1", "ln_2")
        block = {f"{ln}.{kind}": (C,) for ln in norms for kind in norm}
        if self.qk_norm:
            block.update({f"attn.{qk}.{kind}": (hs,) for qk in ("q_norm", "k_norm") for kind in norm})
        fc = 2 * width if self.mlp in GATED_MLPS else width
        linears = {"attn.c_attn": (q + 2 * kv, C), "attn.c_proj": (C, q),
                   "mlp.c_fc": (fc, C), "mlp.c_proj": (C, width)}
        for name, shape in linears.items():
            block[name + ".weight"] = shape
            if self.has_qkv_bias if name == "attn.c_attn" else self.bias:
                block[name + ".bias"] = shape[:1]
        for layer in range(self.n_layer):
            shapes.update({f"transformer.h.{layer}.{name}": shape for name, shape in block.items()})
        return shapes

    def num_params(self) -> int:
        """Parameters of the network this config describes (a tied head counted once)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset's shape with any field overridden (e.g. arch, or vocab_size from the data)."""
        if name not in PRESETS:
            raise GptkitError(
                f"Unknown preset '{name}'{closest(name, tuple(PRESETS))}; "
                f"expected one of {', '.join(PRESETS)}."
            )
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> GPTConfig:
        """Build from our own field names; unknown keys are an error with a suggestion."""
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise GptkitError(
                    f"Unknown key '{key}' in {source}{closest(key, names)}; "
                    f"expected some of: {', '.join(names)}."
                )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- Hugging Face config.json -----------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that the family's transformers config class reads."""
        return self.family.config_to_hf(self)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
        """Read a `config.json` of a supported family, refusing variants gptkit does not build."""
        if not isinstance(hf, dict):
            raise GptkitError(f"{source} must hold a JSON object; got {type(hf).__name__}.")
        model_type = hf.get("model_type", "gpt2")
        arch = by_model_type(model_type)
        if arch is None:
            raise GptkitError(
                f"{source} has model_type '{model_type}', which gptkit does not build; it supports "
                f"{', '.join(sorted(f.model_type for f in FAMILIES.values()))}."
            )
        values = arch.config_from_hf(hf, source)
        vocab = values["vocab_size"]
        return cls(**values, bos_token_id=_token_id(hf.get("bos_token_id"), vocab),
                   eos_token_id=_token_id(hf.get("eos_token_id"), vocab))


def _check_int(name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise GptkitError(
            f"Model config field '{name}' is {value!r}; expected an integer from 1 to {limit}."
        )


def _default_intermediate(n_embd: int, mlp: str) -> int:
    """4 n_embd; a gated MLP (three matrices instead of two) gets 8/3 n_embd, rounded up to
    a multiple of 32, so that it has about the same parameters (Shazeer 2020)."""
    if mlp in GATED_MLPS:
        return -(-8 * n_embd // 96) * 32
    return 4 * n_embd


def _token_id(value: Any, vocab_size: Any) -> int | None:
    """A special-token id from a HF config, or None where it is absent or unusable.

    Newer configs may list several ids (we keep the first); random test models often
    carry GPT-2's 50256 with a smaller vocabulary, which transformers only warns about.
    """
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and isinstance(vocab_size, int) and 0 <= value < vocab_size:
        return value
    return None


@dataclass
class FinetuneOptions:
    """The settings of `gptkit finetune` beyond those of training; `TrainConfig.finetune`."""

    task: str = ""
    val: str | None = None  # validation JSONL, scored at each --eval-interval
    lora_rank: int | None = None  # None: train every weight
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float = 0.0
    epochs: float | None = None  # None: TrainConfig.max_steps decides
    save_adapter: bool = False  # also write the LoRA adapters in peft format
    prompt_field: str | None = None
    target_field: str | None = None
    # several short examples per row, each attending only to itself; None: for chat data
    # when its conversations average under half the context
    pack: bool | None = None

    def __post_init__(self) -> None:
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or self.lora_rank < 1):
            raise GptkitError(f"--lora-rank is {self.lora_rank}; expected an integer of at least 1.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise GptkitError(f"--lora-dropout is {self.lora_dropout}; expected a number in [0, 1).")
        if self.lora_rank is None and (self.save_adapter or self.lora_alpha is not None):
            raise GptkitError("--save-adapter and --lora-alpha need LoRA; pass --lora-rank too.")
        if self.epochs is not None and self.epochs <= 0:
            raise GptkitError(f"--epochs is {self.epochs}; expected a positive number.")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> FinetuneOptions:
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise GptkitError(f"Unknown fine-tuning setting '{key}' in {source}"
                                  f"{closest(key, names)}; expected some of: {', '.join(names)}.")
        return cls(**values)


# The one-line help of each `TrainConfig` field, shown by `gptkit train --help` (a test
# checks that every field has one).
TRAIN_HELP = {
    "data": "prepared data directory (train.bin, val.bin, meta.json, or shards; see gptkit "
            "prepare); repeat as NAME=DIR:WEIGHT for a mixture of several",
    "out": "run directory: checkpoints, metrics.jsonl, loss.png",
    "preset": "model size: tiny, small, gpt2, gpt2-medium, gpt2-large or gpt2-xl",
    "arch": "architecture family: gpt2, llama, qwen2, qwen3, gemma3 or nanochat (docs/architectures.md; "
            "default: gpt2, or the --init-from model's own)",
    "n_kv_head": "key/value heads, for grouped-query attention (default: as many as --n-head)",
    "tie_word_embeddings": "the LM head reuses the token embedding matrix, or with --no-... has "
                           "its own (default: the architecture's: tied for gpt2, untied otherwise)",
    "n_layer": "Transformer blocks (overrides the preset)",
    "n_head": "attention heads per block (overrides the preset)",
    "n_embd": "width of the residual stream (overrides the preset)",
    "block_size": "context length in tokens (overrides the preset)",
    "dropout": "dropout probability in training (overrides the preset)",
    "batch_size": "sequences per micro-batch (per process under torchrun)",
    "grad_accum": "micro-batches whose gradients add up to one optimizer step",
    "max_steps": "optimizer steps to train for",
    "lr": "peak learning rate, reached after the warm-up",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warm-up from 0 to --lr",
    "weight_decay": "AdamW weight decay of the 2-D weights (norms and biases get none)",
    "beta1": "AdamW's first-moment decay",
    "beta2": "AdamW's second-moment decay",
    "optimizer": "adamw, or muon: Muon on the blocks' 2-D weights and AdamW (at --lr) on the rest",
    "muon_lr": "Muon's peak learning rate (same warm-up and cosine shape as --lr)",
    "muon_momentum": "Muon's momentum",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "eval_interval": "steps between validation evaluations (0: only at the end)",
    "eval_steps": "validation batches per evaluation",
    "eval_benchmark": "also score these benchmark sets (comma-separated, e.g. hellaswag) at each "
                      "evaluation",
    "eval_benchmark_limit": "items of each --eval-benchmark set scored per evaluation",
    "save_interval": "steps between checkpoints (0: only at the end)",
    "log_interval": "steps between progress lines and metrics records",
    "seed": "random seed of weights, data order and dropout",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "dtype": "auto, float32, bfloat16 or float16 (mixed precision on accelerators)",
    "compile": "compile the training step with torch.compile",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "fsdp": "shard parameters, gradients and optimizer state (under torchrun)",
    "max_bad_steps": "consecutive NaN/inf steps (each skipped) before training stops",
    "tensorboard": "also log to TensorBoard (the tensorboard extra)",
    "wandb": "also log to Weights & Biases (the wandb extra)",
    "wandb_project": "the W&B project to log into",
    "resume": "continue the run in --out from its last checkpoint",
    "init_from": "start from this model directory (or hub name) instead of random weights",
    "max_time": "seconds of training after which the run saves and stops (default: no limit)",
    "finetune": "fine-tuning options (set by gptkit finetune; a [finetune] table in TOML)",
}


@dataclass
class TrainConfig:
    """Every setting of a run; each field is also a `gptkit train` flag and a TOML key."""

    data: str = ""
    out: str = "runs/gpt"
    preset: str = "small"
    arch: str | None = None  # None: gpt2 for a new model, the model's own with --init-from
    n_kv_head: int | None = None
    tie_word_embeddings: bool | None = None  # None: the architecture's default
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"  # or "muon": Muon on the blocks' matrices, AdamW on the rest
    muon_lr: float = 0.01  # tuned on the shakespeare_char reference run (docs/architectures.md)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_steps: int = 20
    eval_benchmark: str | None = None
    eval_benchmark_limit: int = 500
    save_interval: int = 500
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state (under torchrun)
    max_bad_steps: int = 5  # consecutive NaN/inf steps (each skipped) before training stops
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "gptkit"
    resume: bool = False
    init_from: str | None = None
    max_time: float | None = None  # seconds; stop (and save) when exceeded
    finetune: FinetuneOptions | None = None  # set by `gptkit finetune`

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):  # from a TOML table or a saved train_config.json
            self.finetune = FinetuneOptions.from_dict(self.finetune, "finetune")
        positive = ("batch_size", "grad_accum", "max_steps", "eval_steps", "log_interval",
                    "max_bad_steps", "eval_benchmark_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected at least 1.")
        if self.eval_benchmark and self.fsdp:
            raise GptkitError("--eval-benchmark does not work with --fsdp (it scores the whole "
                              "model on one process); drop one of them.")
        for name in ("eval_interval", "save_interval", "warmup_steps"):
            if getattr(self, name) < 0:
                raise GptkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected 0 or more.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GptkitError(f"--lr {self.lr} and --min-lr {self.min_lr} must satisfy 0 <= min-lr <= lr, lr > 0.")
        if self.preset not in PRESETS:
            raise GptkitError(f"--preset '{self.preset}' is unknown{closest(self.preset, tuple(PRESETS))}; "
                              f"expected one of {', '.join(PRESETS)}.")
        if self.arch is not None and self.arch not in FAMILIES:
            raise unknown("--arch", self.arch)
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise GptkitError(f"--optimizer '{self.optimizer}' is unknown{closest(self.optimizer, OPTIMIZERS)}; "
                              f"expected one of {', '.join(OPTIMIZERS)}.")
        if not self.muon_lr > 0:
            raise GptkitError(f"--muon-lr is {self.muon_lr}; expected a positive number.")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise GptkitError(f"--muon-momentum is {self.muon_momentum}; expected a number in [0, 1).")
        if self.optimizer == "muon" and self.fsdp:
            raise GptkitError("--optimizer muon does not work with --fsdp (Muon orthogonalises whole "
                              "matrices, which FSDP shards across processes); drop --fsdp to train "
                              "with DDP, or use --optimizer adamw.")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Settings from a TOML file, then `overrides` (the flags a user gave) on top."""
        import tomllib

        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GptkitError(f"Config file {path} does not exist.") from None
        except tomllib.TOMLDecodeError as exc:
            raise GptkitError(f"Config file {path} is not valid TOML ({exc}).") from None
        names = [f.name for f in fields(cls)]
        for key in values:
            if key.replace("-", "_") not in names:
                raise GptkitError(f"Unknown key '{key}' in {path}{closest(key.replace('-', '_'), names)}.")
        merged = {key.replace("-", "_"): value for key, value in values.items()}
        merged.update(overrides)
        return cls(**merged)
