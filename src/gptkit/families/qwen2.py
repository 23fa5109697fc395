"""Qwen2 and Qwen2.5 (2024): Llama's blocks with biases on the query, key and value
projections only. Its config.json may describe sliding-window attention, which gptkit
does not build (no released Qwen2 model turns it on)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.families.base import register
from gptkit.families.gguf_table import GGUFLayout
from gptkit.families.llama import LAYER, LLAMA_META, Llama, llama_gguf_tensors

if TYPE_CHECKING:
    from gptkit.config import GPTConfig


@register
class Qwen2(Llama):
    name = "qwen2"
    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    display_name = "Qwen2"
    biases = (False,)
    qkv_biases = (True,)
    gguf = GGUFLayout(
        model_type="qwen2",
        gguf_arch="qwen2",
        # llama.cpp's qwen2 graph rotates halves (NEOX rope), as Hugging Face does: no reordering
        tensors=llama_gguf_tensors(None, qk_norm=False, qkv_bias=True, o_bias=False),
        ignored=(LAYER + "self_attn.rotary_emb.inv_freq",),
        metadata=LLAMA_META,
        layers_field="num_hidden_layers",
        requires={"hidden_act": ("silu",), "use_sliding_window": (False,)},
        hf_config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "hidden_act": "silu", "use_sliding_window": False},
        rope=True,
    )

    def check_hf(self, hf: dict[str, Any], source: str) -> None:
        if hf.get("use_sliding_window") or any(
                kind != "full_attention" for kind in hf.get("layer_types") or []):
            raise GptkitError(f"{source} uses sliding-window attention, which gptkit's "
                              f"{self.name} does not implement; expected use_sliding_window "
                              "false.")

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return super().config_from_hf(hf, source) | dict(qkv_bias=self.qkv_biases[0])

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        hf = super().config_to_hf(config)
        if self.qkv_biases != (False,):
            del hf["attention_bias"]  # Qwen2's projections have their fixed biases
        return hf

    def hf_extras(self, config: GPTConfig) -> dict[str, Any]:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer,
                    layer_types=["full_attention"] * config.n_layer)
