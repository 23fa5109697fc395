"""Model directories on disk: GPT-2 safetensors in and out, atomic multi-file commits.

One module used by train, generate, eval and serve. A model directory is a Hugging
Face GPT-2 directory (config.json, model.safetensors, generation_config.json, plus the
tokenizer files), so `transformers` opens ours and we open theirs.

Crash safety: a checkpoint is several files that must change together. `commit_files`
writes them all into a staging folder, marks it complete, then renames each into place;
`recover` rolls a complete staging folder forward and discards an incomplete one, so a
kill at any moment leaves the previous checkpoint (or the new one) whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.model import GPT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
STAGING = ".staging"
COMPLETE_MARKER = "COMPLETE"

# GPT-2 stores these as Conv1D weights (in, out); our nn.Linear holds (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old GPT-2 checkpoints carry (causal masks); not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_HUB_FILES = [
    CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "gptkit_task.json",
]


# -- atomic writes ----------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_files(directory: str | Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write several files so that they all change together or not at all.

    `writers` maps a file name to a function that writes that file at the given path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover(directory)
    staging = directory / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for name, write in writers.items():
            write(staging / name)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        (staging / COMPLETE_MARKER).write_text(json.dumps(sorted(writers)))
        _fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # free the space a failed write took
        raise
    recover(directory)


def recover(directory: str | Path) -> None:
    """Finish or discard a commit that a crash interrupted."""
    directory = Path(directory)
    staging = directory / STAGING
    if not staging.exists():
        return
    marker = staging / COMPLETE_MARKER
    if marker.exists():
        for name in json.loads(marker.read_text()):
            if (staging / name).exists():  # absent when moved before the crash
                os.replace(staging / name, directory / name)
        _fsync_dir(directory)
    shutil.rmtree(staging)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace one file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- GPT-2 state dicts ------------------------------------------------------------------

def to_hf_state_dict(model: GPT, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Our parameters under GPT-2 names and layouts (tied lm_head left out, as HF does).

    `state_dict` replaces the model's own tensors (e.g. full weights gathered from shards).
    """
    out = {}
    for name, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[name] = tensor.to("cpu", torch.float32).contiguous()
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig,
                       source: str) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the 'transformer.' prefix) -> our state dict, checked."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES) or name == "lm_head.weight":
            continue
        key = name if name.startswith("transformer.") else "transformer." + name
        if key not in expected:
            raise GptkitError(f"{source} holds an unexpected tensor '{name}'; it is not a GPT-2 model file.")
        if not tensor.is_floating_point():
            raise GptkitError(f"{source}: tensor '{name}' has dtype {tensor.dtype}; expected floating point.")
        if key.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tensor.shape != expected[key]:
            raise GptkitError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[key])}."
            )
        state[key] = tensor.contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GptkitError(f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. '{missing[0]}'.")
    return state


# -- model directories ------------------------------------------------------------------

def save_model(model: GPT, directory: str | Path,
               extra: dict[str, Callable[[Path], None]] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a model directory (plus any `extra` files) as one atomic commit."""
    from safetensors.torch import save_file

    config = model.config
    generation = {"bos_token_id": config.bos_token_id if config.bos_token_id is not None
                  else config.eos_token_id, "eos_token_id": config.eos_token_id}
    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS_NAME: lambda p: save_file(to_hf_state_dict(model, state_dict), str(p),
                                         metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: write_json(p, config.to_hf_dict()),
        GENERATION_CONFIG_NAME: lambda p: write_json(p, generation),
    }
    writers.update(extra or {})
    commit_files(directory, writers)


def resolve_model_dir(name_or_dir: str | Path) -> Path:
    """A local model directory, downloading a hub name such as 'gpt2' when needed."""
    path = Path(name_or_dir)
    if path.is_dir():
        recover(path)
        if not (path / CONFIG_NAME).exists():
            raise GptkitError(
                f"'{path}' is not a model directory: it has no {CONFIG_NAME} "
                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by gptkit or transformers)."
            )
        return path
    name = str(name_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise GptkitError(f"'{name}' is not a model directory (expected a folder with {CONFIG_NAME}).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_FILES))
    except Exception as exc:  # any network, auth or name error ends in the same advice
        raise GptkitError(
            f"Could not find '{name}' locally or download it from the Hugging Face hub "
            f"({type(exc).__name__}); pass a local model directory instead."
        ) from None


def load_config(directory: Path) -> GPTConfig:
    path = directory / CONFIG_NAME
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptkitError(f"{path} is not valid JSON ({exc}).") from None
    return GPTConfig.from_hf_dict(hf, source=str(path))


def load_model(name_or_dir: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> GPT:
    """Load weights from safetensors only (never pickle) into a fresh GPT."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_model_dir(name_or_dir)
    config = load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise GptkitError(f"'{directory}' has no {WEIGHTS_NAME}; gptkit loads weights from safetensors only.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptkitError(f"{weights} is corrupted or truncated ({exc}).") from None
    state = from_hf_state_dict(tensors, config, str(weights))
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    model.to(device=device, dtype=dtype)
    return model.eval()
