"""Architecture families, one module each, held in a registry (see `families.base`).

    from gptkit.families import family
    family("qwen3").hf_class            # 'Qwen3ForCausalLM'

Adding a family is one module here that subclasses `Family` (or a relative such as
`Llama`) under `@register`, plus any new flag the network in `gptkit.model` needs.
"""

from gptkit.families import (  # noqa: F401  (they register)
    gemma3,
    gpt2,
    llama,
    nanochat,
    qwen2,
    qwen3,
)
from gptkit.families.base import FAMILIES, Family, by_model_type, family, unknown

__all__ = ["FAMILIES", "Family", "by_model_type", "family", "unknown"]
