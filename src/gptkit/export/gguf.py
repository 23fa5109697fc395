"""GGUF export: a gptkit model directory -> one `.gguf` file for llama.cpp and the tools on it.

    gptkit export --model runs/mine --format gguf --out mine.gguf --dtype f16

    from gptkit.export.gguf import export_gguf
    export_gguf("runs/mine", "mine.gguf", dtype="q8_0")

The file is written with `gguf`, llama.cpp's own Python writer, and carries everything a
runtime needs: the weights under llama.cpp's tensor names; the tokenizer (byte-level BPE
tokens, merges, the name of the pre-tokenizer that splits text exactly as gptkit does,
special tokens typed as control tokens, bos/eos/end-of-turn ids, the chat template when
the model has one); and metadata (name, context length, `gptkit.version` and
`gptkit.source_sha256`, see `source_hash`).

It reads the Hugging Face files of the directory (config.json, model.safetensors,
tokenizer.json) directly, so an architecture is one `Architecture` entry below: how its
tensor names map to llama.cpp's (and which need a transpose), and which config.json
fields become which GGUF keys. `gguf_import` reads the same table backwards. The entries:
GPT-2, Llama and Qwen3. Llama's q_proj/k_proj rows are reordered for llama.cpp's `llama`
graph, which rotates adjacent pairs where Hugging Face rotates halves (as llama.cpp's
convert_hf_to_gguf.py does); its `qwen3` graph rotates halves and takes the rows as they
are. Rope scaling: linear becomes llama.cpp's rope.scaling keys, llama3 its rope_freqs
tensor (llama only: the qwen3 graph reads no such tensor, so it is refused there).

What llama.cpp cannot express exactly is refused with one sentence, never exported
wrongly: a character-level tokenizer, a pre-tokenizer or normalizer llama.cpp does not
know, an architecture without an entry, a rope scaling llama.cpp's graph cannot apply. The file is written under a temporary name and
renamed when complete, so a failure (a full disk, Ctrl-C) never leaves a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.export.gguf_vocab import (
    CHAT_TEMPLATE_NAME,
    TOKENIZER_CONFIG_NAME,
    TOKENIZER_NAME,
    GGUFTokenizer,
    add_tokenizer,
    read_json,
    read_tokenizer,
)
from gptkit.families import FAMILIES, by_model_type, rope
from gptkit.families.base import template_pattern
from gptkit.families.gguf_table import (
    ROPE_FREQS,
    TOKEN_EMBD,
    GGUFLayout,
    Transform,
    head_dim,
    rope_theta,
)

if TYPE_CHECKING:
    import numpy as np

DTYPES = ("f32", "f16", "bf16", "q8_0")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Files that define a model's behaviour; `source_hash` covers those present.
SOURCE_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, TOKENIZER_CONFIG_NAME,
                "generation_config.json", CHAT_TEMPLATE_NAME)


# A short write with less than this left on the disk is taken for a full disk.
FULL_DISK_BYTES = 1 << 20


# -- reading the model directory --------------------------------------------------------

def read_config(model_dir: Path) -> tuple[dict[str, Any], GGUFLayout]:
    """config.json and the table entry of its model_type, or one sentence why not."""
    if not model_dir.is_dir():
        what = "a file" if model_dir.exists() else "not found"
        raise GptkitError(f"'{model_dir}' is {what}; expected a model directory with "
                          f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not (model_dir / CONFIG_NAME).is_file():
        raise GptkitError(f"'{model_dir}' is not a model directory: it has no {CONFIG_NAME} "
                          f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as gptkit or "
                          "transformers write them).")
    config = read_json(model_dir / CONFIG_NAME)
    if not isinstance(config, dict):
        raise GptkitError(f"{model_dir / CONFIG_NAME} must hold a JSON object.")
    model_type = config.get("model_type")
    family = by_model_type(model_type)
    if family is not None and family.gguf is None:
        raise GptkitError(f"{model_dir / CONFIG_NAME} has model_type {model_type!r}, which "
                          f"cannot be exported to GGUF: {family.gguf_refusal}.")
    if family is None or family.gguf is None:
        supported = [f.model_type for f in FAMILIES.values() if f.gguf is not None]
        raise GptkitError(f"{model_dir / CONFIG_NAME} has model_type {model_type!r}, which "
                          f"gptkit cannot export to GGUF yet; supported: {', '.join(supported)}.")
    arch = family.gguf
    for key, allowed in arch.requires.items():
        if key in config and config[key] not in allowed:
            raise GptkitError(f"{model_dir / CONFIG_NAME} sets {key}={config[key]!r}, which "
                              f"llama.cpp's {arch.gguf_arch} does not support; expected "
                              f"{allowed[0]!r}.")
    reason = arch.refusal(config) if arch.refusal is not None else None
    if reason is not None:
        raise GptkitError(f"{model_dir / CONFIG_NAME} {reason}")
    layer_types = config.get("layer_types") or []
    if not isinstance(layer_types, list) or (not arch.sliding_window and any(
            t != "full_attention" for t in layer_types)):
        raise GptkitError(f"{model_dir / CONFIG_NAME} has layer_types {layer_types!r}; gptkit "
                          "exports models whose every layer has full attention, not sliding "
                          "windows.")
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise GptkitError(f"'{model_dir}' has no {WEIGHTS_NAME}; gptkit exports weights "
                          "from safetensors only.")
    return config, arch


def hparams(arch: GGUFLayout, config: dict[str, Any], source: Path
            ) -> dict[str, tuple[str, Any]]:
    """The architecture's GGUF keys and their (kind, value) from config.json: kind "u32",
    "f32" or "str"."""
    values: dict[str, tuple[str, Any]] = {}
    for meta in arch.metadata:
        value = config.get(meta.field)
        if value is None and meta.default is not None:
            value = meta.default(config)
        ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0
              if meta.kind == "u32" else isinstance(value, (int, float)) and value > 0)
        if not ok:
            raise GptkitError(f"{source} has {meta.field}={value!r}; expected a positive "
                              f"{'integer' if meta.kind == 'u32' else 'number'}.")
        values[meta.key.format(arch=arch.gguf_arch)] = (meta.kind, value)
    scaling = rope_scaling(arch, config, source)
    if scaling is not None and scaling["rope_type"] == "linear":
        # llama.cpp divides every position by the factor, as transformers' linear type does
        values[f"{arch.gguf_arch}.rope.scaling.type"] = ("str", "linear")
        values[f"{arch.gguf_arch}.rope.scaling.factor"] = ("f32", scaling["factor"])
    if scaling is not None:
        # llama3 goes in as a rope_freqs tensor; the parameters themselves for gguf_import
        values["gptkit.rope_scaling"] = ("str", json.dumps(scaling))
    return values


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None: made by the exporter (`data`)
    gguf_name: str
    transform: Transform | None
    keep_f32: bool
    shape: tuple[int, ...]  # GGUF (numpy) order, after the transform
    data: np.ndarray | None = None


def plan_tensors(arch: GGUFLayout, names_shapes: dict[str, tuple[int, ...]],
                 config: dict[str, Any], source: Path) -> list[PlannedTensor]:
    """Each Hugging Face tensor's GGUF name, in the table's order (then the tensors the
    exporter makes, such as llama3's rope factors); one sentence for an unknown, missing
    or non-matrix tensor."""
    n_layer = config[arch.layers_field]
    rules = [(rule, template_pattern(rule.hf)) for rule in arch.tensors]
    ignored = [template_pattern(name) for name in arch.ignored]
    found: dict[str, PlannedTensor] = {}
    for name, shape in names_shapes.items():
        short = name[len(arch.hf_prefix):] if arch.hf_prefix and name.startswith(
            arch.hf_prefix) else name
        if any(p.match(short) for p in ignored):
            continue
        for rule, pattern in rules:
            match = pattern.match(short)
            if not match:
                continue
            if rule.when is not None and not rule.when.present(config):
                if rule.skip_otherwise:
                    break
                raise GptkitError(
                    f"{source} holds the tensor '{name}', which a {arch.model_type} model with "
                    f"{rule.when.field}={config.get(rule.when.field, rule.when.default)!r} "
                    "does not have; expected the weights config.json describes.")
            bid = match.groupdict().get("bid")
            gguf_name = rule.gguf.format(bid=bid)
            if bid is not None and int(bid) >= n_layer:
                raise GptkitError(f"{source} holds '{name}' but config.json has only "
                                  f"{n_layer} layers.")
            if len(shape) not in (1, 2):
                raise GptkitError(f"{source}: tensor '{name}' has {len(shape)} dimensions; "
                                  "expected a vector or a matrix.")
            if rule.transform is not None:
                new_shape = rule.transform.shape(shape, config)
                if new_shape is None:
                    raise GptkitError(f"{source}: tensor '{name}' has shape {list(shape)}, "
                                      f"which does not fit the {rule.transform.name} of "
                                      "config.json; expected the shapes config.json describes.")
                shape = new_shape
            found[gguf_name] = PlannedTensor(name, gguf_name, rule.transform,
                                             rule.keep_f32, tuple(shape))
            break
        else:
            raise GptkitError(f"{source} holds the tensor '{name}', which a {arch.model_type} "
                              "model does not have; expected only the architecture's weights.")
    order = []
    for rule, _ in rules:
        if rule.when is not None and not rule.when.present(config):
            continue
        bids = range(n_layer) if "{bid}" in rule.gguf else [None]
        for bid in bids:
            gguf_name = rule.gguf.format(bid=bid)
            if gguf_name not in found:
                raise GptkitError(f"{source} lacks the tensor '{arch.hf_prefix}"
                                  f"{rule.hf.format(bid=bid)}' that its config needs.")
            order.append(found[gguf_name])
    scaling = rope_scaling(arch, config, source)
    if scaling is not None and scaling["rope_type"] == "llama3":
        factors = rope_factors(config, scaling)
        order.append(PlannedTensor(None, ROPE_FREQS, None, True, factors.shape, factors))
    return order


def rope_scaling(arch: GGUFLayout, config: dict[str, Any], source: Path
                 ) -> dict[str, Any] | None:
    """The model's rope scaling or None (`gptkit.families.rope`), or one sentence why
    llama.cpp's graph for `arch` cannot apply it."""
    if not arch.rope:
        return None
    _, scaling = rope.from_hf(config, str(source))
    if scaling is not None and scaling["rope_type"] == "llama3" and not arch.rope_factors:
        raise GptkitError(f"{source} uses llama3 rope scaling, which llama.cpp's "
                          f"{arch.gguf_arch} graph cannot apply (it takes no per-frequency "
                          "rope factors); the model is not exported.")
    return scaling


def rope_factors(config: dict[str, Any], scaling: dict[str, Any]) -> np.ndarray:
    """llama3 rope scaling as llama.cpp applies it: a divisor of each of the head's hs/2
    frequencies (1 for the fast ones, `factor` for the slow ones, blended between)."""
    import numpy as np

    dim = config.get("head_dim") or head_dim(config)
    inv_freq = 1.0 / (float(rope_theta(config)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return (inv_freq / rope.scale_frequencies(inv_freq, scaling, np.where)).astype(np.float32)


def source_hash(model_dir: str | Path, progress: Callable[[int], Any] | None = None) -> str:
    """sha256 over the model's defining files (SOURCE_FILES present, by name): for each,
    its name, a NUL, its size in decimal, a NUL, then its bytes. `progress` is called with
    the number of bytes of each chunk read."""
    digest = hashlib.sha256()
    for path in _source_files(Path(model_dir)):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return digest.hexdigest()


def _source_files(model_dir: Path) -> list[Path]:
    return [model_dir / name for name in sorted(SOURCE_FILES) if (model_dir / name).is_file()]


def _source_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in _source_files(model_dir))


# -- writing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    path: Path
    dtype: str
    bytes: int
    tensors: int
    seconds: float


def export_gguf(model_dir: str | Path, out: str | Path, *, dtype: str = "f16",
                force: bool = False, progress: bool | None = None) -> ExportResult:
    """Write `model_dir` as one GGUF file at `out` (see the module docstring).

    `dtype` is the type of the weight matrices: f32, f16, bf16 or q8_0 (8-bit blocks of 32
    with one f16 scale; a matrix whose rows are not a multiple of 32 stays f16). Vectors
    (norms, biases) and position embeddings stay f32, as llama.cpp's own converter keeps
    them. An existing `out` is refused unless `force`; it is replaced only once the new
    file is complete. `progress`: a bar on stderr (bytes hashed, then written) when True,
    none when False, on a terminal only when None.
    """
    import gguf
    from safetensors import safe_open
    from tqdm import tqdm

    from gptkit import __version__

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise GptkitError(f"unknown GGUF dtype {dtype!r}; expected one of {', '.join(DTYPES)}.")
    model_dir, out = Path(model_dir), Path(out)
    if out.is_dir():
        raise GptkitError(f"{out} is a directory; expected the path of the .gguf file to write.")
    if out.exists() and not force:
        raise GptkitError(f"{out} already exists; pass --force to overwrite it.")
    config, arch = read_config(model_dir)
    weights = model_dir / WEIGHTS_NAME
    params = hparams(arch, config, model_dir / CONFIG_NAME)
    try:
        handle = safe_open(str(weights), framework=_framework(weights))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise GptkitError(f"{weights} is corrupted or truncated ({exc}).") from None
    with handle as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        plan = plan_tensors(arch, shapes, config, weights)
        n_vocab = next(t.shape[0] for t in plan if t.gguf_name == TOKEN_EMBD)
        tokenizer = read_tokenizer(model_dir, n_vocab, config)
        qtypes = [_tensor_qtype(t, dtype) for t in plan]
        sizes = [_nbytes(t.shape, q) for t, q in zip(plan, qtypes, strict=True)]

        # One bar from the first byte read: hashing a large source takes seconds too.
        with tqdm(total=_source_bytes(model_dir) + sum(sizes), unit="B", unit_scale=True,
                  desc=f"hashing {model_dir.resolve().name}", leave=False,
                  disable=None if progress is None else not progress) as bar:
            digest = source_hash(model_dir, bar.update)
            bar.set_description(f"writing {out.name}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            writer = gguf.GGUFWriter(None, arch.gguf_arch)
            try:
                _add_metadata(writer, arch, params, config, tokenizer, model_dir, dtype,
                              __version__, digest)
                for tensor, qtype, nbytes in zip(plan, qtypes, sizes, strict=True):
                    # the logical shape; a placeholder numpy dtype (the real one is qtype)
                    writer.add_tensor_info(tensor.gguf_name, tensor.shape, _np_float32(),
                                           nbytes, raw_dtype=qtype)
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for tensor, qtype in zip(plan, qtypes, strict=True):
                    source = tensor.data if tensor.hf_name is None else f.get_tensor(
                        tensor.hf_name)
                    data = _convert(source, tensor, qtype, config)
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
                assert writer.fout is not None
                writer.fout[0].flush()
                os.fsync(writer.fout[0].fileno())
                writer.close()
                os.replace(tmp, out)
            except OSError as exc:
                reason = _write_failure(exc, out.parent)  # while the partial file fills the disk
                _discard(writer, tmp)
                raise GptkitError(f"could not write {out}: {reason}; no partial file was "
                                  "left.") from None
            except BaseException:
                _discard(writer, tmp)
                raise
    _fsync_dir(out.parent)
    return ExportResult(out, dtype, out.stat().st_size, len(plan),
                        time.perf_counter() - start)


def _add_metadata(writer: Any, arch: GGUFLayout, params: dict[str, tuple[str, Any]],
                  config: dict[str, Any], tok: GGUFTokenizer, model_dir: Path, dtype: str,
                  version: str, digest: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(_file_type(dtype))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (kind, value) in params.items():
        if kind == "u32":
            writer.add_uint32(key, value)
        elif kind == "str":
            writer.add_string(key, value)
        else:
            writer.add_float32(key, float(value))
    writer.add_string("gptkit.version", version)
    writer.add_string("gptkit.source_sha256", digest)

    add_tokenizer(writer, tok)

def _qtypes() -> dict[str, Any]:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def _file_type(dtype: str) -> int:
    """general.file_type: what most of the file's weights are."""
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0}[dtype]


def _tensor_qtype(tensor: PlannedTensor, dtype: str) -> Any:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if tensor.keep_f32 or len(tensor.shape) == 1:
        return Q.F32
    qtype = _qtypes()[dtype]
    if qtype == Q.Q8_0 and tensor.shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # as llama.cpp's converter: rows must split into blocks of 32
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for dim in shape:
        n *= dim
    return n // block * size


def _np_float32() -> np.dtype:
    import numpy as np

    return np.dtype(np.float32)


def _framework(weights: Path) -> str:
    """numpy, which reads f32/f16 files without importing torch (seconds of a short command);
    torch only for what numpy has no type for (bf16)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception:  # reported by the caller's own open
        return "numpy"
    return "numpy" if dtypes <= {"F32", "F16", "F64"} else "pt"


def _convert(tensor: Any, planned: PlannedTensor, qtype: Any,
             config: dict[str, Any]) -> np.ndarray:
    """One tensor (numpy, or torch for bf16 sources) in GGUF layout and type, as the bytes
    to write. Rounding to f16 and bf16 is to nearest even, as torch and llama.cpp do."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if not isinstance(tensor, np.ndarray):  # a torch tensor
        tensor = tensor.float().numpy()
    if planned.transform is not None:
        tensor = planned.transform.to_gguf(tensor, config)
    if qtype == Q.F16:
        return np.ascontiguousarray(tensor, dtype=np.float16)
    array = np.ascontiguousarray(tensor, dtype=np.float32)
    return array if qtype == Q.F32 else quantize(array, qtype)


def _write_failure(exc: OSError, directory: Path) -> str:
    """What stopped a write, in words. numpy's tofile reports a full disk as a short write
    ("N requested and M written") without an errno, so then the space left decides."""
    detail = exc.strerror or str(exc)
    full = exc.errno == errno.ENOSPC
    if exc.errno is None:
        try:
            full = shutil.disk_usage(directory).free < FULL_DISK_BYTES
        except OSError:
            pass
    return f"the disk is full ({detail})" if full else f"the write failed ({detail})"


def _discard(writer: Any, tmp: Path) -> None:
    try:
        writer.close()
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

