"""Decode steps compiled ahead of time: built once per model shape and machine, then
loaded from disk in a fraction of a second.

A decode step of a small model is a few hundred small operations; run eagerly, their
dispatch costs more than the arithmetic (docs/performance.md). Inductor compiles the
whole step into a few vectorized loops, but `torch.compile` traces and compiles again
in every new process. Here the step is exported once (`torch.export`), compiled by
AOTInductor into a shared library and kept in a cache directory keyed by everything the
program depends on: the model's shapes and layouts, this CPU's vector extensions and the
torch and gptkit sources. The library holds code only: the model's
own tensors are inputs of every call, so every model of one shape shares one program.

The KV cache is an input of the program, written in place. Its rows may be longer than
the slots in use (a serving engine's pool): the program attends to the slots up to the
new token's position, a size it reads from the position itself at run time. One program
serves every prompt, generation length and cache size.

    step = load_or_compile(model)  # None if compiling is impossible here (warned)
    logits = step(tokens, input_pos, position_ids, attn_mask)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import gptkit
from gptkit.checkpoint import atomic_write_text
from gptkit.model import GPT, KVCache, decode_logits

CACHE_ENV = "GPTKIT_CACHE_DIR"
# the sources the decode step is traced from: a change to any of them compiles afresh
GRAPH_SOURCES = ("model.py", "config.py", "inference.py", "kernels/*.py", "families/*.py")
# CPU inductor inlines cheap elementwise producers (a norm, an activation) into their
# consumers, which for a row-wise product means recomputing them once per weight row;
# realizing anything over 8 ops keeps the weight loops lean. The size asserts repeat
# what the step checks before calling the program.
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 8, "size_asserts": False}


def cache_dir() -> Path:
    """Where compiled steps live: $GPTKIT_CACHE_DIR, else ~/.cache/gptkit (XDG_CACHE_HOME)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptkit"


class DecodeProgram(nn.Module):
    """The model's decode step as a function of explicit tensors: its weights and KV cache
    are inputs, so the compiled program holds code only and runs on any model of the
    same shapes (the model is kept out of this module's state for that)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.models = [model]  # a list: not a submodule, its tensors are not constants

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                weights: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.models[0]
        saved = model.kv_caches
        # attend to the slots up to this token's: the first `slots` of each cache row (a
        # row may be longer, as a serving engine's pool rows are)
        slots = input_pos.reshape(-1)[0].item() + 1
        torch._check(slots <= keys[0].size(2))
        torch._check(slots <= attn_mask.size(-1))
        model.kv_caches = [KVCache(k.narrow(2, 0, slots), v.narrow(2, 0, slots))
                           for k, v in zip(keys, values, strict=True)]
        attn_mask = attn_mask.narrow(-1, 0, slots)
        try:
            return torch.func.functional_call(
                model, weights, (tokens,), dict(position_ids=position_ids, input_pos=input_pos,
                                                attn_mask=attn_mask))[:, 0]
        finally:
            model.kv_caches = saved


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by name, the program's `weights` input."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class CompiledStep:
    """A loaded program for decode steps of one row: `step(tokens, input_pos, position_ids,
    attn_mask)` -> logits (1, V), reading and writing the model's current KV cache.

    Calls the program cannot take (several rows) run the model eagerly, as does every
    call after the program once fails (with a warning), so a compiled step never breaks
    generation.
    """

    def __init__(self, model: GPT, runner: object) -> None:
        self.model = model
        self.runner: object | None = runner
        self.weights = list(model_tensors(model).values())

    def eager(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
              attn_mask: torch.Tensor) -> torch.Tensor:
        return decode_logits(self.model, tokens, input_pos, position_ids, attn_mask)

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                 attn_mask: torch.Tensor) -> torch.Tensor:
        caches = self.model.kv_caches
        rows = _cache_rows(caches) if tokens.shape == (1, 1) else None
        if self.runner is None or rows is None or attn_mask.dtype != torch.bool:
            return self.eager(tokens, input_pos, position_ids, attn_mask)
        try:
            return self.runner.boxed_run([
                tokens, input_pos.reshape(1), position_ids.reshape(1, 1),
                attn_mask.reshape(1, 1, 1, -1), *rows, *self.weights])[0]
        except Exception as exc:  # a broken library: keep generating, eagerly
            warnings.warn(f"the compiled decode step failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); decoding without it.", stacklevel=2)
            self.runner = None
            return self.eager(tokens, input_pos, position_ids, attn_mask)


def _cache_rows(caches: list[KVCache | None]) -> list[torch.Tensor] | None:
    """Every layer's keys, then values, as whole contiguous rows (1, nkv, capacity, hs): a
    cache of one row, or the first slots of one (a serving engine's view of its pool),
    seen whole; None where the program cannot take them."""
    if any(cache is None for cache in caches):
        return None
    whole = []
    for tensor in [cache.k for cache in caches] + [cache.v for cache in caches]:
        batch, heads, slots, head_dim = tensor.shape
        capacity, rest = divmod(tensor.stride(1), head_dim)
        if (batch != 1 or rest or capacity < slots or tensor.stride(2) != head_dim
                or tensor.stride(3) != 1):
            return None
        whole.append(tensor.as_strided((1, heads, capacity, head_dim),
                                       (heads * capacity * head_dim, capacity * head_dim,
                                        head_dim, 1)))
    return whole


@functools.cache
def source_digest() -> str:
    """A digest of the gptkit sources that decode steps and inference layouts come from."""
    source = hashlib.sha256()
    package = Path(gptkit.__file__).parent
    for path in sorted(path for pattern in GRAPH_SOURCES for path in package.glob(pattern)):
        source.update(path.read_bytes())
    return source.hexdigest()


def program_key(model: GPT) -> str:
    """A digest of everything the compiled program depends on."""
    tensors = [(name, tuple(t.shape), str(t.dtype)) for name, t in model_tensors(model).items()]
    facts = {"config": model.config.to_dict(), "tensors": tensors,
             "modules": sorted({type(m).__name__ for m in model.modules()}),
             "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
             "gptkit": source_digest(), "options": INDUCTOR_OPTIONS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_or_compile(model: GPT) -> CompiledStep | None:
    """The compiled decode step for `model` (CPU, in its inference layout), from the cache
    or compiled into it now (once per shape and machine, with a progress line). None, with
    a warning, where compiling fails here (no C++ compiler, an unsupported operation); a
    failure is remembered, so later runs do not try again."""
    directory = cache_dir() / "decode"
    key = program_key(model)
    package, failed = directory / f"{key}.pt2", directory / f"{key}.failed"
    if failed.exists():
        _warn(failed.read_text().strip())
        return None
    if not package.exists():
        try:
            _compile(model, package)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(failed, reason + "\n")
            _warn(reason)
            return None
    try:
        runner = _open(package, model)
    except Exception as exc:  # a damaged or foreign file: compile afresh next time
        package.unlink(missing_ok=True)
        _warn(f"{type(exc).__name__}: {str(exc)[:200]}")
        return None
    return CompiledStep(model, runner)


def _open(package: Path, model: GPT) -> object:
    """The program in `package`: an object whose `boxed_run(inputs)` takes the flat inputs
    and returns the flat outputs."""
    # torch's C++ loader: its Python wrapper would first probe the C++ compiler (a second
    # of subprocesses) and re-read the call's layout on every call
    return torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)


def _compile(model: GPT, package: Path) -> None:
    """Export the decode step and compile it into `package`, written atomically (an
    interrupted compile leaves nothing behind)."""
    package.parent.mkdir(parents=True, exist_ok=True)
    from torch import _inductor  # a second of imports that only compiling needs

    with _Progress(f"Compiling the decode step for this model's shape and CPU, once "
                   f"(cached in {package.parent})"), torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation notices (about its internals) would break the progress line
        warnings.simplefilter("ignore", FutureWarning)
        program = export(model)
        with tempfile.TemporaryDirectory(dir=package.parent) as work:
            built = _inductor.aoti_compile_and_package(
                program, package_path=str(Path(work) / package.name),
                inductor_configs=INDUCTOR_OPTIONS)
            os.replace(built, package)


def export(model: GPT) -> torch.export.ExportedProgram:
    """The one-row decode step of `model` as a graph, with a dynamic number of cache slots."""
    config = model.config
    capacity = torch.export.Dim("capacity", min=2, max=config.block_size)
    slots = torch.export.Dim("slots", min=2, max=config.block_size)
    example = min(config.block_size - 1, 17)  # any sizes: the loops do not depend on them
    dtype = model.transformer.wte.weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    keys, values = ([torch.zeros(1, config.n_kv_head, example + 1, config.head_dim, dtype=dtype)
                     for _ in range(config.n_layer)] for _ in range(2))
    weights = model_tensors(model)
    args = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([example - 1]),
            torch.tensor([[example - 1]]), torch.ones(1, 1, 1, example, dtype=torch.bool),
            keys, values, weights)
    shapes = {"tokens": None, "input_pos": None, "position_ids": None,
              "attn_mask": {3: slots}, "keys": [{2: capacity}] * config.n_layer,
              "values": [{2: capacity}] * config.n_layer, "weights": {name: None for name in weights}}
    with torch.no_grad():
        return torch.export.export(DecodeProgram(model), args, dynamic_shapes=shapes)


class _Progress:
    """One line on stderr that counts the seconds of a long step, ending with its time."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.done = threading.Event()

    def _tick(self) -> None:
        start = time.monotonic()
        while not self.done.wait(1.0):
            print(f"\r{self.message}: {time.monotonic() - start:.0f} s", end="",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> _Progress:
        self.start = time.monotonic()
        print(f"{self.message}...", end="", file=sys.stderr, flush=True)
        self.thread = threading.Thread(target=self._tick, daemon=True)
        if sys.stderr.isatty():  # a log file gets the first and the last line only
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        print(f"\r{self.message}: {time.monotonic() - self.start:.0f} s, done."
              if exc[0] is None else "", file=sys.stderr, flush=True)


def _warn(reason: str) -> None:
    warnings.warn(f"could not compile the decode step ({reason}); decoding without it.",
                  stacklevel=3)
