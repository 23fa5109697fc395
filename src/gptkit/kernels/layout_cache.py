"""Quantized models kept on disk in their inference layout, so that only the first run of
a model with `--quantize` pays for quantizing it.

Quantizing every linear layer at load costs more than reading the result back (about
half a second against a tenth for a 135M model on 2 cores, docs/performance.md). So the
first load writes every tensor of the optimized model to one safetensors file in the
cache directory (`gptkit.kernels.aot.cache_dir`), and later loads read it instead of the
checkpoint. There is one file per model directory and layout, replaced when the
directory's weights or config change (are saved again); its key also holds what the layout depends on
besides the weights (torch, this CPU's vector extensions, the gptkit sources), so a file
from another version is never read.

    cache = LayoutCache(directory, "int8-float32")
    tensors = cache.read()  # None unless a file of the current weights is there
    cache.write(model_tensors(model))
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from gptkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from gptkit.kernels.aot import cache_dir, source_digest

_KEY = "gptkit_layout_key"  # the safetensors metadata entry that holds the key


class LayoutCache:
    """The cached layout `layout` (e.g. "int4-float32") of the model in `directory`."""

    def __init__(self, directory: Path, layout: str) -> None:
        self.directory = directory.resolve()
        name = hashlib.sha256(str(self.directory).encode()).hexdigest()[:16]
        self.path = cache_dir() / "layouts" / f"{name}-{layout}.safetensors"

    def key(self) -> str:
        """A digest of the directory's weights and config (size, modification time and
        inode: an atomic save makes a new file even within the clock's resolution) and of
        everything else the layout depends on."""
        files = {}
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            stat = (self.directory / name).stat()
            files[name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        facts = {"files": files, "path": self.path.name, "torch": torch.__version__,
                 "cpu": torch.backends.cpu.get_cpu_capability(), "gptkit": source_digest()}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def read(self) -> dict[str, torch.Tensor] | None:
        """The saved tensors (mapped from the file, read as they are used), or None where
        there is no file of the directory's current weights."""
        from safetensors import safe_open

        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), "pt") as saved:
                if (saved.metadata() or {}).get(_KEY) != self.key():
                    return None
                return {name: saved.get_tensor(name) for name in saved.keys()}
        except Exception:  # damaged (an interrupted copy, a full disk): written afresh
            return None

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save `tensors` for the next load, atomically; a cache that cannot be written
        (a read-only or full disk) costs a warning, never the run."""
        from safetensors.torch import save_file

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.path.parent) as work:
                partial = Path(work) / self.path.name
                save_file({name: t.contiguous() for name, t in tensors.items()}, str(partial),
                          metadata={_KEY: self.key()})
                os.replace(partial, self.path)
        except OSError as exc:
            warnings.warn(f"could not save the quantized weights to {self.path} ({exc}); "
                          "the next run quantizes them again.", stacklevel=2)
