"""What an architecture family is: the base class every family module fills in, and the
registry that holds them (in the style of llama.cpp's converter, `@register`).

A family owns everything that differs between, say, Llama and Qwen3 outside the network's
code: the flags of the one flag-driven network in `gptkit.model`, its `config.json` ⇄
`GPTConfig` translation, its Hugging Face tensor layout, its GGUF names and keys, and the
module names its LoRA adapters take in `peft`. Nothing outside `gptkit.families` asks
which family a model is; it asks the family.

Light on purpose (no torch): `gptkit --help` imports it through `gptkit.config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from gptkit.errors import GptkitError, closest

if TYPE_CHECKING:
    from gptkit.config import GPTConfig
    from gptkit.families.gguf_table import GGUFLayout


@dataclass(frozen=True)
class HFTensor:
    """One of our modules (`{bid}` = layer index) as the family's Hugging Face modules,
    stacked along the first dimension in that order; `rows` names each one's share of
    the rows ("q", "kv", "mlp" or "all"), and `transpose` says the family stores the
    weight as (in, out) (GPT-2's Conv1D). The suffix (.weight, .bias) carries over."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[str, ...] = ("all",)
    transpose: bool = False


def template_pattern(template: str) -> re.Pattern[str]:
    """A tensor name template ('h.{bid}.ln_1.weight') as a regex with a `bid` group."""
    return re.compile(re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + "$")


class Family:
    """One architecture family. Class attributes are the network's flags and the family's
    defaults; where a tuple lists choices, the first is the default and the rest are what
    the family's transformers class also lets a checkpoint set."""

    name: ClassVar[str]  # --arch, GPTConfig.arch
    model_type: ClassVar[str]  # config.json's model_type
    hf_class: ClassVar[str]  # the transformers class that opens the directory
    display_name: ClassVar[str]  # how `gptkit info` names it

    # -- the network (gptkit.model reads these through GPTConfig) --
    rope: ClassVar[bool] = True  # rotary positions (else learned position embeddings)
    rope_sin_sign: ClassVar[float] = 1.0  # -1: rotates the other way (nanochat)
    # layernorm, rmsnorm, rmsnorm_unweighted, rmsnorm_unit_offset
    norms: ClassVar[tuple[str, ...]] = ("rmsnorm",)
    mlps: ClassVar[tuple[str, ...]] = ("swiglu",)  # gelu, swiglu, geglu, relu2
    qk_norm: ClassVar[bool] = False  # RMSNorm of each head's queries and keys
    biases: ClassVar[tuple[bool, ...]] = (False,)  # biases of the blocks' linear layers
    # biases of the query, key and value projections; None: as `biases`
    qkv_biases: ClassVar[tuple[bool, ...] | None] = None
    tied: ClassVar[tuple[bool, ...]] = (False, True)  # the head reuses the token embedding
    logit_softcap: ClassVar[float] = 0.0  # default cap of the logits; 0: none (and not settable)
    eps: ClassVar[float] = 1e-6  # default epsilon of every norm
    embed_norm: ClassVar[bool] = False  # a norm right after the token embedding
    embed_scale: ClassVar[bool] = False  # token embeddings multiplied by sqrt(n_embd)
    # a norm of each sublayer's output too, before the residual add ("sandwich" norms)
    sandwich_norm: ClassVar[bool] = False
    rope_theta: ClassVar[float] = 10000.0  # default base wavelength of rotary positions
    # sliding-window attention: a new model's window, and the rope base of its windowed
    # layers; None: every layer attends to the whole context (nor can a config say otherwise)
    sliding_window: ClassVar[int | None] = None
    rope_local_theta: ClassVar[float | None] = None
    own_attn_scale: ClassVar[bool] = False  # config.json may set the attention scale apart
    init: ClassVar[str] = "gpt2"  # weight initialisation: "gpt2" or "nanochat"
    own_head_dim: ClassVar[bool] = True  # config.json may set head_dim (and kv heads) apart
    gated_width: ClassVar[int] = 32  # a gated MLP's default width rounds up to a multiple

    # -- files --
    hf_prefix: ClassVar[str] = "model."  # some writers leave it off every tensor name
    hf_tensors: ClassVar[tuple[HFTensor, ...]] = ()
    # tensors some checkpoints carry that hold no weights (masks, rotary buffers)
    hf_ignored: ClassVar[tuple[str, ...]] = ("model.layers.{bid}.self_attn.rotary_emb.inv_freq",)
    gguf: ClassVar[GGUFLayout | None] = None  # None: llama.cpp has no graph for it
    gguf_refusal: ClassVar[str] = ""  # why not, in words
    # our modules in each block that LoRA adapts
    lora_targets: ClassVar[tuple[str, ...]] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                "mlp.c_proj")

    # -- GPTConfig --

    def constraints(self, config: GPTConfig) -> dict[str, tuple[Any, ...]]:
        """The values of config fields beyond the flags above that the family's transformers
        class can express (a field not named here may take any valid value)."""
        allowed: dict[str, tuple[Any, ...]] = {}
        if not self.own_head_dim:
            allowed["head_dim"] = ((config.n_embd // config.n_head,)
                                   if config.n_embd % config.n_head == 0 else ())
        if not self.logit_softcap:
            allowed["logit_softcap"] = (0.0,)
        if self.sliding_window is None:
            allowed.update(layer_types=(None,), sliding_window=(None,), rope_local_theta=(None,))
        if not self.own_attn_scale:
            allowed["query_pre_attn_scalar"] = (None,)
        return allowed

    def layer_types(self, n_layer: int) -> list[str] | None:
        """A new model's attention in each layer, "full_attention" or "sliding_attention";
        None: full in all of them."""
        return None

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        """GPTConfig's fields from the family's config.json, refusing what gptkit does not build."""
        raise NotImplementedError

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        """The config.json that the family's transformers config class reads."""
        raise NotImplementedError

    # -- tensors --

    def hf_layout(self, config: GPTConfig) -> dict[str, list[tuple[str, int, bool]]]:
        """Each of our tensors (a tied head left out) as (HF name, rows, transposed) parts."""
        sizes = {"q": config.n_head * config.head_dim, "kv": config.n_kv_head * config.head_dim,
                 "mlp": config.intermediate_size}
        rules = [(rule, template_pattern(rule.ours)) for rule in self.hf_tensors]
        layout = {}
        for name, shape in config.tensor_shapes().items():
            module, _, kind = name.rpartition(".")
            found = next(((rule, m) for rule, p in rules if (m := p.match(module))), None)
            if found is None:
                raise AssertionError(f"the {self.name} family has no Hugging Face name for {name}")
            rule, match = found
            bid = match.groupdict().get("bid")
            rows = [shape[0] if size == "all" else sizes[size] for size in rule.rows]
            transpose = rule.transpose and kind == "weight"
            layout[name] = [(f"{theirs.format(bid=bid)}.{kind}", n, transpose)
                            for theirs, n in zip(rule.theirs, rows, strict=True)]
        return layout

    def peft_targets(self) -> list[str]:
        """The family's module names (last path component) that `peft` adapts where our
        LoRA layers sit."""
        names = set()
        for rule in self.hf_tensors:
            if rule.ours.endswith(self.lora_targets):
                names.update(theirs.rpartition(".")[2] for theirs in rule.theirs)
        return sorted(names)

    @property
    def peft_fan_in_fan_out(self) -> bool:
        """peft must transpose the adapters when merging (weights stored (in, out))."""
        return any(rule.transpose for rule in self.hf_tensors)


FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family known under its name."""
    FAMILIES[cls.name] = cls()
    return cls


def family(name: str) -> Family:
    """The family called `name` (GPTConfig.arch); a KeyError if there is none."""
    return FAMILIES[name]


def by_model_type(model_type: Any) -> Family | None:
    """The family whose config.json has this model_type, or None."""
    return next((f for f in FAMILIES.values() if f.model_type == model_type), None)


def unknown(kind: str, value: Any) -> GptkitError:
    """One sentence for a family name nobody registered."""
    names = tuple(sorted(FAMILIES))
    return GptkitError(f"{kind} '{value}' is unknown{closest(str(value), names)}; expected one "
                       f"of {', '.join(names)}.")
