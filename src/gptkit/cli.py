"""The `gptkit` command: argument parsing only, one subcommand per module.

Every subcommand imports its module (and torch) lazily so that `gptkit --help` is
instant. A `GptkitError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any, get_args

from gptkit.errors import GptkitError


def cmd_demo(args: argparse.Namespace) -> None:
    """Offline demo: tokenizer, data, pretraining and samples on Python's own docs."""
    from gptkit.demo import run_demo

    run_demo(out=args.out, minutes=args.minutes, device=args.device)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a byte-level BPE or character-level tokenizer on text files."""
    from gptkit.data import corpus_texts
    from gptkit.tokenizer import Tokenizer

    texts = corpus_texts(args.files, field=args.field)
    tokenizer = Tokenizer.train(texts=texts, vocab_size=args.vocab_size, kind=args.kind)
    tokenizer.save_pretrained(args.out)
    print(f"saved a {tokenizer.kind} tokenizer with {tokenizer.vocab_size} tokens to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    """Tokenize a corpus into train.bin / val.bin / meta.json, or into shards."""
    if args.shard_tokens is not None:
        from gptkit.corpus import prepare_shards

        meta = prepare_shards(args.inputs, args.tokenizer, args.out,
                              shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                              field=args.field, workers=args.workers, resume=args.resume,
                              dedup=args.dedup, shard_index=args.shard_index,
                              num_shards=args.num_shards)
        shard_count = sum(len(v) for v in meta["shards"].values())
        print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
              f"({meta['dtype']}) in {shard_count} shards to {args.out}")
        return
    sharded_only = [flag for flag, on in (("--resume", args.resume), ("--dedup", args.dedup),
                    ("--shard-index", args.shard_index is not None),
                    ("--num-shards", args.num_shards is not None)) if on]
    if sharded_only:
        raise GptkitError(f"{sharded_only[0]} applies to sharded output; add --shard-tokens N.")
    from gptkit.data import prepare

    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction,
                   field=args.field, workers=args.workers)
    print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}) to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Pretrain a GPT on a prepared data directory (resumable, checkpointed)."""
    from gptkit.config import TrainConfig
    from gptkit.train import train

    if hasattr(args, "data"):  # --data given several times: a mixture (gptkit.mixture)
        args.data = ",".join(args.data)
    cfg = train_config_from_args(args, TrainConfig)
    result = train(cfg)
    summary = f"trained {result.step} steps ({result.tokens:,} tokens) in {result.seconds:.0f}s"
    if result.val_loss is not None:
        summary += f"; val loss {result.val_loss:.4f}"
    print(summary + f"; model in {cfg.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate text from a prompt, streaming it to the terminal."""
    from gptkit.checkpoint import resolve_model_dir
    from gptkit.explain import check_show_probs_settings, show_probs
    from gptkit.generate import print_generations
    from gptkit.inference import load_directory
    from gptkit.tasks import read_task_inputs, run_task

    sampling = sampling_from(args)  # every option is checked before anything is printed
    if args.show_probs:
        check_show_probs_settings(vars(args))
    if args.prompt is None and not (args.task or args.input):
        raise GptkitError("gptkit generate needs a prompt: pass it as an argument.")
    directory = resolve_model_dir(args.model)
    if args.show_probs:
        model, tokenizer = load_directory(directory, args.device)
        show_probs(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, top=args.top,
                   do_sample=not args.greedy, temperature=args.temperature, seed=args.seed)
    elif args.task or args.input:
        spec, examples = read_task_inputs(directory, args.task, args.prompt, args.input,
                                          num_beams=args.num_beams, draft_model=args.draft_model,
                                          num_return_sequences=args.num_return_sequences)
        model, tokenizer = load_directory(directory, **speed_from(args))
        print(*run_task(model, tokenizer, spec, examples, max_new_tokens=args.max_new_tokens,
                        stop=args.stop, **sampling), sep="\n")
    else:
        model, tokenizer = load_directory(directory, **speed_from(args))
        draft = (load_directory(resolve_model_dir(args.draft_model), **speed_from(args))[0]
                 if args.draft_model else None)
        print_generations(model, tokenizer, args.prompt, sampling=sampling,
                          num_return_sequences=args.num_return_sequences,
                          num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                          stop=args.stop, draft_model=draft)


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s sampling arguments for --greedy, --temperature, ... (checked)."""
    from gptkit.generate import sampling_settings

    return sampling_settings(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             seed=args.seed)


def speed_from(args: argparse.Namespace) -> dict[str, Any]:
    """`inference.load_directory`'s arguments for --device and the speed flags."""
    return dict(device=args.device, dtype=args.dtype, fast=True, quantize=args.quantize,
                compile=args.compile)


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a model for a task on a JSONL file, fully or with LoRA."""
    from gptkit.config import FinetuneOptions, TrainConfig
    from gptkit.finetune import choose_epochs, finetune

    options = FinetuneOptions(
        task=args.task, val=args.val, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        epochs=choose_epochs(args.epochs, getattr(args, "max_steps", None)),
        save_adapter=args.save_adapter, prompt_field=args.prompt_field,
        target_field=args.target_field, pack=args.pack)
    cfg = train_config_from_args(args, TrainConfig)
    cfg.init_from, cfg.finetune = args.model, options
    result = finetune(cfg)
    print(f"fine-tuned {result.step} steps in {result.seconds:.0f}s"
          + (f"; val loss {result.val_loss:.4f}" if result.val_loss is not None else "")
          + f"; model in {cfg.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Loss and perplexity of a model on a data directory or a text file, task metrics, or
    standard benchmarks (--benchmark)."""
    from gptkit.evaluate import evaluate_lm, evaluate_task

    if args.benchmark:
        cmd_benchmark(args)
        return
    if not args.data:
        raise GptkitError("gptkit eval needs --data (a data directory or text file) or "
                          "--benchmark NAME.")
    if args.task:
        print(json.dumps(evaluate_task(
            args.model, args.task, args.data, limit=args.limit, out=args.out,
            batch_size=args.batch_size or 8, max_new_tokens=args.max_new_tokens, device=args.device,
            prompt_field=args.prompt_field, target_field=args.target_field)))
        return
    result = evaluate_lm(args.model, args.data, batch_size=args.batch_size or 8,
                         max_batches=args.max_batches, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")


def cmd_benchmark(args: argparse.Namespace) -> None:
    """`gptkit eval --benchmark`: standard sets scored as lm-evaluation-harness does."""
    from gptkit.benchmark import evaluate_benchmarks, format_table

    results = evaluate_benchmarks(
        args.model, [n.strip() for n in args.benchmark.split(",") if n.strip()],
        limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, out=args.out)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_table(results))
        print(f"results in {results['saved_to']}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Talk with a model in the terminal: streamed answers, history, /reset, /system, /save."""
    from gptkit.chat import ChatSession, chat_in_terminal
    from gptkit.checkpoint import resolve_model_dir
    from gptkit.inference import load_directory

    sampling = sampling_from(args)
    model, tokenizer = load_directory(resolve_model_dir(args.model), **speed_from(args))
    session = ChatSession(model, tokenizer, system=args.system,
                          max_new_tokens=args.max_new_tokens, sampling=sampling)
    chat_in_terminal(session, args.model, verbose=args.verbose)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web playground at /."""
    from gptkit.serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          max_batch_size=args.max_batch_size, max_queue=args.max_queue, device=args.device,
          dtype=args.dtype, quantize=args.quantize, compile=args.compile,
          cors_origins=args.cors_origin)

def cmd_plot(args: argparse.Namespace) -> None:
    """Plot loss, learning rate and tokens/s of one or more training runs into a PNG."""
    from pathlib import Path

    from gptkit.plot import plot_runs

    print(f"wrote {plot_runs([Path(d) for d in args.runs], Path(args.out), log_x=args.log_x)}")


def cmd_info(args: argparse.Namespace) -> None:
    """Describe a model or run directory: architecture, size, tokenizer, training, files."""
    from gptkit.info import directory_info, format_info

    info = directory_info(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_attention(args: argparse.Namespace) -> None:
    """Draw one attention head's weights over a text as a heat map PNG."""
    from gptkit.explain import attention_map
    from gptkit.inference import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.device)
    out = attention_map(model, tokenizer, args.text, args.out, layer=args.layer, head=args.head)
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    """Export a model directory to one GGUF file for llama.cpp, Ollama and LM Studio."""
    from gptkit.export import export_model

    result = export_model(args.model, args.out, format=args.format, dtype=args.dtype,
                          force=args.force)
    print(f"wrote {result.path} ({result.dtype}, {result.bytes / 1e6:.1f} MB, "
          f"{result.tensors} tensors) in {result.seconds:.1f}s")


def cmd_import(args: argparse.Namespace) -> None:
    """Turn a GGUF file (llama.cpp's, quantized too, or gptkit's) into a model directory."""
    from gptkit.export.gguf_import import import_gguf

    directory = import_gguf(args.file, args.out, force=args.force, dtype=args.dtype)
    print(f"wrote {directory}: a model directory that gptkit and transformers open")


# -- flags from dataclass fields ----------------------------------------------------------

def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str],
                        skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field, with its help line and one note of its default (none for
    an unset one, or where the help line speaks of it); defaults are suppressed so a
    config file can fill them."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f.type)
        default = f.default if f.default is not MISSING else None
        text = helps[f.name]
        if default not in (None, "", False) and "default" not in text:
            text += f" (default: {default})"
        if kind is bool:  # a field that defaults to None has a --no- form too
            action = argparse.BooleanOptionalAction if f.default is None else "store_true"
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=text)


def _field_type(annotation: Any) -> Callable[[str], Any]:
    text = str(annotation)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args else str


def train_config_from_args(args: argparse.Namespace, cls: type) -> Any:
    """Flags the user gave override the TOML file given with --config."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if getattr(args, "config", None):
        return cls.from_file(args.config, **given)
    return cls(**given)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from gptkit import __version__

    parser = argparse.ArgumentParser(
        prog="gptkit", description="Build, pretrain, fine-tune, generate with and serve your own GPT.")
    parser.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], None],
                subparsers: Any = sub) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").strip()
        p = subparsers.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=func)
        return p

    p = command("demo", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget (default: 4)")
    add_device_flag(p)

    tok = sub.add_parser("tokenizer", help="Train tokenizers.", description="Train tokenizers.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = command("train", cmd_tokenizer_train, tok_sub)
    p.add_argument("files", nargs="+", help="text files or directories")
    p.add_argument("--vocab-size", type=positive_int, default=8192,
                   help="tokens in the vocabulary, the 256 bytes included for bpe (default: 8192)")
    p.add_argument("--kind", choices=["bpe", "char"], default="bpe",
                   help="bpe: byte-level BPE, as GPT-2; char: one token per character "
                        "(default: bpe)")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")

    p = command("prepare", cmd_prepare)
    p.add_argument("inputs", nargs="+", help=".txt/.md, .jsonl (.gz/.zst/.xz), .parquet or "
                   ".arrow files, directories (a datasets save_to_disk folder too) or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the tokens held out for validation (default: 0.1)")
    p.add_argument("--field", default="text",
                   help="text field of .jsonl records or column of tables (default: text)")
    p.add_argument("--workers", type=int, help="encoding workers (default: all cores)")
    p.add_argument("--shard-tokens", type=int,
                   help="write shards of this many tokens with a manifest (see docs/pretrain.md)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sharded prepare")
    p.add_argument("--dedup", action="store_true",
                   help="drop exact duplicate documents (by hash of the normalised text)")
    p.add_argument("--shard-index", type=int,
                   help="this machine's part of the inputs (default: torchrun's RANK)")
    p.add_argument("--num-shards", type=int,
                   help="number of machines splitting the inputs (default: WORLD_SIZE)")

    from gptkit.config import TRAIN_HELP, TrainConfig

    p = command("train", cmd_train)
    p.add_argument("--config", help="TOML file of training settings (flags override it)")
    add_dataclass_flags(p, TrainConfig, TRAIN_HELP, skip=("finetune", "data"))
    p.add_argument("--data", action="append", default=argparse.SUPPRESS, metavar="DATA",
                   help=TRAIN_HELP["data"])

    p = command("finetune", cmd_finetune)
    p.add_argument("--config", help="TOML file of training settings (flags override it)")
    p.add_argument("--model", required=True, help="model directory to start from")
    p.add_argument("--task", required=True,
                   help="translate, summarize, qa, instruct, completion, or chat (conversations)")
    p.add_argument("--data", required=True, help="training JSONL file")
    p.add_argument("--val", help="validation JSONL file (loss at each --eval-interval)")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (default: all weights)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the LoRA adapters' input in training (default: 0)")
    p.add_argument("--save-adapter", action="store_true",
                   help="also write the LoRA adapters in peft format to OUT/adapter")
    p.add_argument("--epochs", type=float,
                   help="passes over the data (default: 3 unless --max-steps is given)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="several short examples per row, each attending only to itself "
                        "(default: for chat data whose conversations average under half the "
                        "context)")
    add_task_field_flags(p)
    # the model's shape comes from --model; fine-tuning runs in one process (no FSDP)
    finetune_help = {**TRAIN_HELP, "max_steps": "optimizer steps to train for, instead of "
                                                "--epochs (default: --epochs decides)"}
    add_dataclass_flags(p, TrainConfig, finetune_help, skip=(
        "data", "init_from", "preset", "n_layer", "n_head", "n_embd", "fsdp", "finetune"))

    p = command("generate", cmd_generate)
    add_generate_flags(p)
    p.add_argument("--task", help="format the prompt with this task's template (stored with the model)")
    p.add_argument("--input", help="task input: a JSONL file of records, a text file, or text")
    p.add_argument("--show-probs", action="store_true",
                   help="print each step's most likely next tokens with their probabilities")
    p.add_argument("--top", type=positive_int, default=5,
                   help="candidates shown per step with --show-probs (default: 5)")

    p = command("eval", cmd_eval)
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--data", help="a data directory (val split) or a text file")
    p.add_argument("--benchmark", help="standard sets, comma-separated: arc_easy, arc_challenge, "
                                       "boolq, copa, hellaswag, lambada_openai, openbook_qa, piqa, "
                                       "winogrande, core (nanochat's CORE), or a JSONL file")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="--benchmark: solved examples before each item (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences (or task examples, or benchmark items) per batch (default: "
                        "8; --benchmark: as many items as fill 2,048 tokens)")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="score only this many batches (default: all)")
    add_device_flag(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="--benchmark: weights and activations (bfloat16: about 1.6x faster on "
                        "CPUs with native bf16; scores move by rounding; default: float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--task", help="score generations for this task on a JSONL --data file "
                                  "(chat: conversations, scored on their last answer)")
    p.add_argument("--limit", type=positive_int, help="score only the first N records")
    p.add_argument("--out", help="write predictions to this JSONL file (--benchmark: the "
                                 "results JSON; default: eval_results.json beside the model)")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="tokens to generate per example (default: from the longest reference)")
    add_task_field_flags(p)

    p = command("chat", cmd_chat)
    add_chat_flags(p)

    p = command("serve", cmd_serve)
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("GPTKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GPTKIT_API_KEY)")
    p.add_argument("--max-batch-size", type=positive_int, default=8,
                   help="requests decoded together in one batch (default: 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the batch before answering 429 (default: 64)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let pages from ORIGIN (e.g. http://localhost:3000; * for any) call the "
                        "API from a browser (repeatable; default: none)")
    add_device_flag(p)
    add_speed_flags(p)

    p = command("plot", cmd_plot)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", default="loss.png", help="PNG file to write (default: loss.png)")
    p.add_argument("--log-x", action="store_true", help="logarithmic tokens axis")

    p = command("info", cmd_info)
    p.add_argument("directory", metavar="DIR", help="model or training run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("attention", cmd_attention)
    p.add_argument("text", help="the text whose attention to draw")
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--layer", type=int, default=0, help="layer, from 0 (default: 0)")
    p.add_argument("--head", type=int, default=0, help="head, from 0 (default: 0)")
    p.add_argument("--out", default="attention.png", help="PNG file (default: attention.png)")
    add_device_flag(p)

    # --format and --dtype are checked by gptkit.export, so a wrong one is one sentence
    p = command("export", cmd_export)
    p.add_argument("--model", required=True, help="model directory to export")
    p.add_argument("--format", default="gguf", help="output format: gguf (default: gguf)")
    p.add_argument("--out", required=True, help="file to write, e.g. model.gguf")
    p.add_argument("--dtype", default="f16",
                   help="weight matrices: f32, f16, bf16 or q8_0 (default: f16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")

    p = command("import", cmd_import)
    p.add_argument("file", help="GGUF file written by llama.cpp's converter or gptkit export "
                                "(any type the gguf package dequantizes: f32, f16, bf16, Q4_0 to "
                                "Q8_0, the K-quants)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights of the directory (default: float32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    return parser


def add_task_field_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-field", help="JSONL name of the task's main input field")
    p.add_argument("--target-field", help="JSONL name of the task's target field")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto, the fastest there is)")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize and --compile: the fast decoding layouts (docs/performance.md)."""
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="activations and unquantized weights (bfloat16: faster on bf16 CPUs/GPUs)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="int8: weights with per-channel scales (a quarter of fp32's bytes); "
                        "int4: 4-bit weights in groups of 32 with a step and offset each, as "
                        "llama.cpp's Q4_1 (CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on CPU, where it is compiled once "
                        "per model shape and machine, about a minute, and cached in "
                        "~/.cache/gptkit; off on GPUs, where --compile uses CUDA graphs). "
                        "Falls back with a warning if compiling fails")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How the next token is chosen, for `generate` and `chat`."""
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divide the logits by this before sampling: lower is more predictable "
                        "(0: greedy; default: 0.8)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens that make up this much probability "
                        "(nucleus sampling; default: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="make tokens already in the text less likely: above 1 penalizes "
                        "(default: 1.0, none)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed, for repeatable samples (default: a fresh one)")


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--system", help="system message of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer in tokens (default: 256, at most half the context)")
    p.add_argument("--verbose", action="store_true",
                   help="after each answer, its speed: prompt and generation tokens/s")
    add_sampling_flags(p)
    add_device_flag(p)
    add_speed_flags(p)


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --input)")
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to generate at most (default: 100)")
    add_sampling_flags(p)
    p.add_argument("--num-return-sequences", type=int, default=1,
                   help="continuations of the prompt to print, one after another (default: 1)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_device_flag(p)
    add_speed_flags(p)
    p.add_argument("--draft-model", help="smaller model directory for speculative decoding")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search with this many beams (greedy; prints whole sequences)")


TRAINING_COMMANDS = ("train", "finetune", "demo")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in TRAINING_COMMANDS:
        from gptkit.runtime import tune_allocator

        tune_allocator()  # a process-wide choice, so made here rather than in the library
    try:
        args.func(args)
    except GptkitError as exc:
        print(f"gptkit {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)

