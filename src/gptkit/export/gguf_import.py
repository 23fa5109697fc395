"""GGUF import: a GGUF file -> a model directory gptkit and transformers load.

    from gptkit.export.gguf_import import import_gguf, load_gguf
    import_gguf("model.gguf", "runs/from-gguf")   # config.json, model.safetensors, tokenizer.json, ...
    model, tokenizer = load_gguf("model.gguf")     # the same, straight into memory

It reads the files llama.cpp's convert_hf_to_gguf.py and llama-quantize write (the ones
in Ollama's and LM Studio's folders and on the hub) as well as gptkit's own exports, with
the `gguf` package's GGUFReader, and walks each family's GGUF table (`gptkit.families`)
backwards. Keys llama.cpp treats as optional take llama.cpp's defaults; keys gptkit cannot
honour (experts, a rope over part of each head) are refused in one sentence naming them.
f32 weights come back bit for bit (llama's q/k rows in Hugging Face's order again); f16
and bf16 widen to f32 exactly; quantized types (Q4_0 to Q8_0, the K-quants) are
dequantized. Rope scaling comes back from llama.cpp's linear keys or, for llama3 (whose
rope_freqs tensor does not say its parameters), from the exporter's gptkit.rope_scaling.
The tokenizer is rebuilt from tokenizer.ggml.* (`gptkit.export.gguf_vocab`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.export.gguf_vocab import end_of_turn_ids, tokenizer_files
from gptkit.families import FAMILIES
from gptkit.families.base import template_pattern
from gptkit.families.gguf_table import ROPE_FREQS, TOKEN_EMBD, GGUFLayout

IMPORT_DTYPES = ("float32", "bfloat16")
# GGUF keys of models gptkit does not build (mixtures of experts), when nonzero
UNSUPPORTED_KEYS = ("{arch}.expert_count", "{arch}.expert_used_count")

if TYPE_CHECKING:
    import torch

    from gptkit import GPT, Tokenizer


def import_gguf(path: str | Path, out_dir: str | Path, *, force: bool = False,
                dtype: str = "float32", progress: bool | None = None) -> Path:
    """Write the model in the GGUF file `path` as a model directory `out_dir`, its weights
    as `dtype` (float32, or bfloat16 for half the size).

    An existing `out_dir` is refused unless `force`; the directory appears only when
    complete (it is written under a temporary name, then renamed). `progress`: a bar on
    stderr over the tensors' bytes when True, none when False, on a terminal when None.
    """
    import torch
    from safetensors.torch import save_file

    path, out_dir = Path(path), Path(out_dir)
    if dtype not in IMPORT_DTYPES:
        raise GptkitError(f"--dtype {dtype!r} is not an import type; expected "
                          f"{' or '.join(IMPORT_DTYPES)}.")
    if out_dir.exists() and not force:
        raise GptkitError(f"{out_dir} already exists; pass --force (force=True) to replace it.")
    reader = _open(path)
    fields = {name: _value(field) for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    arch = _architecture(fields, path)
    config = _hf_config(fields, arch, path)
    state = _state_dict(reader, arch, config, path, progress)
    if dtype == "bfloat16":
        state = {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}
        config["dtype"] = "bfloat16"
    _from_tensors(config, arch, state, fields, path)
    tokenizer = tokenizer_files(fields, path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # generation stops at the end of a text and at the end of a chat turn
        stops = [config.get("eos_token_id"), *end_of_turn_ids(fields)]
        stops = list(dict.fromkeys(i for i in stops if i is not None))
        files = {"config.json": config, **tokenizer,
                 "generation_config.json": {"bos_token_id": config.get("bos_token_id"),
                                            "eos_token_id": stops[0] if len(stops) == 1
                                            else stops or None}}
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        _usual_permissions(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _usual_permissions(directory: Path) -> None:
    """The modes a new directory and its files get from the umask: mkdtemp makes a private
    folder, which would keep the model from the machine's other users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~mask)


def load_gguf(path: str | Path, device: str | None = None,
              dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer in a GGUF file (see `import_gguf`)."""
    from gptkit import GPT, Tokenizer

    with tempfile.TemporaryDirectory(prefix="gptkit-gguf-") as tmp:
        directory = import_gguf(path, Path(tmp) / "model")
        return (GPT.from_pretrained(directory, device=device, dtype=dtype),
                Tokenizer.from_pretrained(directory))


# -- reading ----------------------------------------------------------------------------

def _open(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise GptkitError(f"{path} does not exist or is not a file; expected a .gguf file.")
    try:
        return GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct and numpy errors alike
        raise GptkitError(f"{path} is not a readable GGUF file ({exc}).") from None


def _value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def _architecture(fields: dict[str, Any], path: Path) -> GGUFLayout:
    name = fields.get("general.architecture")
    layouts = [f.gguf for f in FAMILIES.values() if f.gguf is not None]
    for arch in layouts:
        if arch.gguf_arch == name:
            return arch
    known = ", ".join(a.gguf_arch for a in layouts)
    raise GptkitError(f"{path} holds a {name!r} model, which gptkit cannot load; it loads "
                      f"GGUF files of {known}.")


def _state_dict(reader: Any, arch: GGUFLayout, config: dict[str, Any], path: Path,
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts, f32, from the GGUF tensors (each type the `gguf`
    package dequantizes: F32, F16, BF16, Q4_0 to Q8_0, the K-quants, the IQ types)."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from tqdm import tqdm

    rules = [(rule, template_pattern(rule.gguf)) for rule in arch.tensors]
    head_is_tied = not any(rule.gguf == "output.weight" for rule in arch.tensors)
    tensors = {t.name: t for t in reader.tensors}
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(int(t.n_bytes) for t in reader.tensors), unit="B", unit_scale=True,
               desc=f"reading {path.name}", leave=False,
               disable=None if progress is None else not progress)
    for name, tensor in tensors.items():
        bar.update(int(tensor.n_bytes))
        if name == "output.weight" and head_is_tied:  # llama.cpp's converter writes it out
            continue
        if name == ROPE_FREQS and arch.rope_factors:  # made from config's rope_scaling
            if (config.get("rope_scaling") or {}).get("rope_type") != "llama3":
                raise GptkitError(f"{path} has llama3 rope factors ({ROPE_FREQS}) but no "
                                  "gptkit.rope_scaling key with their parameters, so gptkit "
                                  "cannot rebuild its config.")
            continue
        found = next(((rule, m) for rule, pattern in rules if (m := pattern.match(name))), None)
        if found is None:
            raise GptkitError(f"{path} holds the tensor '{name}', which a {arch.model_type} "
                              "model does not have.")
        rule, match = found
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        data = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(data.reshape(shape))
        if rule.transform is not None:
            weight = rule.transform.from_gguf(weight, config)
        hf_name = arch.hf_prefix + rule.hf.format(bid=match.groupdict().get("bid"))
        state[hf_name] = weight.contiguous()
    bar.close()
    if "output.weight" in tensors and head_is_tied:
        head = tensors["output.weight"]
        embedding = state.get(_embedding_name(arch))
        values = np.asarray(dequantize(head.data, head.tensor_type), dtype=np.float32)
        if embedding is None or not np.array_equal(values.reshape(embedding.shape),
                                                   embedding.numpy()):
            raise GptkitError(f"{path} has an output head that differs from its token "
                              f"embedding; gptkit's {arch.model_type} ties the two.")
    return state


def _embedding_name(arch: GGUFLayout) -> str:
    return arch.hf_prefix + next(r.hf for r in arch.tensors if r.gguf == TOKEN_EMBD)


def _hf_config(fields: dict[str, Any], arch: GGUFLayout, path: Path) -> dict[str, Any]:
    """config.json as far as the GGUF keys tell it (`_from_tensors` adds the rest)."""
    import numpy as np

    config: dict[str, Any] = dict(arch.hf_config or {})
    for template in UNSUPPORTED_KEYS:
        key = template.format(arch=arch.gguf_arch)
        if fields.get(key):
            raise GptkitError(f"{path} sets {key}={fields[key]}: a mixture of experts, which "
                              "gptkit does not build.")
    read: dict[str, tuple[str, Any]] = {}  # config field -> (GGUF key, value) that set it
    for meta in arch.metadata:
        key = meta.key.format(arch=arch.gguf_arch)
        if key not in fields and meta.optional:
            continue  # llama.cpp's default, which is also the config.json default
        if key not in fields:
            raise GptkitError(f"{path} lacks the metadata key {key}, which llama.cpp's "
                              f"{arch.gguf_arch} graph needs too.")
        value = fields[key]
        if meta.kind == "f32":  # the shortest decimal that is this float32 (1e-05, not 9.99e-06)
            value = float(str(np.float32(value)))
        earlier = read.setdefault(meta.field, (key, value))
        if earlier[1] != value:  # e.g. a rope over part of each head only
            raise GptkitError(f"{path} has {key}={value} but {earlier[0]}={earlier[1]}; gptkit "
                              f"builds models where the two are equal.")
        if meta.default is not None and value == meta.default(config):
            continue  # left to its default, as the original config.json most likely did
        config[meta.field] = value
    if arch.rope:
        config["rope_scaling"] = _rope_scaling(fields, arch, path)
        # transformers 5 reads rope_parameters; older readers rope_theta and rope_scaling
        config["rope_parameters"] = {"rope_type": "default",
                                     "rope_theta": config.get("rope_theta", 10000.0),
                                     **(config["rope_scaling"] or {})}
        if config["rope_scaling"] is None:
            del config["rope_scaling"]
    return config if arch.finish_import is None else arch.finish_import(config, fields)


def _rope_scaling(fields: dict[str, Any], arch: GGUFLayout, path: Path
                  ) -> dict[str, Any] | None:
    """rope_scaling as gptkit exported it (its own key), or from llama.cpp's linear keys."""
    saved = fields.get("gptkit.rope_scaling")
    if isinstance(saved, str):
        try:
            scaling = json.loads(saved)
        except json.JSONDecodeError:
            scaling = None
        if not isinstance(scaling, dict) or "rope_type" not in scaling:
            raise GptkitError(f"{path} has a gptkit.rope_scaling value gptkit cannot read "
                              f"({saved!r}).")
        return scaling
    kind = fields.get(f"{arch.gguf_arch}.rope.scaling.type", "none")
    factor = fields.get(f"{arch.gguf_arch}.rope.scaling.factor")
    if kind == "linear" and isinstance(factor, (int, float)) and factor not in (0, 1):
        import numpy as np

        return {"rope_type": "linear", "factor": float(str(np.float32(factor)))}
    if kind not in ("none", "linear") or (isinstance(factor, (int, float)) and factor not in (0, 1)):
        raise GptkitError(f"{path} uses rope scaling {kind!r}, which gptkit does not load.")
    return None


def _from_tensors(config: dict[str, Any], arch: GGUFLayout, state: dict[str, torch.Tensor],
                  fields: dict[str, Any], path: Path) -> None:
    """What the tensors tell about config.json: the vocabulary, the switches that decide
    which tensors exist (biases, an untied head), the special tokens; then a check that
    gptkit can load the result."""
    from gptkit.config import GPTConfig

    config["vocab_size"] = int(state[_embedding_name(arch)].shape[0])
    present: dict[str, tuple[Any, bool]] = {}
    for rule in arch.tensors:
        if rule.when is not None:
            pattern = template_pattern(arch.hf_prefix + rule.hf)
            seen = present.get(rule.when.field, (None, False))[1]
            present[rule.when.field] = (rule.when.present_if,
                                        seen or any(pattern.match(name) for name in state))
    for field, (present_if, seen) in present.items():
        config[field] = present_if if seen else not present_if
    for name in ("bos", "eos"):
        value = fields.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[f"{name}_token_id"] = int(value)
    GPTConfig.from_hf_dict(config, str(path))  # one sentence if gptkit could not load it

