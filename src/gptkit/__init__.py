"""gptkit: build, pretrain, fine-tune, generate with and serve your own GPT.

`from gptkit import GPT, GPTConfig, Tokenizer` — names are imported lazily so that
`gptkit --help` does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "Tokenizer", "GptkitError", "__version__"]

_LAZY = {
    "GPT": "gptkit.model",
    "GPTConfig": "gptkit.config",
    "Tokenizer": "gptkit.tokenizer",
    "GptkitError": "gptkit.errors",
}

if TYPE_CHECKING:
    from gptkit.config import GPTConfig
    from gptkit.errors import GptkitError
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptkit' has no attribute {name!r}")
