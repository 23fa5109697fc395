"""Model directories on disk: safetensors in and out, atomic multi-file commits.

One module used by train, generate, eval and serve. A model directory is the Hugging
Face directory of the model's family (`gptkit.families` says its names) (config.json,
model.safetensors, generation_config.json, plus the tokenizer files), so `transformers`
opens ours and we open theirs.

Crash safety: a checkpoint is several files that must change together. `commit_files`
writes them all into a staging folder with a manifest of sizes and SHA-256 hashes, marks
it complete, then renames each into place, keeping the files it replaces in `.previous/`;
`recover` rolls a complete staging folder forward and discards an incomplete one, so a
kill at any moment leaves the previous checkpoint (or the new one) whole. `ensure_intact`
checks a directory against its manifest and falls back to `.previous/` when it is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError, read_json

if TYPE_CHECKING:  # torch loads only where tensors are read or written
    import torch

    from gptkit.model import GPT

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
STAGING = ".staging"
PREVIOUS = ".previous"
COMPLETE_MARKER = "COMPLETE"
MANIFEST_NAME = "gptkit_manifest.json"
TRAIN_STATE_NAME = "train_state.pt"  # a run's resumable state: step, optimizer, data order

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES,
               "gptkit_task.json")


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
        write_json(staging / MANIFEST_NAME, {name: _fingerprint(staging / name) for name in writers})
        # The commit point: the marker is renamed into place whole, so a kill while it is
        # being written leaves no marker (the commit is discarded), never a truncated one.
        pending = staging / (COMPLETE_MARKER + ".tmp")
        pending.write_text(json.dumps(sorted([*writers, MANIFEST_NAME])))
        with open(pending, "rb") as f:
            os.fsync(f.fileno())
        os.replace(pending, staging / COMPLETE_MARKER)
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
        keep = directory / (PREVIOUS + ".new")
        keep.mkdir(exist_ok=True)
        for name in json.loads(marker.read_text()):
            if not (staging / name).exists():  # moved into place before the crash
                continue
            if (directory / name).exists() and not (keep / name).exists():
                _link_or_copy(directory / name, keep / name)  # the old version survives
            os.replace(staging / name, directory / name)
        _fsync_dir(directory)
        shutil.rmtree(directory / PREVIOUS, ignore_errors=True)
        os.replace(keep, directory / PREVIOUS)
    shutil.rmtree(staging)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copy2(source, target)


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def damaged_file(directory: Path, hashes: bool = True, only: tuple[str, ...] | None = None
                 ) -> str | None:
    """The first file that disagrees with the directory's manifest (None: all intact).

    Without `hashes` only sizes are compared, which is instant even for large weights;
    `only` limits the check to some files. A directory without a manifest (e.g. written
    by transformers) counts as intact.
    """
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return MANIFEST_NAME
    for name, expected in manifest.items():
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.exists() or path.stat().st_size != expected.get("bytes"):
            return name
        if hashes and _fingerprint(path)["sha256"] != expected.get("sha256"):
            return name
    return None


def ensure_intact(directory: str | Path, hashes: bool = True,
                  only: tuple[str, ...] | None = None) -> None:
    """Check a checkpoint against its manifest; on damage, restore the previous one (warning)."""
    directory = Path(directory)
    recover(directory)
    bad = damaged_file(directory, hashes, only)
    if bad is None:
        return
    previous = directory / PREVIOUS
    if previous.exists() and damaged_file(previous) is None and (previous / MANIFEST_NAME).exists():
        for path in previous.iterdir():
            shutil.copy2(path, directory / path.name)
        warnings.warn(f"{directory / bad} is damaged (it does not match {MANIFEST_NAME}); "
                      "fell back to the previous checkpoint.", stacklevel=2)
        return
    raise GptkitError(f"{directory / bad} is damaged (it does not match {MANIFEST_NAME}) and no "
                      "intact previous checkpoint exists.")


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


# -- state dicts in each family's names and layouts ---------------------------------------

def to_hf_state_dict(model: GPT, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Our parameters under the family's Hugging Face names and layouts (a tied lm_head
    left out, as HF does).

    `state_dict` replaces the model's own tensors (e.g. full weights gathered from shards).
    """
    config = model.config
    state = state_dict if state_dict is not None else model.state_dict()
    out = {}
    for ours, parts in config.family.hf_layout(config).items():
        tensor = state[ours].detach().to("cpu").float()
        pieces = tensor.split([rows for _, rows, _ in parts])
        for (name, _, transpose), piece in zip(parts, pieces, strict=True):
            out[name] = (piece.t() if transpose else piece).contiguous()
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig,
                       source: str) -> dict[str, torch.Tensor]:
    """The family's HF tensors -> our state dict, checked against `config`."""
    import torch

    from gptkit.families.base import template_pattern

    arch = config.family
    expected, layout = config.tensor_shapes(), arch.hf_layout(config)
    where = {name: (ours, index) for ours, parts in layout.items()
             for index, (name, _, _) in enumerate(parts)}
    ignored = [template_pattern(name) for name in arch.hf_ignored]
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key = name if name in where or name == "lm_head.weight" else arch.hf_prefix + name
        if any(p.match(key) for p in ignored) or (
                key == "lm_head.weight" and config.tie_word_embeddings):
            continue  # buffers older checkpoints carry; a tied head's copy of the embedding
        if key not in where:
            raise GptkitError(f"{source} holds an unexpected tensor '{name}'; it is not a "
                              f"{config.arch} model file matching config.json.")
        if not tensor.is_floating_point():
            raise GptkitError(f"{source}: tensor '{name}' has dtype {tensor.dtype}; expected floating point.")
        ours, index = where[key]
        pieces.setdefault(ours, {})[index] = tensor
    state = {}
    for ours, parts in layout.items():
        found = pieces.get(ours, {})
        if len(found) < len(parts):
            missing = parts[min(set(range(len(parts))) - set(found))][0]
            raise GptkitError(f"{source} lacks tensor '{missing}', which config.json implies.")
        for index, (name, rows, transpose) in enumerate(parts):
            if transpose:
                found[index] = found[index].t()
            want = (rows, *expected[ours][1:])
            if tuple(found[index].shape) != want:
                shape = tuple(found[index].shape)
                raise GptkitError(
                    f"{source}: tensor '{name}' has shape {shape[::-1] if transpose else shape} "
                    f"but config.json implies {want[::-1] if transpose else want}."
                )
        state[ours] = torch.cat([found[i] for i in range(len(parts))]) if len(parts) > 1 \
            else found[0].contiguous()
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
        # weights only, by size: users may edit config.json by hand
        ensure_intact(path, hashes=False, only=(WEIGHTS_NAME,))
        if not (path / CONFIG_NAME).exists():
            raise GptkitError(
                f"'{path}' is not a model directory: it has no {CONFIG_NAME} "
                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by gptkit or transformers)."
            )
        return path
    name = str(name_or_dir)
    if path.suffix == ".gguf" and path.is_file():
        raise GptkitError(f"'{name}' is a GGUF file, not a model directory; turn it into one "
                          f"with `gptkit import {name} --out DIR`.")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise GptkitError(f"'{name}' is not a model directory (expected a folder with {CONFIG_NAME}).")
    return download(name, MODEL_FILES, "a local model directory")


def download(name: str, files: tuple[str, ...], instead: str) -> Path:
    """Fetch only `files` of hub repository `name` into the usual cache (shared with
    transformers); the one place gptkit reaches the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=list(files)))
    except Exception as exc:  # any network, auth or name error ends in the same advice
        raise GptkitError(
            f"Could not find '{name}' locally or download it from the Hugging Face hub "
            f"({type(exc).__name__}); pass {instead} instead."
        ) from None


def load_config(directory: Path) -> GPTConfig:
    path = directory / CONFIG_NAME
    return GPTConfig.from_hf_dict(read_json(path), source=str(path))


def load(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and checked tensors (our names and layouts) of a resolved model directory.

    Weights come from safetensors only, never pickle.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise GptkitError(f"'{directory}' has no {WEIGHTS_NAME}; gptkit loads weights from safetensors only.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GptkitError(f"{weights} is corrupted or truncated ({exc}).") from None
    return config, from_hf_state_dict(tensors, config, str(weights))
