"""GGUF import: a file written by `gptkit export` -> a model directory gptkit loads.

    from gptkit.export.gguf_import import import_gguf, load_gguf
    import_gguf("mine.gguf", "runs/from-gguf")   # config.json, model.safetensors, tokenizer.json, ...
    model, tokenizer = load_gguf("mine.gguf")     # the same, straight into memory

It reads the file with the `gguf` package's GGUFReader and walks the architecture table of
`gptkit.export.gguf` backwards, so every architecture the exporter knows comes back.
f32 weights come back bit for bit (llama's q/k rows in Hugging Face's order again); f16
and bf16 widen to f32 exactly; q8_0 is dequantized (each int8 times its block's f16
scale). Rope scaling comes back from llama.cpp's linear keys or, for llama3 (whose
rope_freqs tensor does not say its parameters), from the exporter's gptkit.rope_scaling. The directory is a Hugging Face one,
like every gptkit model directory: transformers opens it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.export.gguf import (
    ARCHITECTURES,
    GPT2_PATTERN,
    PRE_TOKENIZERS,
    ROPE_FREQS,
    TOKEN_EMBD,
    Architecture,
    rule_pattern,
)

if TYPE_CHECKING:
    import torch

    from gptkit import GPT, Tokenizer


def import_gguf(path: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the model in the GGUF file `path` as a model directory `out_dir`.

    An existing `out_dir` is refused unless `force`; the directory appears only when
    complete (it is written under a temporary name, then renamed).
    """
    from safetensors.torch import save_file

    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and not force:
        raise GptkitError(f"{out_dir} already exists; pass --force (force=True) to replace it.")
    reader = _open(path)
    fields = {name: _value(field) for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    arch = _architecture(fields, path)
    config = _hf_config(fields, arch, path)
    state = _state_dict(reader, arch, config, path)
    _from_tensors(config, arch, state, fields, path)
    tokenizer_files = _tokenizer_files(fields, path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {"config.json": config, **tokenizer_files,
                 "generation_config.json": {"bos_token_id": config.get("bos_token_id"),
                                            "eos_token_id": config.get("eos_token_id")}}
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_gguf(path: str | Path, device: str | None = None,
              dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer in a GGUF file written by `gptkit export`."""
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


def _architecture(fields: dict[str, Any], path: Path) -> Architecture:
    name = fields.get("general.architecture")
    for arch in ARCHITECTURES.values():
        if arch.gguf_arch == name:
            return arch
    known = ", ".join(a.gguf_arch for a in ARCHITECTURES.values())
    raise GptkitError(f"{path} holds a {name!r} model, which gptkit cannot load; it loads "
                      f"GGUF files of {known}.")


def _state_dict(reader: Any, arch: Architecture, config: dict[str, Any], path: Path
                ) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts, f32, from the GGUF tensors."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    rules = [(rule, rule_pattern(rule.gguf)) for rule in arch.tensors]
    head_is_tied = not any(rule.gguf == "output.weight" for rule in arch.tensors)
    tensors = {t.name: t for t in reader.tensors}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
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
    if "output.weight" in tensors and head_is_tied:
        head = tensors["output.weight"]
        embedding = state.get(_embedding_name(arch))
        values = np.asarray(dequantize(head.data, head.tensor_type), dtype=np.float32)
        if embedding is None or not np.array_equal(values.reshape(embedding.shape),
                                                   embedding.numpy()):
            raise GptkitError(f"{path} has an output head that differs from its token "
                              f"embedding; gptkit's {arch.model_type} ties the two.")
    return state


def _embedding_name(arch: Architecture) -> str:
    return arch.hf_prefix + next(r.hf for r in arch.tensors if r.gguf == TOKEN_EMBD)


def _hf_config(fields: dict[str, Any], arch: Architecture, path: Path) -> dict[str, Any]:
    """config.json as far as the GGUF keys tell it (`_from_tensors` adds the rest)."""
    import numpy as np

    config: dict[str, Any] = dict(arch.hf_config or {})
    for meta in arch.metadata:
        key = meta.key.format(arch=arch.gguf_arch)
        if key not in fields:
            raise GptkitError(f"{path} lacks the metadata key {key}.")
        value = fields[key]
        if meta.kind == "f32":  # the shortest decimal that is this float32 (1e-05, not 9.99e-06)
            value = float(str(np.float32(value)))
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
    return config


def _rope_scaling(fields: dict[str, Any], arch: Architecture, path: Path
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


def _from_tensors(config: dict[str, Any], arch: Architecture, state: dict[str, torch.Tensor],
                  fields: dict[str, Any], path: Path) -> None:
    """What the tensors tell about config.json: the vocabulary, the switches that decide
    which tensors exist (biases, an untied head), the special tokens; then a check that
    gptkit can load the result."""
    from gptkit.config import GPTConfig

    config["vocab_size"] = int(state[_embedding_name(arch)].shape[0])
    present: dict[str, tuple[Any, bool]] = {}
    for rule in arch.tensors:
        if rule.when is not None:
            pattern = rule_pattern(arch.hf_prefix + rule.hf)
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


def _tokenizer_files(fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """tokenizer.json (rebuilt from the GGUF vocabulary and merges), tokenizer_config.json
    and, with a chat template, chat_template.jinja."""
    from gguf import TokenType
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GptkitError(f"{path} has a {model!r} tokenizer; gptkit loads byte-level BPE "
                          "('gpt2') tokenizers.")
    pre = fields.get("tokenizer.ggml.pre")
    pattern = next((p.pattern for p in PRE_TOKENIZERS if p.name == pre), None)
    if pattern is None:
        raise GptkitError(f"{path} has the pre-tokenizer {pre!r}, which gptkit does not know.")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    # Added tokens after the last BPE token stay out of the BPE vocabulary and are appended
    # by add_special_tokens, as `Tokenizer.train` builds them: the same tokenizer.json, so
    # the same `Tokenizer.hash`, and prepared data still matches the imported model.
    last_normal = max((i for i, kind in enumerate(types) if kind == TokenType.NORMAL), default=-1)
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
             if kind != TokenType.UNUSED and (kind == TokenType.NORMAL or i < last_normal)}

    hf = HFTokenizer(models.BPE(vocab, merges))
    if pattern == GPT2_PATTERN:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=True)
                           for t, kind in zip(tokens, types, strict=True)
                           if kind == TokenType.CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=True)
                   for t, kind in zip(tokens, types, strict=True)
                   if kind == TokenType.USER_DEFINED])

    for index, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != TokenType.UNUSED and hf.token_to_id(text) != index:
            raise GptkitError(f"{path}: token {text!r} would not keep its id {index} in a "
                              "tokenizer.json; expected the layout gptkit exports.")

    def token(name: str) -> str | None:
        index = fields.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    eos = token("eos")
    config: dict[str, Any] = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": token("bos") or eos, "eos_token": eos, "unk_token": eos,
        "pad_token": token("padding") or eos,
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
    }
    context = next((v for k, v in fields.items() if k.endswith(".context_length")), None)
    if isinstance(context, int):
        config["model_max_length"] = context
    files: dict[str, Any] = {"tokenizer.json": hf.to_str(pretty=True) + "\n",
                             "tokenizer_config.json": config}
    template = fields.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
        files["chat_template.jinja"] = template
    return files
