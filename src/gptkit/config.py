"""Model configuration: one dataclass, a table of named presets, GPT-2 JSON in and out.

`GPTConfig` is saved as a Hugging Face GPT-2 `config.json` next to every model, so
`transformers` opens our directories and we open theirs. This module must stay
light (no torch) so that `gptkit --help` is fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
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


@dataclass
class GPTConfig:
    """Shape of a GPT-2 style decoder-only Transformer."""

    vocab_size: int = GPT2_VOCAB_SIZE
    block_size: int = 1024  # context length (GPT-2's n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        limits = dict(
            vocab_size=MAX_VOCAB, block_size=MAX_CONTEXT, n_layer=MAX_LAYERS,
            n_head=MAX_DIM, n_embd=MAX_DIM,
        )
        for name, limit in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise GptkitError(
                    f"Model config field '{name}' is {value!r}; expected an integer from 1 to {limit}."
                )
        if self.n_embd % self.n_head:
            raise GptkitError(
                f"Model config n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "each attention head needs an equal share of the width."
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise GptkitError(f"Model config dropout is {self.dropout!r}; expected a number in [0, 1).")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise GptkitError(
                    f"Model config {name} is {value!r}; expected an id below vocab_size={self.vocab_size}."
                )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset's shape with any field overridden (e.g. vocab_size from the data)."""
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

    # -- Hugging Face GPT-2 config.json ---------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.GPT2Config` reads."""
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
        """Read a GPT-2 `config.json`, refusing variants our network does not implement."""
        if not isinstance(hf, dict):
            raise GptkitError(f"{source} must hold a JSON object; got {type(hf).__name__}.")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise GptkitError(
                f"{source} has model_type '{hf.get('model_type')}'; gptkit loads GPT-2 models only."
            )
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
class TrainConfig:
    """Every setting of a run; each field is also a `gptkit train` flag and a TOML key."""

    data: str = ""
    out: str = "runs/gpt"
    preset: str = "small"
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
    extra: dict[str, Any] = field(default_factory=dict)  # settings of callers (e.g. fine-tuning)

    def __post_init__(self) -> None:
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
