"""`gptkit info DIR`: what a model, training run or data directory holds, without loading weights.

Everything comes from small files (config.json, the tokenizer, gptkit_task.json,
metrics.jsonl), so it is quick even for GPT-2 XL and safe to run on a directory that a
training run is writing: nothing here writes, or rolls a pending checkpoint forward.

    gptkit info runs/mine            # a summary for people
    gptkit info runs/mine --json     # the same as one JSON object for scripts
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptkit.config import GPTConfig
from gptkit.data import describe
from gptkit.errors import GptkitError
from gptkit.families import family
from gptkit.plot import split_metrics
from gptkit.runlog import METRICS_NAME, run_or_model_dir
from gptkit.shards import manifest_paths

CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")


def count_parameters(config: GPTConfig) -> int:
    """Parameters of the model `config` describes (a tied lm_head counted once).

    For GPT-2, per block: two LayerNorms (2 x 2C), attention (C x 3C + 3C and C x C + C)
    and the MLP (C x 4C + 4C and 4C x C + C), i.e. 12 C^2 + 13 C; `GPTConfig.num_params`
    counts every family.
    """
    return config.num_params()


def _read_config(directory: Path) -> GPTConfig | None:
    if not (directory / CONFIG_NAME).is_file():
        return None
    from gptkit.checkpoint import load_config  # reads config.json only; imports torch

    return load_config(directory)


def _tokenizer_info(directory: Path) -> dict[str, Any] | None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from gptkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(directory)
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}


def _task_info(directory: Path) -> dict[str, Any] | None:
    from gptkit.tasks import read_task_file

    spec = read_task_file(directory)
    return None if spec is None else {"task": spec.task, "template": spec.template}


def _checkpoint_progress(directory: Path) -> dict[str, int] | None:
    """Step and tokens of a run's checkpoint. The logged records can trail it: a run that
    its time limit stopped between two log lines saved more steps than they show."""
    from gptkit.checkpoint import TRAIN_STATE_NAME

    path = directory / TRAIN_STATE_NAME
    if not path.is_file():
        return None
    import torch

    try:  # mapped, not read: only the two numbers are looked at
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {"step": int(state["step"]), "tokens": int(state["tokens"])}
    except Exception:  # a damaged state (resuming says so); the records are all there is
        return None


def _training_info(directory: Path) -> dict[str, Any] | None:
    progress = _checkpoint_progress(directory)
    if progress is None and not (directory / METRICS_NAME).is_file():
        return None
    train, evals = split_metrics(directory)
    if progress is None:  # no checkpoint yet: as far as the records go
        last = max(train + evals, key=lambda r: (r.get("step", 0), r["tokens"]), default={})
        progress = {"step": last.get("step", 0), "tokens": last.get("tokens", 0)}
    return {
        "steps": progress["step"],
        "tokens": progress["tokens"],
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "last_train_loss": train[-1]["loss"] if train else None,
    }


def _benchmark_info(directory: Path) -> dict[str, Any] | None:
    """The headline of `gptkit eval --benchmark`'s results: acc_norm where a task has it."""
    import json

    from gptkit.benchsets import RESULTS_NAME

    path = directory / RESULTS_NAME
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    scores = {}
    for task in results.get("tasks", []):
        metric = "acc_norm" if "acc_norm" in task["metrics"] else "acc"
        scores[task["task"]] = {"metric": metric, "value": task["metrics"][metric]["value"],
                                "n": task["n"]}
    return {"tasks": scores, "core": results.get("core")}


def directory_info(directory: str | Path) -> dict[str, Any]:
    """Facts about a model or run directory, as `gptkit info --json` prints them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GptkitError(f"{directory} is not a directory; expected a model or run directory.")
    if (directory / "meta.json").is_file() or manifest_paths(directory):
        return describe(directory)  # a prepared data directory
    directory = run_or_model_dir(directory)
    config = _read_config(directory)
    training = _training_info(directory)
    if config is None and training is None:
        raise GptkitError(f"{directory} is not a model or run directory: it has neither "
                          f"{CONFIG_NAME} nor {METRICS_NAME}.")
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {
        "path": str(directory),
        "kind": "run" if training is not None else "model",
        "config": None if config is None else config.to_dict(),
        "parameters": None if config is None else count_parameters(config),
        "context_length": None if config is None else config.block_size,
        "tokenizer": _tokenizer_info(directory),
        "task": _task_info(directory),
        "training": training,
        "benchmarks": _benchmark_info(directory),
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in files],
    }


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def _format_data(info: dict[str, Any]) -> str:
    shards = info["shards"]
    layout = ("train.bin, val.bin" if shards is None
              else f"{shards['train']} train and {shards['val']} val shards")
    lines = [f"{info['path']} (prepared data, {layout}, {_size(info['bytes'])})",
             f"tokens:         {info['train_tokens']:,} train, {info['val_tokens']:,} val "
             f"({info['dtype']})",
             f"documents:      {info['documents']:,}"
             + (f" ({info['duplicates']:,} duplicates dropped)" if info["duplicates"] else ""),
             f"tokenizer:      {info['vocab_size']:,} tokens, hash {info['tokenizer_hash'][:12]}",
             f"sources:        {len(info['sources'])} files"]
    lines += [f"  {source}" for source in info["sources"][:10]]
    if len(info["sources"]) > 10:
        lines.append(f"  ... and {len(info['sources']) - 10} more")
    return "\n".join(lines)


def format_info(info: dict[str, Any]) -> str:
    """The human-readable summary of `directory_info`."""
    if info["kind"] == "data":
        return _format_data(info)
    lines = [f"{info['path']} ({'training run' if info['kind'] == 'run' else 'model'})"]
    config = info["config"]
    if config is None:
        lines.append("architecture:   no model saved yet (no config.json)")
    else:
        lines += [
            f"architecture:   {family(config['arch']).display_name}, "
            f"{config['n_layer']} layers, {config['n_head']} heads"
            + (f" ({config['n_kv_head']} key/value)" if config["n_kv_head"] != config["n_head"] else "")
            + f", width {config['n_embd']}, vocabulary {config['vocab_size']:,}",
            f"parameters:     {info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)",
            f"context length: {info['context_length']:,} tokens",
        ]
    tokenizer = info["tokenizer"]
    lines.append("tokenizer:      " + ("none" if tokenizer is None else
                                       f"{tokenizer['kind']}, {tokenizer['vocab_size']:,} tokens"))
    if info["task"] is not None:
        template = info["task"]["template"].replace("\n", "\\n")
        lines.append(f"task:           {info['task']['task']} (template: {template})")
    training = info["training"]
    if training is not None:
        val = training["last_val_loss"]
        lines.append(f"trained:        {training['steps']:,} steps, {training['tokens']:,} tokens"
                     + (f", last val loss {val:.4f}" if val is not None else ""))
    benchmarks = info["benchmarks"]
    if benchmarks is not None:
        lines.append("benchmarks:     " + ", ".join(
            f"{name} {s['metric']} {s['value']:.4f} (n {s['n']})"
            for name, s in benchmarks["tasks"].items()))
        core = benchmarks["core"]
        if core:
            lines.append(f"                CORE ({core['tasks']} of {core['of']} tasks) "
                         f"{core['value']:.4f}")
    lines.append("files:")
    width = max((len(f["name"]) for f in info["files"]), default=0)
    lines += [f"  {f['name']:<{width}}  {_size(f['bytes']):>9}" for f in info["files"]]
    return "\n".join(lines)
