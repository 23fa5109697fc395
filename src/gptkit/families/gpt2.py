"""GPT-2 (Radford et al. 2019): learned position embeddings, LayerNorm, a GELU MLP, biases
everywhere and a tied head. Hugging Face stores its projections as Conv1D weights (in, out),
transposed from our nn.Linear (out, in)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.families.base import Family, HFTensor, register
from gptkit.families.gguf_table import TOKEN_EMBD, TRANSPOSE, GGUFLayout, Meta, TensorRule

if TYPE_CHECKING:
    from gptkit.config import GPTConfig

BLOCK = "transformer.h.{bid}."
# config.json settings of GPT2Config that gptkit's GPT-2 does not build (the allowed values)
UNSUPPORTED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "n_inner": (None,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "tie_word_embeddings": (True,),
    "scale_attn_weights": (True,),
}


@register
class GPT2(Family):
    name = "gpt2"
    model_type = "gpt2"
    hf_class = "GPT2LMHeadModel"
    display_name = "GPT-2"
    rope = False
    norms = ("layernorm",)
    mlps = ("gelu",)
    biases = (True,)
    tied = (True,)
    eps = 1e-5
    own_head_dim = False
    hf_prefix = "transformer."
    # the causal masks old checkpoints carry as buffers
    hf_ignored = (BLOCK + "attn.bias", BLOCK + "attn.masked_bias")
    hf_tensors = tuple(HFTensor(name, (name,)) for name in (
        "transformer.wte", "transformer.wpe", "transformer.ln_f", BLOCK + "ln_1",
        BLOCK + "ln_2")) + tuple(HFTensor(name, (name,), transpose=True) for name in (
            BLOCK + "attn.c_attn", BLOCK + "attn.c_proj", BLOCK + "mlp.c_fc",
            BLOCK + "mlp.c_proj"))
    gguf = GGUFLayout(
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


    def constraints(self, config: GPTConfig) -> dict[str, tuple[Any, ...]]:
        return super().constraints(config) | dict(
            n_kv_head=(config.n_head,), intermediate_size=(4 * config.n_embd,),
            rope_theta=(None,), rope_scaling=(None,))

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        for key, allowed in UNSUPPORTED.items():
            if key in hf and hf[key] not in allowed and not (
                    key == "n_inner" and hf[key] == 4 * hf.get("n_embd", 0)):
                raise GptkitError(f"{source} sets {key}={hf[key]!r}, which gptkit's GPT-2 does "
                                  f"not support; expected {allowed[0]!r}.")
        required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        missing = [key for key in required if key not in hf]
        if missing:
            raise GptkitError(f"{source} lacks the GPT-2 field(s) {', '.join(missing)}.")
        dropout = hf.get("resid_pdrop", 0.0)
        return dict(
            arch=self.name,
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=dropout if isinstance(dropout, (int, float)) else -1,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        eos = config.eos_token_id
        return {
            "architectures": [self.hf_class],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "dtype": "float32",
        }
