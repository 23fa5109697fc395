"""Model configuration: one dataclass, the architecture families, named presets, HF JSON in and out.

`GPTConfig` is saved as the Hugging Face `config.json` of its family (GPT-2, Llama, Qwen3
or nanochat) next to every model, so `transformers` opens our directories and we open
theirs. This module must stay
light (no torch) so that `gptkit --help` is fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

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

# `TrainConfig.optimizer` values (see gptkit.optim).
OPTIMIZERS = ("adamw", "muon")

# Sizes beyond these are certainly a corrupted or hostile config.json; refusing them
# early avoids a giant allocation.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 20


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass(frozen=True)
class Arch:
    """One architecture family: what its blocks are, and which of its settings the
    family's `transformers` class lets a checkpoint vary (the first value is the default)."""

    model_type: str  # config.json's model_type
    hf_class: str  # the transformers class that opens the directory
    rope: bool  # rotary positions (else learned position embeddings)
    norm: str  # "layernorm", "rmsnorm" (with a gain) or "rmsnorm_unweighted"
    mlp: tuple[str, ...]  # "gelu", "swiglu", "relu2"
    qk_norm: bool  # RMSNorm of each head's queries and keys
    bias: tuple[bool, ...]  # biases of the blocks' linear layers
    tie_word_embeddings: tuple[bool, ...]
    logit_softcap: float  # default cap of the logits; 0 = none (and not available)
    eps: float  # default epsilon of every norm
    embed_norm: bool  # a norm right after the token embedding


# The families gptkit builds, each saved as the Hugging Face directory of its own class.
ARCHS: dict[str, Arch] = {
    # GPT-2 (2019): learned positions, LayerNorm, GELU MLP, biases, tied head
    "gpt2": Arch("gpt2", "GPT2LMHeadModel", rope=False, norm="layernorm", mlp=("gelu",),
                 qk_norm=False, bias=(True,), tie_word_embeddings=(True,), logit_softcap=0.0,
                 eps=1e-5, embed_norm=False),
    # Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases
    "llama": Arch("llama", "LlamaForCausalLM", rope=True, norm="rmsnorm", mlp=("swiglu",),
                  qk_norm=False, bias=(False, True), tie_word_embeddings=(False, True),
                  logit_softcap=0.0, eps=1e-6, embed_norm=False),
    # Qwen3: Llama plus RMSNorm of each head's queries and keys
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM", rope=True, norm="rmsnorm", mlp=("swiglu",),
                  qk_norm=True, bias=(False,), tie_word_embeddings=(False, True),
                  logit_softcap=0.0, eps=1e-6, embed_norm=False),
    # nanochat (Karpathy 2025): RoPE, parameter-free RMSNorm (also after the embedding),
    # QK-norm, ReLU^2 MLP, untied head, logits soft-capped at 15
    "nanochat": Arch("nanochat", "NanoChatForCausalLM", rope=True, norm="rmsnorm_unweighted",
                     mlp=("relu2", "gelu"), qk_norm=True, bias=(False,),
                     tie_word_embeddings=(False, True), logit_softcap=15.0, eps=1e-6,
                     embed_norm=True),
}
ROPE_TYPES = ("default", "linear", "llama3")  # rope_scaling kinds gptkit computes
_ROPE_SCALING_KEYS = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}


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
    arch: str = "gpt2"  # one of ARCHS
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); n_head
    head_dim: int | None = None  # width of one head; n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; 4 n_embd (SwiGLU: ~8/3 n_embd)
    norm: str | None = None  # "layernorm", "rmsnorm" or "rmsnorm_unweighted"
    mlp: str | None = None  # "gelu", "swiglu" or "relu2"
    qk_norm: bool | None = None
    bias: bool | None = None  # biases in the blocks' linear layers
    tie_word_embeddings: bool | None = None  # the LM head reuses the token embedding
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); 0 = none
    rope_theta: float | None = None  # base wavelength of rotary positions; 10000
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}

    def __post_init__(self) -> None:
        limits = dict(
            vocab_size=MAX_VOCAB, block_size=MAX_CONTEXT, n_layer=MAX_LAYERS,
            n_head=MAX_DIM, n_embd=MAX_DIM,
        )
        for name, limit in limits.items():
            _check_int(name, getattr(self, name), limit)
        if self.arch not in ARCHS:
            raise GptkitError(f"Model config arch '{self.arch}' is unknown"
                              f"{closest(str(self.arch), tuple(ARCHS))}; expected one of "
                              f"{', '.join(ARCHS)}.")
        arch = ARCHS[self.arch]
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
        defaults = dict(norm=arch.norm, mlp=arch.mlp[0], qk_norm=arch.qk_norm, bias=arch.bias[0],
                        tie_word_embeddings=arch.tie_word_embeddings[0],
                        logit_softcap=arch.logit_softcap, layer_norm_epsilon=arch.eps,
                        rope_theta=10000.0 if arch.rope else None)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.intermediate_size is None:
            self.intermediate_size = _default_intermediate(self.n_embd, self.mlp)
        _check_int("intermediate_size", self.intermediate_size, 1 << 20)
        # what the family's transformers class can express, and nothing else
        allowed: dict[str, tuple[Any, ...]] = dict(
            norm=(arch.norm,), mlp=arch.mlp, qk_norm=(arch.qk_norm,), bias=arch.bias,
            tie_word_embeddings=arch.tie_word_embeddings)
        if self.arch in ("gpt2", "nanochat"):  # their configs have no head_dim / kv heads of their own
            allowed["head_dim"] = (self.n_embd // self.n_head,) if self.n_embd % self.n_head == 0 else ()
        if self.arch == "gpt2":
            allowed.update(n_kv_head=(self.n_head,), intermediate_size=(4 * self.n_embd,),
                           rope_theta=(None,), rope_scaling=(None,))
        if not arch.logit_softcap:
            allowed["logit_softcap"] = (0.0,)
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
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)
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
    def rope(self) -> bool:
        """Rotary positions (Llama, Qwen3, nanochat) rather than learned ones (GPT-2)."""
        return ARCHS[self.arch].rope

    @property
    def embed_norm(self) -> bool:
        """A norm right after the token embedding (nanochat)."""
        return ARCHS[self.arch].embed_norm

    def num_params(self) -> int:
        """Parameters of the network this config describes (a tied head counted once)."""
        C, hs, width = self.n_embd, self.head_dim, self.intermediate_size
        q, kv = self.n_head * hs, self.n_kv_head * hs
        norm = {"layernorm": 2 * C, "rmsnorm": C, "rmsnorm_unweighted": 0}[self.norm]
        attn = C * (q + 2 * kv) + q * C + (q + 2 * kv + C) * self.bias + 2 * hs * (
            self.qk_norm and self.norm == "rmsnorm")
        mlp_in = 2 * width if self.mlp == "swiglu" else width
        mlp = C * mlp_in + width * C + (mlp_in + C) * self.bias
        embeddings = self.vocab_size * C * (1 if self.tie_word_embeddings else 2)
        positions = 0 if self.rope else self.block_size * C
        return embeddings + positions + self.n_layer * (2 * norm + attn + mlp) + norm

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
        if self.arch == "gpt2":
            return self._gpt2_hf_dict()
        hf: dict[str, Any] = {
            "architectures": [ARCHS[self.arch].hf_class],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "max_position_embeddings": self.block_size,
            "hidden_act": {"swiglu": "silu", "relu2": "relu2", "gelu": "gelu_pytorch_tanh"}[self.mlp],
            "rms_norm_eps": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "attention_bias": self.bias,
            "attention_dropout": self.dropout,
            "tie_word_embeddings": self.tie_word_embeddings,
            # transformers 5 reads rope_parameters; rope_theta (and rope_scaling) are the
            # keys older readers and converters such as llama.cpp's look for
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                **(self.rope_scaling or {})},
            "rope_theta": self.rope_theta,
            "use_cache": True,
            "bos_token_id": self.bos_token_id if self.bos_token_id is not None else self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": None,
            "dtype": "float32",
        }
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.arch in ("llama", "qwen3"):
            hf["head_dim"] = self.head_dim
        if self.arch == "llama":
            hf.update(mlp_bias=self.bias, pretraining_tp=1)
        if self.arch == "qwen3":
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layer,
                      layer_types=["full_attention"] * self.n_layer)
        if self.arch == "nanochat":
            hf["final_logit_softcapping"] = self.logit_softcap or None
        return hf

    def _gpt2_hf_dict(self) -> dict[str, Any]:
        eos = self.eos_token_id
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id if self.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
        """Read a `config.json` of a supported family, refusing variants gptkit does not build."""
        if not isinstance(hf, dict):
            raise GptkitError(f"{source} must hold a JSON object; got {type(hf).__name__}.")
        model_type = hf.get("model_type", "gpt2")
        if model_type not in ARCHS:
            raise GptkitError(
                f"{source} has model_type '{model_type}', which gptkit does not build; it supports "
                f"{', '.join(ARCHS)}."
            )
        if model_type == "gpt2":
            return cls._from_gpt2_hf_dict(hf, source)
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings")
        missing = [key for key in required if key not in hf]
        if missing:
            raise GptkitError(f"{source} lacks the {model_type} field(s) {', '.join(missing)}.")
        activations = {"llama": {"silu": "swiglu"}, "qwen3": {"silu": "swiglu"},
                       "nanochat": {"relu2": "relu2", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}}
        act = hf.get("hidden_act", "relu2" if model_type == "nanochat" else "silu")
        if act not in activations[model_type]:
            raise GptkitError(f"{source} sets hidden_act={act!r}, which gptkit's {model_type} does "
                              f"not support; expected {' or '.join(map(repr, activations[model_type]))}.")
        bias = hf.get("attention_bias", False)
        if model_type == "llama" and hf.get("mlp_bias", False) != bias:
            raise GptkitError(f"{source} sets attention_bias={bias!r} but mlp_bias="
                              f"{hf.get('mlp_bias')!r}; gptkit's llama has biases in both or neither.")
        if model_type == "qwen3" and (hf.get("use_sliding_window") or any(
                kind != "full_attention" for kind in hf.get("layer_types") or [])):
            raise GptkitError(f"{source} uses sliding-window attention, which gptkit's qwen3 does "
                              "not implement; expected use_sliding_window false.")
        theta, scaling = _rope_from_hf(hf, source)
        dropout = hf.get("attention_dropout", 0.0)
        softcap = hf.get("final_logit_softcapping") if model_type == "nanochat" else None
        return cls(
            arch=model_type,
            vocab_size=hf["vocab_size"],
            block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") if model_type != "nanochat" else None,
            intermediate_size=hf.get("intermediate_size"),
            mlp=activations[model_type][act],
            bias=bias,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            logit_softcap=float(softcap or 0.0),
            rope_theta=theta,
            rope_scaling=scaling,
            dropout=dropout if isinstance(dropout, (int, float)) else -1,
            layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            bos_token_id=_token_id(hf.get("bos_token_id"), hf["vocab_size"]),
            eos_token_id=_token_id(hf.get("eos_token_id"), hf["vocab_size"]),
        )

    @classmethod
    def _from_gpt2_hf_dict(cls, hf: dict[str, Any], source: str) -> GPTConfig:
        unsupported = {
            "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
            "n_inner": (None,),
            "scale_attn_by_inverse_layer_idx": (False,),
            "reorder_and_upcast_attn": (False,),
            "tie_word_embeddings": (True,),
            "scale_attn_weights": (True,),
        }
        for key, allowed in unsupported.items():
            if key in hf and hf[key] not in allowed and not (key == "n_inner" and hf[key] == 4 * hf.get("n_embd", 0)):
                raise GptkitError(
                    f"{source} sets {key}={hf[key]!r}, which gptkit's GPT-2 does not support; "
                    f"expected {allowed[0]!r}."
                )
        required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        missing = [key for key in required if key not in hf]
        if missing:
            raise GptkitError(f"{source} lacks the GPT-2 field(s) {', '.join(missing)}.")
        dropout = hf.get("resid_pdrop", 0.0)
        return cls(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=dropout if isinstance(dropout, (int, float)) else -1,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            bos_token_id=_token_id(hf.get("bos_token_id"), hf["vocab_size"]),
            eos_token_id=_token_id(hf.get("eos_token_id"), hf["vocab_size"]),
        )


def _check_int(name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise GptkitError(
            f"Model config field '{name}' is {value!r}; expected an integer from 1 to {limit}."
        )


def _default_intermediate(n_embd: int, mlp: str) -> int:
    """4 n_embd; a gated MLP (three matrices instead of two) gets 8/3 n_embd, rounded up to
    a multiple of 32, so that it has about the same parameters (Shazeer 2020)."""
    if mlp == "swiglu":
        return -(-8 * n_embd // 96) * 32
    return 4 * n_embd


def _check_rope_scaling(scaling: Any) -> dict[str, Any]:
    """A copy of a valid `rope_scaling` dict (transformers' rope_parameters without theta)."""
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in _ROPE_SCALING_KEYS:
        raise GptkitError(f"Model config rope_scaling {scaling!r} is not supported; expected None "
                          f"or a dict with rope_type {' or '.join(map(repr, _ROPE_SCALING_KEYS))}.")
    keys = _ROPE_SCALING_KEYS[kind]
    values = {key: scaling.get(key) for key in keys}
    bad = [key for key, value in values.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0]
    if bad:
        raise GptkitError(f"Model config rope_scaling of type '{kind}' needs positive numbers "
                          f"for {', '.join(keys)}; got {scaling!r}.")
    return {"rope_type": kind, **values}


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or the older
    rope_theta + rope_scaling keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
        params = params["full_attention"] or {}  # parameters per layer type
    if not isinstance(params, dict):
        raise GptkitError(f"{source} has rope_parameters {params!r}; expected an object.")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if kind not in ROPE_TYPES or factor not in (1, 1.0, None):
        what = f"rope_type '{kind}'" if kind not in ROPE_TYPES else f"partial_rotary_factor {factor}"
        raise GptkitError(f"{source} uses {what}, which gptkit does not compute; it supports "
                          f"rope_type {', '.join(ROPE_TYPES)} over whole heads.")
    if kind == "default":
        return theta, None
    scaling = {key: params.get(key) for key in _ROPE_SCALING_KEYS[kind]}
    if kind == "llama3" and scaling["original_max_position_embeddings"] is None:
        scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    return theta, {"rope_type": kind, **scaling}


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
    "data": "prepared data directory (train.bin, val.bin, meta.json; see gptkit prepare)",
    "out": "run directory: checkpoints, metrics.jsonl, loss.png",
    "preset": "model size: tiny, small, gpt2, gpt2-medium, gpt2-large or gpt2-xl",
    "arch": "architecture family: gpt2, llama, qwen3 or nanochat (docs/architectures.md; "
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
                    "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected at least 1.")
        for name in ("eval_interval", "save_interval", "warmup_steps"):
            if getattr(self, name) < 0:
                raise GptkitError(f"--{name.replace('_', '-')} is {getattr(self, name)}; expected 0 or more.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GptkitError(f"--lr {self.lr} and --min-lr {self.min_lr} must satisfy 0 <= min-lr <= lr, lr > 0.")
        if self.preset not in PRESETS:
            raise GptkitError(f"--preset '{self.preset}' is unknown{closest(self.preset, tuple(PRESETS))}; "
                              f"expected one of {', '.join(PRESETS)}.")
        if self.arch is not None and self.arch not in ARCHS:
            raise GptkitError(f"--arch '{self.arch}' is unknown{closest(str(self.arch), tuple(ARCHS))}; "
                              f"expected one of {', '.join(ARCHS)}.")
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
