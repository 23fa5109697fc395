"""nanochat (Karpathy 2025): rotary positions (turning the other way), parameter-free
RMSNorm (also right after the embedding), QK-norm, a ReLU² MLP, an untied head and
logits soft-capped at 15. llama.cpp has no graph for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gptkit.families.base import HFTensor, register
from gptkit.families.llama import LAYER, LLAMA_TENSORS, Llama

if TYPE_CHECKING:
    from gptkit.config import GPTConfig


@register
class NanoChat(Llama):
    name = "nanochat"
    model_type = "nanochat"
    hf_class = "NanoChatForCausalLM"
    display_name = "nanochat"
    rope_sin_sign = -1.0  # transformers' NanoChat, like nanochat itself: sin negated
    norms = ("rmsnorm_unweighted",)
    mlps = ("relu2", "gelu")
    qk_norm = True
    biases = (False,)
    logit_softcap = 15.0
    embed_norm = True
    init = "nanochat"
    own_head_dim = False  # its config has no head_dim of its own
    activations: ClassVar[dict[str, str]] = {"relu2": "relu2", "gelu_pytorch_tanh": "gelu",
                                             "gelu_new": "gelu"}
    hf_tensors = tuple(
        rule for rule in LLAMA_TENSORS if not rule.ours.endswith("mlp.c_fc")
        and not rule.ours.endswith("mlp.c_proj")) + (
        HFTensor("transformer.h.{bid}.mlp.c_fc", (LAYER + "mlp.fc1",)),
        HFTensor("transformer.h.{bid}.mlp.c_proj", (LAYER + "mlp.fc2",)),
    )
    gguf = None
    gguf_refusal = ("llama.cpp has no architecture with nanochat's ReLU² MLP, parameter-free "
                    "RMSNorm and logit soft-capping")

    def check_hf(self, hf: dict[str, Any], source: str) -> None:
        pass  # every NanoChatConfig setting gptkit reads, it builds

    def config_from_hf(self, hf: dict[str, Any], source: str) -> dict[str, Any]:
        return super().config_from_hf(hf, source) | dict(
            logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))

    def hf_extras(self, config: GPTConfig) -> dict[str, Any]:
        return {"final_logit_softcapping": config.logit_softcap or None}
