"""Qwen3 (2025): Qwen2 without the query/key/value biases and with QK-norm, an RMSNorm of
each head's queries and keys."""

from __future__ import annotations

from gptkit.families.base import register
from gptkit.families.gguf_table import GGUFLayout
from gptkit.families.llama import LAYER, LLAMA_META, llama_gguf_tensors
from gptkit.families.qwen2 import Qwen2


@register
class Qwen3(Qwen2):
    name = "qwen3"
    model_type = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    display_name = "Qwen3"
    qk_norm = True
    qkv_biases = (False,)
    gguf = GGUFLayout(
        model_type="qwen3",
        gguf_arch="qwen3",
        # llama.cpp's qwen3 graph rotates halves (NEOX rope), as Hugging Face does: no reordering
        tensors=llama_gguf_tensors(None, qk_norm=True),
        ignored=(LAYER + "self_attn.rotary_emb.inv_freq",),
        metadata=LLAMA_META,
        layers_field="num_hidden_layers",
        # llama.cpp's qwen3 graph has no o_proj bias and no sliding window
        requires={"hidden_act": ("silu",), "attention_bias": (False,),
                  "use_sliding_window": (False,)},
        hf_config={"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                   "hidden_act": "silu", "use_sliding_window": False},
        rope=True,
    )
