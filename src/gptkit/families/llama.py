"""Llama (Touvron et al. 2023): rotary positions, RMSNorm, SwiGLU MLP, grouped-query
attention, no biases. Its config.json keys and tensor names are the ones most later
families (Qwen, nanochat, Gemma) start from, so they subclass it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gptkit.errors import GptkitError
from gptkit.families import rope
from gptkit.families.base import Family, HFTensor, register
from gptkit.families.gguf_table import (
    TOKEN_EMBD,
    Flag,
    GGUFLayout,
    Meta,
    TensorRule,
    Transform,
    head_dim,
    rope_pairs,
    rope_theta,
)

if TYPE_CHECKING:
    from gptkit.config import GPTConfig

LAYER = "model.layers.{bid}."
# our modules -> the Llama-style Hugging Face ones (norms without tensors simply have none)
LLAMA_TENSORS = (
    HFTensor("transformer.wte", ("model.embed_tokens",)),
    HFTensor("transformer.ln_f", ("model.norm",)),
    HFTensor("lm_head", ("lm_head",)),
    HFTensor("transformer.h.{bid}.ln_1", (LAYER + "input_layernorm",)),
    HFTensor("transformer.h.{bid}.ln_2", (LAYER + "post_attention_layernorm",)),
    HFTensor("transformer.h.{bid}.attn.q_norm", (LAYER + "self_attn.q_norm",)),
    HFTensor("transformer.h.{bid}.attn.k_norm", (LAYER + "self_attn.k_norm",)),
    HFTensor("transformer.h.{bid}.attn.c_attn",
             tuple(LAYER + f"self_attn.{p}_proj" for p in "qkv"), rows=("q", "kv", "kv")),
    HFTensor("transformer.h.{bid}.attn.c_proj", (LAYER + "self_attn.o_proj",)),
    HFTensor("transformer.h.{bid}.mlp.c_fc", (LAYER + "mlp.gate_proj", LAYER + "mlp.up_proj"),
             rows=("mlp", "mlp")),
    HFTensor("transformer.h.{bid}.mlp.c_proj", (LAYER + "mlp.down_proj",)),
)

# -- the GGUF side, shared by the families llama.cpp runs with Llama's tensor names --
ATTENTION_BIAS = Flag("attention_bias", True, False)
UNTIED_HEAD = Flag("tie_word_embeddings", False, False)  # the HF classes default to untied
LLAMA_META = (
    Meta("{arch}.context_length", "max_position_embeddings", "u32"),
    Meta("{arch}.embedding_length", "hidden_size", "u32"),
    Meta("{arch}.block_count", "num_hidden_layers", "u32"),
    Meta("{arch}.feed_forward_length", "intermediate_size", "u32"),
    Meta("{arch}.attention.head_count", "num_attention_heads", "u32"),
    Meta("{arch}.attention.head_count_kv", "num_key_value_heads", "u32",
         lambda c: c["num_attention_heads"], optional=True),
    Meta("{arch}.attention.key_length", "head_dim", "u32", head_dim, optional=True),
    Meta("{arch}.attention.value_length", "head_dim", "u32", head_dim, optional=True),
    Meta("{arch}.rope.dimension_count", "head_dim", "u32", head_dim, optional=True),
    Meta("{arch}.rope.freq_base", "rope_theta", "f32", rope_theta, optional=True),
    Meta("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32", lambda c: 1e-6),
)


def llama_gguf_tensors(q_k: Transform | None, qk_norm: bool, qkv_bias: Flag | bool = ATTENTION_BIAS,
                       o_bias: Flag | bool = ATTENTION_BIAS, mlp_bias: Flag | bool = False
                       ) -> tuple[TensorRule, ...]:
    """Llama's tensors under llama.cpp's names; `q_k` reorders q and k rows for graphs that
    rotate adjacent pairs; each bias is always there (True), never (False), or as a
    config.json switch says (a Flag)."""
    layer, block = LAYER, "blk.{bid}."
    rules = [
        TensorRule("model.embed_tokens.weight", TOKEN_EMBD),
        TensorRule("model.norm.weight", "output_norm.weight"),
        TensorRule("lm_head.weight", "output.weight", when=UNTIED_HEAD, skip_otherwise=True),
        TensorRule(layer + "input_layernorm.weight", block + "attn_norm.weight"),
        TensorRule(layer + "post_attention_layernorm.weight", block + "ffn_norm.weight"),
    ]
    heads = {"q": "num_attention_heads", "k": "num_key_value_heads"}
    biases = {"q": qkv_bias, "k": qkv_bias, "v": qkv_bias, "o": o_bias, "gate": mlp_bias,
              "up": mlp_bias, "down": mlp_bias}
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
             "up": "ffn_up", "down": "ffn_down"}
    for kind in ("weight", "bias"):
        for hf, gguf_name in names.items():
            flag = None if kind == "weight" else biases[hf]
            if flag is False:
                continue
            transform = rope_pairs(heads[hf]) if q_k is not None and hf in heads else None
            module = "mlp" if hf in ("gate", "up", "down") else "self_attn"
            rules.append(TensorRule(f"{layer}{module}.{hf}_proj.{kind}", f"{block}{gguf_name}.{kind}",
                                    transform, when=None if flag is True else flag))
    if qk_norm:
        rules += [TensorRule(layer + "self_attn.q_norm.weight", block + "attn_q_norm.weight"),
                  TensorRule(layer + "self_attn.k_norm.weight", block + "attn_k_norm.weight")]
    return tuple(rules)


@register
class Llama(Family):
    name = "llama"
    model_type = "llama"
    hf_class = "LlamaForCausalLM"
    display_name = "Llama"
    biases = (False, True)
    hf_tensors = LLAMA_TENSORS
    # config.json's hidden_act -> our MLP
    activations: ClassVar[dict[str, str]] = {"silu": "swiglu"}
    gguf = GGUFLayout(
        model_type="llama",
        gguf_arch="llama",
        # llama.cpp's llama graph rotates adjacent pairs: q and k rows reordered
        tensors=llama_gguf_tensors(rope_pairs("num_attention_heads"), qk_norm=False,
                                   mlp_bias=Flag("mlp_bias", True, False)),
        ignored=(LAYER + "self_attn.rotary_emb.inv_freq",),
        metadata=LLAMA_META,
        layers_field="num_hidden_layers",
        requires={"hidden_act": ("silu",)},
        hf_config={"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_act": "silu", "pretraining_tp": 1},
        rope=True,
        rope_factors=True,
    )

    def check_hf(self, hf: dict[str, Any], source: str) -> None:
        """Refuse config.json settings the family's class has but gptkit does not build."""
        if hf.get("mlp_bias", False) != hf.get("attention_bias", False):
            raise GptkitError(f"{source} sets attention_bias={hf.get('attention_bias')!r} but "
                              f"mlp_bias={hf.get('mlp_bias')!r}; gptkit's llama has biases in "
                              "both or neither.")

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings")
        missing = [key for key in required if key not in hf]
        if missing:
            raise GptkitError(f"{source} lacks the {self.name} field(s) {', '.join(missing)}.")
        act = hf.get("hidden_act", next(iter(self.activations)))
        if act not in self.activations:
            raise GptkitError(f"{source} sets hidden_act={act!r}, which gptkit's {self.name} "
                              f"does not support; expected "
                              f"{' or '.join(map(repr, self.activations))}.")
        self.check_hf(hf, source)
        theta, scaling = rope.from_hf(hf, source)
        dropout = hf.get("attention_dropout", 0.0)
        return dict(
            arch=self.name,
            vocab_size=hf["vocab_size"],
            block_size=hf["max_position_embeddings"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") if self.own_head_dim else None,
            intermediate_size=hf.get("intermediate_size"),
            mlp=self.activations[act],
            bias=hf.get("attention_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=theta,
            rope_scaling=scaling,
            dropout=dropout if isinstance(dropout, (int, float)) else -1,
            layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        )

    def common_hf(self, config: GPTConfig) -> dict[str, Any]:
        """The config.json keys Llama's config class and its descendants' share."""
        return {
            "architectures": [self.hf_class],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head,
            "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.layer_norm_epsilon,
            "initializer_range": 0.02,
            "attention_dropout": config.dropout,
            "tie_word_embeddings": config.tie_word_embeddings,
            "use_cache": True,
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None
            else config.eos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": None,
            "dtype": "float32",
        }

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        hidden_act = next(act for act, mlp in self.activations.items() if mlp == config.mlp)
        hf = self.common_hf(config) | {
            "hidden_act": hidden_act,
            "attention_bias": config.bias,
            # transformers 5 reads rope_parameters; rope_theta (and rope_scaling) are the
            # keys older readers and converters such as llama.cpp's look for
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                                **(config.rope_scaling or {})},
            "rope_theta": config.rope_theta,
        }
        if config.rope_scaling:
            hf["rope_scaling"] = dict(config.rope_scaling)
        if self.own_head_dim:
            hf["head_dim"] = config.head_dim
        return hf | self.hf_extras(config)

    def hf_extras(self, config: GPTConfig) -> dict[str, Any]:
        """The family's own config.json keys beyond Llama's."""
        return {"mlp_bias": config.bias, "pretraining_tp": 1}
