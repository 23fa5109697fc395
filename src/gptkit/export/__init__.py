"""Export gptkit models to formats other runtimes read, and read them back.

`gptkit export --model DIR --format gguf --out FILE` writes one GGUF file for llama.cpp,
Ollama, LM Studio and node-llama-cpp (`gptkit.export.gguf`, docs/export.md);
`gptkit.export.gguf_import` turns such a file back into a model directory gptkit loads.
Nothing heavy is imported here, so `gptkit --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gptkit.errors import GptkitError

if TYPE_CHECKING:
    from gptkit.export.gguf import ExportResult

FORMATS = ("gguf",)


def export_model(model_dir: str | Path, out: str | Path, *, format: str = "gguf",
                 dtype: str = "f16", force: bool = False,
                 progress: bool | None = None) -> ExportResult:
    """Export `model_dir` to `out` in `format`; see `gguf.export_gguf` for the options."""
    if format not in FORMATS:
        raise GptkitError(f"unknown export format {format!r}; expected one of "
                          f"{', '.join(FORMATS)}.")
    from gptkit.export.gguf import export_gguf

    return export_gguf(model_dir, out, dtype=dtype, force=force, progress=progress)
