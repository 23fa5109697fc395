"""Gemma 3 (Google 2025) text models, e.g. google/gemma-3-270m: Llama's attention and
tensor names with QK-norm, sliding-window layers (five in six by default) whose rotary
positions have their own base, a GeGLU MLP (GELU's tanh form as the gate), four norms per
block (sandwich norms around both sublayers), RMSNorm gains of 1 + weight, embeddings
scaled by sqrt(n_embd), a tied head and an attention scale of its own
(query_pre_attn_scalar). Saved as transformers' Gemma3ForCausalLM (`gemma3_text`).

llama.cpp's gemma3 graph hard-codes the layer pattern (every sixth layer global), the
sliding layers' rope base (10000) and the attention scale (1 / sqrt(head_dim), or
1 / sqrt(n_embd / n_head) for the 62-layer 27B), and applies no logit soft-cap; other
settings are refused for export in one sentence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gptkit.errors import GptkitError
from gptkit.families import rope
from gptkit.families.base import HFTensor, register
from gptkit.families.gguf_table import (
    TOKEN_EMBD,
    Flag,
    GGUFLayout,
    Meta,
    TensorRule,
    Transform,
)
from gptkit.families.llama import LAYER, LLAMA_META, LLAMA_TENSORS, Llama, llama_gguf_tensors

if TYPE_CHECKING:
    from gptkit.config import GPTConfig

# Gemma3TextConfig's defaults, for config.json files that leave keys out
HF_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "intermediate_size": 9216, "attention_bias": False,
}
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' (and llama.cpp's local) bases
LLAMACPP_THETA = 10_000.0  # llama.cpp's rope base where a file states none
PATTERN = 6  # every sixth layer attends globally, the others within the window
LLAMACPP_27B_LAYERS = 62  # llama.cpp scales the 27B's attention by n_embd / n_head instead

# our modules -> Gemma 3's: Llama's, with the norms of a sandwich block under Gemma's names
NORMS = {"ln_1": "input_layernorm", "ln_post_attn": "post_attention_layernorm",
         "ln_2": "pre_feedforward_layernorm", "ln_post_mlp": "post_feedforward_layernorm"}
GEMMA3_TENSORS = (
    *(rule for rule in LLAMA_TENSORS if not rule.ours.endswith(("ln_1", "ln_2"))),
    *(HFTensor(f"transformer.h.{{bid}}.{ours}", (LAYER + theirs,))
      for ours, theirs in NORMS.items()),
)


def layer_pattern(n_layer: int, every: int = PATTERN) -> list[str]:
    """Gemma 3's interleaving: layer i is global where (i + 1) is a multiple of `every`."""
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]


def hf_layer_types(hf: dict[str, Any]) -> Any:
    """config.json's layer_types, or the pattern transformers derives where it has none."""
    every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", PATTERN))
    return hf.get("layer_types") or layer_pattern(hf["num_hidden_layers"], every)


def rope_by_layer(hf: dict[str, Any]) -> tuple[Any, Any]:
    """(global, sliding) rope parameters: transformers 5's per-layer-type rope_parameters,
    or transformers 4's rope_theta, rope_scaling (global layers only) and
    rope_local_base_freq."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & params.keys():
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full, local = params or hf.get("rope_scaling") or {}, {}
    if not isinstance(full, dict) or not isinstance(local, dict):
        return full, local  # rope.from_hf says why not
    return ({"rope_theta": hf.get("rope_theta", GLOBAL_THETA), **full},
            {"rope_theta": hf.get("rope_local_base_freq", LOCAL_THETA), **local})


def global_theta(config: dict[str, Any]) -> float:
    """The global layers' rope base (GGUF's rope.freq_base)."""
    return rope_by_layer({**HF_DEFAULTS, **config})[0].get("rope_theta", GLOBAL_THETA)


def llamacpp_scalar(config: dict[str, Any]) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 graph computes from the shape."""
    if config["num_hidden_layers"] == LLAMACPP_27B_LAYERS:
        return config["hidden_size"] // config["num_attention_heads"]
    return config.get("head_dim", HF_DEFAULTS["head_dim"])


def gguf_refusal(config: dict[str, Any]) -> str | None:
    """What llama.cpp's gemma3 graph cannot run of a Gemma 3 config.json, beyond `requires`."""
    config = {**HF_DEFAULTS, **config}
    n_layer = config.get("num_hidden_layers")
    if not isinstance(n_layer, int) or n_layer < 1:
        return None  # the metadata checks say what is wrong
    if hf_layer_types(config) != layer_pattern(n_layer):
        return (f"has layer_types {hf_layer_types(config)!r}, which llama.cpp's gemma3 cannot "
                f"run: it makes every {PATTERN}th layer global and the others sliding-window.")
    local = rope_by_layer(config)[1]
    if not isinstance(local, dict) or local.get("rope_theta") != LOCAL_THETA or \
            local.get("rope_type", local.get("type", "default")) != "default":
        return (f"has sliding-layer rope parameters {local!r}, which llama.cpp's gemma3 cannot "
                f"run: it hard-codes rope_theta {LOCAL_THETA:g}, unscaled, for those layers.")
    scalar = llamacpp_scalar(config)
    if config["query_pre_attn_scalar"] != scalar:
        return (f"sets query_pre_attn_scalar={config['query_pre_attn_scalar']!r}, which "
                f"llama.cpp's gemma3 cannot run: it scales attention by 1/sqrt({scalar}) for "
                "this shape.")
    return None


def gguf_finish_import(config: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """config.json from a gemma3 GGUF file: llama.cpp's layer pattern, sliding rope base and
    attention scale, and its defaults for the keys a file may leave out (which differ from
    Gemma3TextConfig's)."""
    import numpy as np

    def key(name: str, default: Any) -> Any:
        return fields.get(f"gemma3.{name}", default)

    heads = config["num_attention_heads"]
    config = {name: value for name, value in config.items()
              if name not in ("rope_theta", "rope_scaling")}  # rope_parameters say it all
    full = {**config["rope_parameters"],
            "rope_theta": float(str(np.float32(key("rope.freq_base", LLAMACPP_THETA))))}
    config |= {"head_dim": key("attention.key_length", config["hidden_size"] // heads),
               "num_key_value_heads": key("attention.head_count_kv", heads),
               "layer_types": layer_pattern(config["num_hidden_layers"]),
               "rope_parameters": {"full_attention": full, "sliding_attention": {
                   "rope_type": "default", "rope_theta": LOCAL_THETA}}}
    return config | {"query_pre_attn_scalar": llamacpp_scalar(config)}


# Gemma's RMSNorm gain is 1 + weight; llama.cpp's multiplies by the stored weight, so the
# file holds 1 + weight, as llama.cpp's converter writes it
UNIT_OFFSET = Transform("norm gain 1 + weight", lambda a, c: a.astype("float32") + 1,
                        lambda t, c: t - 1, lambda s, c: s)
GGUF_NORMS = {"model.norm": "output_norm", LAYER + "input_layernorm": "blk.{bid}.attn_norm",
              LAYER + "post_attention_layernorm": "blk.{bid}.post_attention_norm",
              LAYER + "pre_feedforward_layernorm": "blk.{bid}.ffn_norm",
              LAYER + "post_feedforward_layernorm": "blk.{bid}.post_ffw_norm",
              LAYER + "self_attn.q_norm": "blk.{bid}.attn_q_norm",
              LAYER + "self_attn.k_norm": "blk.{bid}.attn_k_norm"}
GGUF_TENSORS = (
    TensorRule("model.embed_tokens.weight", TOKEN_EMBD),
    # Gemma3TextConfig ties the head unless config.json says otherwise
    TensorRule("lm_head.weight", "output.weight", when=Flag("tie_word_embeddings", False, True),
               skip_otherwise=True),
    *(rule for rule in llama_gguf_tensors(None, qk_norm=False, qkv_bias=False, o_bias=False)
      if "_proj." in rule.hf),
    *(TensorRule(f"{hf}.weight", f"{gguf}.weight", UNIT_OFFSET) for hf, gguf in GGUF_NORMS.items()),
)
GGUF_META = (
    *LLAMA_META[:5],  # context, width, blocks, MLP width, heads: as Llama's
    # optional in llama.cpp, with its own defaults: `gguf_finish_import` reads them back
    Meta("{arch}.attention.head_count_kv", "num_key_value_heads", "u32",
         lambda c: HF_DEFAULTS["num_key_value_heads"], optional=True),
    Meta("{arch}.attention.key_length", "head_dim", "u32", lambda c: HF_DEFAULTS["head_dim"],
         optional=True),
    Meta("{arch}.attention.value_length", "head_dim", "u32", lambda c: HF_DEFAULTS["head_dim"],
         optional=True),
    Meta("{arch}.rope.freq_base", "rope_theta", "f32", global_theta, optional=True),
    Meta("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32",
         lambda c: HF_DEFAULTS["rms_norm_eps"]),
    Meta("{arch}.attention.sliding_window", "sliding_window", "u32",
         lambda c: HF_DEFAULTS["sliding_window"]),
)


@register
class Gemma3(Llama):
    name = "gemma3"
    model_type = "gemma3_text"
    hf_class = "Gemma3ForCausalLM"
    display_name = "Gemma 3"
    norms = ("rmsnorm_unit_offset",)
    mlps = ("geglu",)
    qk_norm = True
    biases = (False,)
    tied = (True, False)
    embed_scale = True
    sandwich_norm = True
    rope_theta = GLOBAL_THETA
    sliding_window = 512  # gemma-3-270m's and gemma-3-1b's
    rope_local_theta = LOCAL_THETA
    own_attn_scale = True
    activations: ClassVar[dict[str, str]] = {"gelu_pytorch_tanh": "geglu"}
    hf_tensors = GEMMA3_TENSORS
    gguf = GGUFLayout(
        model_type="gemma3_text",
        gguf_arch="gemma3",
        tensors=GGUF_TENSORS,
        ignored=(LAYER + "self_attn.rotary_emb.inv_freq",),
        metadata=GGUF_META,
        layers_field="num_hidden_layers",
        # llama.cpp's gemma3 graph (with sliding windows) applies no logit soft-cap
        requires={"final_logit_softcapping": (None,), "hidden_activation": ("gelu_pytorch_tanh",)},
        hf_config={"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                   "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False},
        rope=True,
        sliding_window=True,
        refusal=gguf_refusal,
        finish_import=gguf_finish_import,
    )

    def constraints(self, config: GPTConfig) -> dict[str, tuple[Any, ...]]:
        allowed = super().constraints(config)
        del allowed["logit_softcap"]  # final_logit_softcapping: none in Gemma 3, any in its class
        return allowed

    def layer_types(self, n_layer: int) -> list[str]:
        return layer_pattern(n_layer)

    def check_hf(self, hf: dict[str, Any], source: str) -> None:
        refusals = {"use_bidirectional_attention": (False, None),
                    "attn_logit_softcapping": (None,), "attention_bias": (False,)}
        for key, allowed in refusals.items():
            if hf.get(key) not in allowed:
                raise GptkitError(f"{source} sets {key}={hf[key]!r}, which gptkit's {self.name} "
                                  f"does not build; expected {allowed[0]!r}.")

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        hf = {**HF_DEFAULTS, **hf}
        if hf["hidden_activation"] not in self.activations:
            raise GptkitError(f"{source} sets hidden_activation={hf['hidden_activation']!r}, "
                              f"which gptkit's {self.name} does not support; expected "
                              f"{' or '.join(map(repr, self.activations))}.")
        full, local = rope_by_layer(hf)
        local_theta, local_scaling = rope.from_hf({"rope_parameters": local}, source)
        if local_scaling is not None:
            raise GptkitError(f"{source} scales the sliding-window layers' rotary positions "
                              f"({local_scaling['rope_type']}), which gptkit does not compute; it "
                              "scales the global layers' only.")
        values = super().config_from_hf(
            {**hf, "hidden_act": hf["hidden_activation"], "rope_parameters": full}, source)
        return values | dict(
            head_dim=hf["head_dim"],
            logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
            layer_types=hf_layer_types(hf),
            sliding_window=hf["sliding_window"],
            rope_local_theta=local_theta,
            query_pre_attn_scalar=hf["query_pre_attn_scalar"],
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        full = {"rope_type": "default", "rope_theta": config.rope_theta,
                **(config.rope_scaling or {})}
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta}
        return self.common_hf(config) | {
            "head_dim": config.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "layer_types": config.layer_types or ["full_attention"] * config.n_layer,
            "sliding_window": config.sliding_window,
            "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_dim,
            "final_logit_softcapping": config.logit_softcap or None,
            "attn_logit_softcapping": None,
            "use_bidirectional_attention": False,
        }
