"""The GGUF side of a family: which llama.cpp graph runs it, its tensors under llama.cpp's
names (with the layout changes between the two), and which config.json fields become which
GGUF keys. `gptkit.export.gguf` reads these tables forwards, `gguf_import` backwards.

Tables are declarative and light (numpy and torch load only inside the transforms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptkit.families import rope

if TYPE_CHECKING:
    import numpy as np
    import torch

# llama.cpp's name for the token embedding, in every architecture: its rows are the vocabulary.
TOKEN_EMBD = "token_embd.weight"
# llama.cpp's name of the tensor of llama3 rope factors (one per frequency, f32)
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Transform:
    """A change of layout between the Hugging Face tensor and the GGUF one, and back. Each
    function also gets the config.json, for layouts that depend on the shape (heads)."""

    name: str
    to_gguf: Callable[[np.ndarray, dict[str, Any]], np.ndarray]
    from_gguf: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    # the GGUF shape of a HF shape; None where the HF shape cannot take this layout
    shape: Callable[[tuple[int, ...], dict[str, Any]], tuple[int, ...] | None]


# GPT-2's Conv1D stores weights as (in, out); llama.cpp, like nn.Linear, as (out, in).
TRANSPOSE = Transform("transpose", lambda a, c: a.T, lambda t, c: t.t(), lambda s, c: s[::-1])


def rope_pairs(heads_field: str) -> Transform:
    """llama.cpp's `llama` graph rotates adjacent pairs (x[2i], x[2i+1]) of each head (its
    "normal" rope), Hugging Face's Llama the halves (x[i], x[i + hs/2]); so the rows of
    q_proj and k_proj (weights and biases) are reordered per head, as llama.cpp's own
    convert_hf_to_gguf.py does: (heads, 2, hs/2, ...) -> (heads, hs/2, 2, ...)."""

    def heads(config: dict[str, Any]) -> int:
        return int(config.get(heads_field) or config["num_attention_heads"])

    def to_gguf(a: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        n = heads(config)
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    def from_gguf(t: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        n = heads(config)
        return t.reshape(n, t.shape[0] // n // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    def shape(s: tuple[int, ...], config: dict[str, Any]) -> tuple[int, ...] | None:
        return s if s[0] % (2 * heads(config)) == 0 else None

    return Transform(f"rope pair order ({heads_field})", to_gguf, from_gguf, shape)


@dataclass(frozen=True)
class Flag:
    """A config.json switch that decides whether a tensor exists: it does when
    config[field] (default `default`) equals `present_if`."""

    field: str
    present_if: Any
    default: Any

    def present(self, config: dict[str, Any]) -> bool:
        return config.get(self.field, self.default) == self.present_if


@dataclass(frozen=True)
class TensorRule:
    """One Hugging Face tensor name (`{bid}` = layer index) and its GGUF name."""

    hf: str
    gguf: str
    transform: Transform | None = None
    # f32 whatever the file type, as llama.cpp's own converter writes position embeddings
    keep_f32: bool = False
    # only with this config.json switch (biases, an untied head); else the tensor must be
    # absent, or is skipped if `skip_otherwise` (a tied head's copy of the embedding)
    when: Flag | None = None
    skip_otherwise: bool = False


@dataclass(frozen=True)
class Meta:
    """A GGUF key (`{arch}` = the architecture) read from a config.json field."""

    key: str
    field: str
    kind: str  # "u32" or "f32"
    default: Callable[[dict[str, Any]], Any] | None = None  # when config.json lacks `field`
    # llama.cpp reads the key when a file has it and takes `default` otherwise, so files
    # written by its converter may leave it out
    optional: bool = False


@dataclass(frozen=True)
class GGUFLayout:
    """Everything the exporter and importer know about one family's GGUF files."""

    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's general.architecture
    tensors: tuple[TensorRule, ...]
    metadata: tuple[Meta, ...]
    layers_field: str  # config.json field with the number of blocks
    # config.json values llama.cpp's graph for this architecture hard-codes
    requires: dict[str, tuple[Any, ...]]
    # Hugging Face tensors that hold no weights (masks) or repeat another (tied heads)
    ignored: tuple[str, ...] = ()
    # config.json fields `gguf_import` writes as they are (the rest come from `metadata`)
    hf_config: dict[str, Any] | None = None
    hf_prefix: str = ""  # a prefix some writers put before every tensor name
    # rotary positions: rope_theta / rope_scaling become GGUF keys
    rope: bool = False
    # llama.cpp's graph multiplies rope frequencies by a rope_freqs tensor (llama3 scaling)
    rope_factors: bool = False
    # layers may attend within a sliding window (config.json's layer_types)
    sliding_window: bool = False
    # where llama.cpp hard-codes more than `requires` can say (a layer pattern, a second
    # rope base): the rest of a sentence after the config.json path saying what it cannot
    # run, or None where it runs the config
    refusal: Callable[[dict[str, Any]], str | None] | None = None
    # config.json once `gguf_import` has read `metadata`, completed with the GGUF fields
    # (all of them, by key) where llama.cpp's defaults are not the transformers class's
    finish_import: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None


def head_dim(config: dict[str, Any]) -> int:
    """config.json's head width where it states none: the width over the heads."""
    return config["hidden_size"] // config["num_attention_heads"]


def rope_theta(config: dict[str, Any]) -> float:
    return rope.parameters(config).get("rope_theta", config.get("rope_theta", 10000.0))
