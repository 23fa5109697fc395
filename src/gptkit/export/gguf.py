"""GGUF export: a gptkit model directory -> one `.gguf` file for llama.cpp and the tools on it.

    gptkit export --model runs/mine --format gguf --out mine.gguf --dtype f16

    from gptkit.export.gguf import export_gguf
    export_gguf("runs/mine", "mine.gguf", dtype="q8_0")

The file is written with `gguf`, llama.cpp's own Python writer, and carries everything a
runtime needs: the weights under llama.cpp's tensor names; the tokenizer (byte-level BPE
tokens, merges, the name of the pre-tokenizer that splits text exactly as gptkit does,
special tokens typed as control tokens, bos/eos/end-of-turn ids, the chat template when
the model has one); and metadata (name, context length, `gptkit.version` and
`gptkit.source_sha256`, see `source_hash`).

It reads the Hugging Face files of the directory (config.json, model.safetensors,
tokenizer.json) directly, so an architecture is one `Architecture` entry below: how its
tensor names map to llama.cpp's (and which need a transpose), and which config.json
fields become which GGUF keys. `gguf_import` reads the same table backwards. The entries:
GPT-2, Llama and Qwen3. Llama's q_proj/k_proj rows are reordered for llama.cpp's `llama`
graph, which rotates adjacent pairs where Hugging Face rotates halves (as llama.cpp's
convert_hf_to_gguf.py does); its `qwen3` graph rotates halves and takes the rows as they
are. Rope scaling: linear becomes llama.cpp's rope.scaling keys, llama3 its rope_freqs
tensor (llama only: the qwen3 graph reads no such tensor, so it is refused there).

What llama.cpp cannot express exactly is refused with one sentence, never exported
wrongly: a character-level tokenizer, a pre-tokenizer or normalizer llama.cpp does not
know, an architecture without an entry, a rope scaling llama.cpp's graph cannot apply. The file is written under a temporary name and
renamed when complete, so a failure (a full disk, Ctrl-C) never leaves a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError

if TYPE_CHECKING:
    import numpy as np
    import torch

DTYPES = ("f32", "f16", "bf16", "q8_0")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
# Files that define a model's behaviour; `source_hash` covers those present.
SOURCE_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME,
                "generation_config.json", CHAT_TEMPLATE_NAME)
# GPT-2's split pattern: what a Hugging Face ByteLevel pre-tokenizer with use_regex applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp's name for the token embedding, in every architecture: its rows are the vocabulary.
TOKEN_EMBD = "token_embd.weight"
# Special tokens that end a chat turn, as llama.cpp itself recognises them by name.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|assistant_end|>")


# A short write with less than this left on the disk is taken for a full disk.
FULL_DISK_BYTES = 1 << 20


# -- the architecture table -------------------------------------------------------------

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


def _rope_pairs(heads_field: str) -> Transform:
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


@dataclass(frozen=True)
class Architecture:
    """Everything the exporter knows about one `model_type`."""

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
    # rotary positions: rope_theta / rope_scaling become GGUF keys (see `rope_hparams`)
    rope: bool = False
    # llama.cpp's graph multiplies rope frequencies by a rope_freqs tensor (llama3 scaling)
    rope_factors: bool = False


GPT2 = Architecture(
    model_type="gpt2",
    gguf_arch="gpt2",
    hf_prefix="transformer.",
    tensors=(
        TensorRule("wte.weight", TOKEN_EMBD),
        TensorRule("wpe.weight", "position_embd.weight", keep_f32=True),
        TensorRule("ln_f.weight", "output_norm.weight"),
        TensorRule("ln_f.bias", "output_norm.bias"),
        TensorRule("h.{bid}.ln_1.weight", "blk.{bid}.attn_norm.weight"),
        TensorRule("h.{bid}.ln_1.bias", "blk.{bid}.attn_norm.bias"),
        TensorRule("h.{bid}.attn.c_attn.weight", "blk.{bid}.attn_qkv.weight", TRANSPOSE),
        TensorRule("h.{bid}.attn.c_attn.bias", "blk.{bid}.attn_qkv.bias"),
        TensorRule("h.{bid}.attn.c_proj.weight", "blk.{bid}.attn_output.weight", TRANSPOSE),
        TensorRule("h.{bid}.attn.c_proj.bias", "blk.{bid}.attn_output.bias"),
        TensorRule("h.{bid}.ln_2.weight", "blk.{bid}.ffn_norm.weight"),
        TensorRule("h.{bid}.ln_2.bias", "blk.{bid}.ffn_norm.bias"),
        TensorRule("h.{bid}.mlp.c_fc.weight", "blk.{bid}.ffn_up.weight", TRANSPOSE),
        TensorRule("h.{bid}.mlp.c_fc.bias", "blk.{bid}.ffn_up.bias"),
        TensorRule("h.{bid}.mlp.c_proj.weight", "blk.{bid}.ffn_down.weight", TRANSPOSE),
        TensorRule("h.{bid}.mlp.c_proj.bias", "blk.{bid}.ffn_down.bias"),
    ),
    # llama.cpp ties the output head to token_embd when the file has no output.weight
    ignored=("h.{bid}.attn.bias", "h.{bid}.attn.masked_bias", "lm_head.weight"),
    metadata=(
        Meta("{arch}.context_length", "n_positions", "u32"),
        Meta("{arch}.embedding_length", "n_embd", "u32"),
        Meta("{arch}.block_count", "n_layer", "u32"),
        Meta("{arch}.feed_forward_length", "n_inner", "u32", lambda c: 4 * c["n_embd"]),
        Meta("{arch}.attention.head_count", "n_head", "u32"),
        Meta("{arch}.attention.layer_norm_epsilon", "layer_norm_epsilon", "f32",
             lambda c: 1e-5),
    ),
    layers_field="n_layer",
    requires={
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "tie_word_embeddings": (True,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
    },
    hf_config={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
               "activation_function": "gelu_new", "tie_word_embeddings": True},
)


def _head_dim(config: dict[str, Any]) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


def _rope_theta(config: dict[str, Any]) -> float:
    return _rope_parameters(config).get("rope_theta", config.get("rope_theta", 10000.0))


# What Llama and Qwen3 share: llama.cpp's names, and the keys of their config.json.
ATTENTION_BIAS = Flag("attention_bias", True, False)
UNTIED_HEAD = Flag("tie_word_embeddings", False, False)  # both HF classes default to untied
LLAMA_LIKE_META = (
    Meta("{arch}.context_length", "max_position_embeddings", "u32"),
    Meta("{arch}.embedding_length", "hidden_size", "u32"),
    Meta("{arch}.block_count", "num_hidden_layers", "u32"),
    Meta("{arch}.feed_forward_length", "intermediate_size", "u32"),
    Meta("{arch}.attention.head_count", "num_attention_heads", "u32"),
    Meta("{arch}.attention.head_count_kv", "num_key_value_heads", "u32",
         lambda c: c["num_attention_heads"]),
    Meta("{arch}.attention.key_length", "head_dim", "u32", _head_dim),
    Meta("{arch}.attention.value_length", "head_dim", "u32", _head_dim),
    Meta("{arch}.rope.dimension_count", "head_dim", "u32", _head_dim),
    Meta("{arch}.rope.freq_base", "rope_theta", "f32", _rope_theta),
    Meta("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32", lambda c: 1e-6),
)


def _llama_like_tensors(q_k: Transform | None, mlp_bias: Flag | None,
                        qk_norm: bool) -> tuple[TensorRule, ...]:
    layer, block = "model.layers.{bid}.", "blk.{bid}."
    rules = [
        TensorRule("model.embed_tokens.weight", TOKEN_EMBD),
        TensorRule("model.norm.weight", "output_norm.weight"),
        TensorRule("lm_head.weight", "output.weight", when=UNTIED_HEAD, skip_otherwise=True),
        TensorRule(layer + "input_layernorm.weight", block + "attn_norm.weight"),
        TensorRule(layer + "post_attention_layernorm.weight", block + "ffn_norm.weight"),
    ]
    heads = {"q": "num_attention_heads", "k": "num_key_value_heads"}
    for kind in ("weight", "bias"):
        flag = ATTENTION_BIAS if kind == "bias" else None
        for hf, gguf_name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                              ("o", "attn_output")):
            transform = _rope_pairs(heads[hf]) if q_k is not None and hf in heads else None
            rules.append(TensorRule(f"{layer}self_attn.{hf}_proj.{kind}",
                                    f"{block}{gguf_name}.{kind}", transform, when=flag))
        if kind == "bias" and mlp_bias is None:
            continue
        for proj in ("gate", "up", "down"):
            rules.append(TensorRule(f"{layer}mlp.{proj}_proj.{kind}", f"{block}ffn_{proj}.{kind}",
                                    when=mlp_bias if kind == "bias" else None))
    if qk_norm:
        rules += [TensorRule(layer + "self_attn.q_norm.weight", block + "attn_q_norm.weight"),
                  TensorRule(layer + "self_attn.k_norm.weight", block + "attn_k_norm.weight")]
    return tuple(rules)


LLAMA = Architecture(
    model_type="llama",
    gguf_arch="llama",
    # llama.cpp's llama graph rotates adjacent pairs: q and k rows reordered
    tensors=_llama_like_tensors(_rope_pairs("num_attention_heads"),
                                Flag("mlp_bias", True, False), qk_norm=False),
    ignored=("model.layers.{bid}.self_attn.rotary_emb.inv_freq",),
    metadata=LLAMA_LIKE_META,
    layers_field="num_hidden_layers",
    requires={"hidden_act": ("silu",)},
    hf_config={"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "hidden_act": "silu", "pretraining_tp": 1},
    rope=True,
    rope_factors=True,
)

QWEN3 = Architecture(
    model_type="qwen3",
    gguf_arch="qwen3",
    # llama.cpp's qwen3 graph rotates halves (NEOX rope), as Hugging Face does: no reordering
    tensors=_llama_like_tensors(None, None, qk_norm=True),
    ignored=("model.layers.{bid}.self_attn.rotary_emb.inv_freq",),
    metadata=LLAMA_LIKE_META,
    layers_field="num_hidden_layers",
    # llama.cpp's qwen3 graph has no o_proj bias and no sliding window
    requires={"hidden_act": ("silu",), "attention_bias": (False,),
              "use_sliding_window": (False,)},
    hf_config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
               "hidden_act": "silu", "use_sliding_window": False},
    rope=True,
)

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch
                                          for arch in (GPT2, LLAMA, QWEN3)}
# Families llama.cpp has no graph for, with the reason the refusal gives.
NOT_IN_LLAMACPP = {
    "nanochat": "llama.cpp has no architecture with nanochat's ReLU² MLP, parameter-free "
                "RMSNorm and logit soft-capping",
}
# llama.cpp's name of the tensor of llama3 rope factors (one per frequency, f32)
ROPE_FREQS = "rope_freqs.weight"


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's rope_parameters, or the older rope_scaling (theta beside it)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(params, dict) and "full_attention" in params and "rope_type" not in params:
        params = params["full_attention"] or {}  # parameters per layer type
    return params if isinstance(params, dict) else {}


def rope_scaling(arch: Architecture, config: dict[str, Any], source: Path
                 ) -> dict[str, Any] | None:
    """The model's rope scaling ({"rope_type": "linear" | "llama3", ...}) or None, or one
    sentence why llama.cpp's `arch` cannot apply it."""
    raw = config.get("rope_parameters") or config.get("rope_scaling")
    if raw is not None and not isinstance(raw, dict):
        raise GptkitError(f"{source} has rope_parameters {raw!r}; expected an object.")
    params = _rope_parameters(config)
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise GptkitError(f"{source} rotates only part of each head (partial_rotary_factor="
                          f"{partial}), which llama.cpp's {arch.gguf_arch} does not do; the "
                          "model is not exported.")
    if kind == "default":
        return None
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}
    if kind not in needed:
        raise GptkitError(f"{source} uses rope_type {kind!r}, which gptkit does not export to "
                          "GGUF (it writes default, linear and llama3 rope scaling).")
    if kind == "llama3" and not arch.rope_factors:
        raise GptkitError(f"{source} uses llama3 rope scaling, which llama.cpp's "
                          f"{arch.gguf_arch} graph cannot apply (it takes no per-frequency "
                          "rope factors); the model is not exported.")
    scaling = {"rope_type": kind}
    for key in needed[kind]:
        value = params.get(key)
        if key == "original_max_position_embeddings" and value is None:
            value = config.get("max_position_embeddings")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GptkitError(f"{source} has {kind} rope scaling with {key}={value!r}; "
                              "expected a positive number.")
        scaling[key] = value
    return scaling


def rope_factors(config: dict[str, Any], scaling: dict[str, Any]) -> np.ndarray:
    """llama3 rope scaling as llama.cpp applies it: a divisor of each of the head's
    hs/2 frequencies (1 for the fast ones, `factor` for the slow ones, blended between),
    computed as transformers and llama.cpp's converter compute the scaled frequencies."""
    import math

    import numpy as np

    dim = config.get("head_dim") or _head_dim(config)
    inv_freq = 1.0 / (float(_rope_theta(config)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    divisors = []
    for freq in inv_freq:
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            divisors.append(1.0)
        elif wavelength > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def rule_pattern(template: str) -> re.Pattern[str]:
    """A tensor name template ('h.{bid}.ln_1.weight') as a regex with a `bid` group."""
    return re.compile(re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + "$")


@dataclass(frozen=True)
class PreTokenizer:
    """A text-splitting pattern and the `tokenizer.ggml.pre` name llama.cpp splits it by."""

    name: str
    pattern: str


# llama.cpp implements each name's split natively; a pattern missing here has no name
# that splits identically, and is refused. ("gpt-2" is the name every llama.cpp build
# since 2024 knows; see docs/export.md for its one detokenization difference.)
PRE_TOKENIZERS = (PreTokenizer("gpt-2", GPT2_PATTERN),)


# -- the tokenizer ----------------------------------------------------------------------

@dataclass
class GGUFTokenizer:
    """What llama.cpp's `gpt2` (byte-level BPE) tokenizer reads from a GGUF file."""

    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType per id
    merges: list[str]  # "a b", in rank order
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    chat_template: str | list[dict[str, str]] | None


def read_tokenizer(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> GGUFTokenizer:
    """The directory's tokenizer as llama.cpp will hold it, or one sentence why it can't be."""
    from gguf import TokenType

    path = model_dir / TOKENIZER_NAME
    if not path.is_file():
        raise GptkitError(f"{model_dir} has no {TOKENIZER_NAME}; the GGUF file must carry the "
                          "tokenizer, so export needs the tokenizer.json that gptkit and "
                          "transformers save with a model.")
    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GptkitError(f"{path} holds a {model.get('type')} tokenizer, which gptkit cannot "
                          "export to GGUF; expected byte-level BPE.")
    if not model.get("merges") and (spec.get("decoder") or {}).get("type") == "Fuse":
        raise GptkitError(
            f"{path} is a character-level tokenizer, which llama.cpp cannot express exactly "
            "(its tokenizers work on bytes or SentencePiece pieces and would map unknown "
            "characters differently); train a byte-level BPE tokenizer (gptkit tokenizer "
            "train --kind bpe) to export a model to GGUF.")
    problem = _bpe_problem(spec)
    if problem:
        raise GptkitError(f"{path} {problem}, which llama.cpp's BPE tokenizer cannot express "
                          "exactly, so the model is not exported.")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    pre = next((p.name for p in PRE_TOKENIZERS if p.pattern == pattern), None)
    if pre is None:
        raise GptkitError(
            f"{path} splits text with a pre-tokenizer llama.cpp has no name for "
            f"({_describe(spec.get('pre_tokenizer'))}), so llama.cpp would tokenize "
            "differently; the model is not exported.")

    by_id: dict[int, tuple[str, int]] = {}
    for token, index in model["vocab"].items():
        by_id[index] = (token, TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n_tokens = max(by_id) + 1 if by_id else 0
    if n_tokens > n_vocab:
        raise GptkitError(f"{path} has {n_tokens} tokens but the model's embedding has only "
                          f"{n_vocab} rows; expected a tokenizer that fits the model.")
    # Rows the tokenizer never produces (a vocabulary padded for speed) become unused tokens,
    # as llama.cpp needs one token per embedding row.
    tokens = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n_vocab)]
    if len({t for t, _ in tokens}) != n_vocab:
        raise GptkitError(f"{path} gives one token text to two ids; expected distinct tokens.")

    merges = []
    for merge in model.get("merges") or []:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in a or " " in b:  # llama.cpp splits each merge at its first space
            raise GptkitError(f"{path} has a merge of tokens that contain spaces ({a!r} + "
                              f"{b!r}), which a GGUF merge list cannot hold.")
        merges.append(f"{a} {b}")

    ids = {text: i for i, (text, _) in enumerate(tokens)}
    tok_config = _read_json(model_dir / TOKENIZER_CONFIG_NAME) \
        if (model_dir / TOKENIZER_CONFIG_NAME).is_file() else {}

    def token_id(name: str, config_field: str) -> int | None:
        value = tok_config.get(name)
        if isinstance(value, dict):  # older transformers save AddedToken dicts
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        value = config.get(config_field)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and 0 <= value < n_vocab else None

    eos = token_id("eos_token", "eos_token_id")
    if eos is None and "<|endoftext|>" in ids:
        eos = ids["<|endoftext|>"]
    bos = token_id("bos_token", "bos_token_id")
    pad = token_id("pad_token", "pad_token_id")
    template: Any = tok_config.get("chat_template")
    if (model_dir / CHAT_TEMPLATE_NAME).is_file():
        template = (model_dir / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    eot = next((ids[t] for t in END_OF_TURN_TOKENS
                if t in ids and tokens[ids[t]][1] == TokenType.CONTROL), None)
    return GGUFTokenizer(
        pre=pre, tokens=[t for t, _ in tokens], types=[int(k) for _, k in tokens],
        merges=merges, bos_id=bos if bos is not None else eos, eos_id=eos, eot_id=eot,
        pad_id=pad if pad is not None else eos, chat_template=template or None)


def _bpe_problem(spec: dict[str, Any]) -> str | None:
    """Why a BPE tokenizer.json differs from what llama.cpp's byte-level BPE does, or None."""
    model = spec["model"]
    if spec.get("normalizer"):
        return f"normalizes text first ({_describe(spec['normalizer'])})"
    for key in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix",
                "ignore_merges"):
        if model.get(key):
            return f"sets the BPE option {key}={model[key]!r}"
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return f"decodes with {_describe(decoder) or 'no decoder'} instead of ByteLevel"
    for added in spec.get("added_tokens") or []:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if added.get(f)]
        if flags:
            return f"has the added token {added['content']!r} with {', '.join(flags)}"
    return None


def _split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The regex a Hugging Face byte-level pre-tokenizer splits with, or None if it is not
    one regex split followed by the byte mapping."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return (steps[0].get("pattern") or {}).get("Regex")
    return None


def _describe(part: Any) -> str:
    if not isinstance(part, dict):
        return ""
    if part.get("type") == "Sequence":
        inner = part.get("pretokenizers") or part.get("normalizers") or []
        return "Sequence of " + ", ".join(_describe(p) for p in inner)
    return str(part.get("type"))


# -- reading the model directory --------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptkitError(f"{path} is not valid JSON ({exc}).") from None


def read_config(model_dir: Path) -> tuple[dict[str, Any], Architecture]:
    """config.json and the table entry of its model_type, or one sentence why not."""
    if not model_dir.is_dir():
        what = "a file" if model_dir.exists() else "not found"
        raise GptkitError(f"'{model_dir}' is {what}; expected a model directory with "
                          f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not (model_dir / CONFIG_NAME).is_file():
        raise GptkitError(f"'{model_dir}' is not a model directory: it has no {CONFIG_NAME} "
                          f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as gptkit or "
                          "transformers write them).")
    config = _read_json(model_dir / CONFIG_NAME)
    if not isinstance(config, dict):
        raise GptkitError(f"{model_dir / CONFIG_NAME} must hold a JSON object.")
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if arch is None and model_type in NOT_IN_LLAMACPP:
        raise GptkitError(f"{model_dir / CONFIG_NAME} has model_type {model_type!r}, which "
                          f"cannot be exported to GGUF: {NOT_IN_LLAMACPP[model_type]}.")
    if arch is None:
        raise GptkitError(f"{model_dir / CONFIG_NAME} has model_type {model_type!r}, which "
                          "gptkit cannot export to GGUF yet; supported: "
                          f"{', '.join(ARCHITECTURES)}.")
    for key, allowed in arch.requires.items():
        if key in config and config[key] not in allowed:
            raise GptkitError(f"{model_dir / CONFIG_NAME} sets {key}={config[key]!r}, which "
                              f"llama.cpp's {arch.gguf_arch} does not support; expected "
                              f"{allowed[0]!r}.")
    layer_types = config.get("layer_types") or []
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise GptkitError(f"{model_dir / CONFIG_NAME} has layer_types {layer_types!r}; gptkit "
                          "exports models whose every layer has full attention, not sliding "
                          "windows.")
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise GptkitError(f"'{model_dir}' has no {WEIGHTS_NAME}; gptkit exports weights "
                          "from safetensors only.")
    return config, arch


def hparams(arch: Architecture, config: dict[str, Any], source: Path
            ) -> dict[str, tuple[str, Any]]:
    """The architecture's GGUF keys and their (kind, value) from config.json: kind "u32",
    "f32" or "str"."""
    values: dict[str, tuple[str, Any]] = {}
    for meta in arch.metadata:
        value = config.get(meta.field)
        if value is None and meta.default is not None:
            value = meta.default(config)
        ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0
              if meta.kind == "u32" else isinstance(value, (int, float)) and value > 0)
        if not ok:
            raise GptkitError(f"{source} has {meta.field}={value!r}; expected a positive "
                              f"{'integer' if meta.kind == 'u32' else 'number'}.")
        values[meta.key.format(arch=arch.gguf_arch)] = (meta.kind, value)
    scaling = rope_scaling(arch, config, source) if arch.rope else None
    if scaling is not None and scaling["rope_type"] == "linear":
        # llama.cpp divides every position by the factor, as transformers' linear type does
        values[f"{arch.gguf_arch}.rope.scaling.type"] = ("str", "linear")
        values[f"{arch.gguf_arch}.rope.scaling.factor"] = ("f32", scaling["factor"])
    if scaling is not None:
        # llama3 goes in as a rope_freqs tensor; the parameters themselves for gguf_import
        values["gptkit.rope_scaling"] = ("str", json.dumps(scaling))
    return values


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None: made by the exporter (`data`)
    gguf_name: str
    transform: Transform | None
    keep_f32: bool
    shape: tuple[int, ...]  # GGUF (numpy) order, after the transform
    data: np.ndarray | None = None


def plan_tensors(arch: Architecture, names_shapes: dict[str, tuple[int, ...]],
                 config: dict[str, Any], source: Path) -> list[PlannedTensor]:
    """Each Hugging Face tensor's GGUF name, in the table's order (then the tensors the
    exporter makes, such as llama3's rope factors); one sentence for an unknown, missing
    or non-matrix tensor."""
    n_layer = config[arch.layers_field]
    rules = [(rule, rule_pattern(rule.hf)) for rule in arch.tensors]
    ignored = [rule_pattern(name) for name in arch.ignored]
    found: dict[str, PlannedTensor] = {}
    for name, shape in names_shapes.items():
        short = name[len(arch.hf_prefix):] if arch.hf_prefix and name.startswith(
            arch.hf_prefix) else name
        if any(p.match(short) for p in ignored):
            continue
        for rule, pattern in rules:
            match = pattern.match(short)
            if not match:
                continue
            if rule.when is not None and not rule.when.present(config):
                if rule.skip_otherwise:
                    break
                raise GptkitError(
                    f"{source} holds the tensor '{name}', which a {arch.model_type} model with "
                    f"{rule.when.field}={config.get(rule.when.field, rule.when.default)!r} "
                    "does not have; expected the weights config.json describes.")
            bid = match.groupdict().get("bid")
            gguf_name = rule.gguf.format(bid=bid)
            if bid is not None and int(bid) >= n_layer:
                raise GptkitError(f"{source} holds '{name}' but config.json has only "
                                  f"{n_layer} layers.")
            if len(shape) not in (1, 2):
                raise GptkitError(f"{source}: tensor '{name}' has {len(shape)} dimensions; "
                                  "expected a vector or a matrix.")
            if rule.transform is not None:
                new_shape = rule.transform.shape(shape, config)
                if new_shape is None:
                    raise GptkitError(f"{source}: tensor '{name}' has shape {list(shape)}, "
                                      f"which does not fit the {rule.transform.name} of "
                                      "config.json; expected the shapes config.json describes.")
                shape = new_shape
            found[gguf_name] = PlannedTensor(name, gguf_name, rule.transform,
                                             rule.keep_f32, tuple(shape))
            break
        else:
            raise GptkitError(f"{source} holds the tensor '{name}', which a {arch.model_type} "
                              "model does not have; expected only the architecture's weights.")
    order = []
    for rule, _ in rules:
        if rule.when is not None and not rule.when.present(config):
            continue
        bids = range(n_layer) if "{bid}" in rule.gguf else [None]
        for bid in bids:
            gguf_name = rule.gguf.format(bid=bid)
            if gguf_name not in found:
                raise GptkitError(f"{source} lacks the tensor '{arch.hf_prefix}"
                                  f"{rule.hf.format(bid=bid)}' that its config needs.")
            order.append(found[gguf_name])
    scaling = rope_scaling(arch, config, source) if arch.rope else None
    if scaling is not None and scaling["rope_type"] == "llama3":
        factors = rope_factors(config, scaling)
        order.append(PlannedTensor(None, ROPE_FREQS, None, True, factors.shape, factors))
    return order


def source_hash(model_dir: str | Path, progress: Callable[[int], Any] | None = None) -> str:
    """sha256 over the model's defining files (SOURCE_FILES present, by name): for each,
    its name, a NUL, its size in decimal, a NUL, then its bytes. `progress` is called with
    the number of bytes of each chunk read."""
    digest = hashlib.sha256()
    for path in _source_files(Path(model_dir)):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return digest.hexdigest()


def _source_files(model_dir: Path) -> list[Path]:
    return [model_dir / name for name in sorted(SOURCE_FILES) if (model_dir / name).is_file()]


def _source_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in _source_files(model_dir))


# -- writing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    path: Path
    dtype: str
    bytes: int
    tensors: int
    seconds: float


def export_gguf(model_dir: str | Path, out: str | Path, *, dtype: str = "f16",
                force: bool = False, progress: bool | None = None) -> ExportResult:
    """Write `model_dir` as one GGUF file at `out` (see the module docstring).

    `dtype` is the type of the weight matrices: f32, f16, bf16 or q8_0 (8-bit blocks of 32
    with one f16 scale; a matrix whose rows are not a multiple of 32 stays f16). Vectors
    (norms, biases) and position embeddings stay f32, as llama.cpp's own converter keeps
    them. An existing `out` is refused unless `force`; it is replaced only once the new
    file is complete. `progress`: a bar on stderr (bytes hashed, then written) when True,
    none when False, on a terminal only when None.
    """
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm

    from gptkit import __version__

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise GptkitError(f"unknown GGUF dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    model_dir, out = Path(model_dir), Path(out)
    if out.is_dir():
        raise GptkitError(f"{out} is a directory; expected the path of the .gguf file to write.")
    if out.exists() and not force:
        raise GptkitError(f"{out} already exists; pass --force to overwrite it.")
    config, arch = read_config(model_dir)
    weights = model_dir / WEIGHTS_NAME
    params = hparams(arch, config, model_dir / CONFIG_NAME)
    try:
        handle = safe_open(str(weights), framework=_framework(weights))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise GptkitError(f"{weights} is corrupted or truncated ({exc}).") from None
    with handle as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        plan = plan_tensors(arch, shapes, config, weights)
        n_vocab = next(t.shape[0] for t in plan if t.gguf_name == TOKEN_EMBD)
        tokenizer = read_tokenizer(model_dir, n_vocab, config)
        qtypes = [_tensor_qtype(t, dtype) for t in plan]
        sizes = [_nbytes(t.shape, q) for t, q in zip(plan, qtypes, strict=True)]

        # One bar from the first byte read: hashing a large source takes seconds too.
        with tqdm(total=_source_bytes(model_dir) + sum(sizes), unit="B", unit_scale=True,
                  desc=f"hashing {model_dir.resolve().name}", leave=False,
                  disable=None if progress is None else not progress) as bar:
            digest = source_hash(model_dir, bar.update)
            bar.set_description(f"writing {out.name}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            writer = gguf.GGUFWriter(None, arch.gguf_arch)
            try:
                _add_metadata(writer, arch, params, config, tokenizer, model_dir, dtype,
                              __version__, digest)
                for tensor, qtype, nbytes in zip(plan, qtypes, sizes, strict=True):
                    # the logical shape; a placeholder numpy dtype (the real one is qtype)
                    writer.add_tensor_info(tensor.gguf_name, tensor.shape, _np_float32(),
                                           nbytes, raw_dtype=qtype)
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for tensor, qtype in zip(plan, qtypes, strict=True):
                    source = tensor.data if tensor.hf_name is None else f.get_tensor(
                        tensor.hf_name)
                    data = _convert(source, tensor, qtype, config)
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
                assert writer.fout is not None
                writer.fout[0].flush()
                os.fsync(writer.fout[0].fileno())
                writer.close()
                os.replace(tmp, out)
            except OSError as exc:
                reason = _write_failure(exc, out.parent)  # while the partial file fills the disk
                _discard(writer, tmp)
                raise GptkitError(f"could not write {out}: {reason}; no partial file was "
                                  "left.") from None
            except BaseException:
                _discard(writer, tmp)
                raise
    _fsync_dir(out.parent)
    return ExportResult(out, dtype, out.stat().st_size, len(plan),
                        time.perf_counter() - start)


def _add_metadata(writer: Any, arch: Architecture, params: dict[str, tuple[str, Any]],
                  config: dict[str, Any], tok: GGUFTokenizer, model_dir: Path, dtype: str,
                  version: str, digest: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(_file_type(dtype))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (kind, value) in params.items():
        if kind == "u32":
            writer.add_uint32(key, value)
        elif kind == "str":
            writer.add_string(key, value)
        else:
            writer.add_float32(key, float(value))
    writer.add_string("gptkit.version", version)
    writer.add_string("gptkit.source_sha256", digest)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    writer.add_token_merges(tok.merges)
    for add, value in ((writer.add_bos_token_id, tok.bos_id),
                       (writer.add_eos_token_id, tok.eos_id),
                       (writer.add_eot_token_id, tok.eot_id),
                       (writer.add_pad_token_id, tok.pad_id)):
        if value is not None:
            add(value)
    # gptkit adds no bos/eos around a text; llama.cpp must not either
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _qtypes() -> dict[str, Any]:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def _file_type(dtype: str) -> int:
    """general.file_type: what most of the file's weights are."""
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0}[dtype]


def _tensor_qtype(tensor: PlannedTensor, dtype: str) -> Any:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if tensor.keep_f32 or len(tensor.shape) == 1:
        return Q.F32
    qtype = _qtypes()[dtype]
    if qtype == Q.Q8_0 and tensor.shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # as llama.cpp's converter: rows must split into blocks of 32
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for dim in shape:
        n *= dim
    return n // block * size


def _np_float32() -> np.dtype:
    import numpy as np

    return np.dtype(np.float32)


def _framework(weights: Path) -> str:
    """numpy, which reads f32/f16 files without importing torch (seconds of a short command);
    torch only for what numpy has no type for (bf16)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception:  # reported by the caller's own open
        return "numpy"
    return "numpy" if dtypes <= {"F32", "F16", "F64"} else "pt"


def _convert(tensor: Any, planned: PlannedTensor, qtype: Any,
             config: dict[str, Any]) -> np.ndarray:
    """One tensor (numpy, or torch for bf16 sources) in GGUF layout and type, as the bytes
    to write. Rounding to f16 and bf16 is to nearest even, as torch and llama.cpp do."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if not isinstance(tensor, np.ndarray):  # a torch tensor
        tensor = tensor.float().numpy()
    if planned.transform is not None:
        tensor = planned.transform.to_gguf(tensor, config)
    if qtype == Q.F16:
        return np.ascontiguousarray(tensor, dtype=np.float16)
    array = np.ascontiguousarray(tensor, dtype=np.float32)
    return array if qtype == Q.F32 else quantize(array, qtype)


def _write_failure(exc: OSError, directory: Path) -> str:
    """What stopped a write, in words. numpy's tofile reports a full disk as a short write
    ("N requested and M written") without an errno, so then the space left decides."""
    detail = exc.strerror or str(exc)
    full = exc.errno == errno.ENOSPC
    if exc.errno is None:
        try:
            full = shutil.disk_usage(directory).free < FULL_DISK_BYTES
        except OSError:
            pass
    return f"the disk is full ({detail})" if full else f"the write failed ({detail})"


def _discard(writer: Any, tmp: Path) -> None:
    try:
        writer.close()
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

