"""The `gptkit` command: argument parsing only, one subcommand per module.

Every subcommand imports its module (and torch) lazily so that `gptkit --help` is
instant. A `GptkitError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
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
    """Tokenize a corpus into train.bin / val.bin / meta.json."""
    from gptkit.data import prepare

    meta = prepare(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction,
                   field=args.field)
    print(f"wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}) to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Pretrain a GPT on a prepared data directory (resumable, checkpointed)."""
    from gptkit.config import TrainConfig
    from gptkit.train import train

    cfg = train_config_from_args(args, TrainConfig)
    result = train(cfg)
    summary = f"trained {result.step} steps ({result.tokens:,} tokens) in {result.seconds:.0f}s"
    if result.val_loss is not None:
        summary += f"; val loss {result.val_loss:.4f}"
    print(summary + f"; model in {cfg.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate text from a prompt, streaming it to the terminal."""
    from gptkit.generate import stream_generate
    from gptkit.inference import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.device)
    if args.prompt is None:
        raise GptkitError("gptkit generate needs a prompt: pass it as an argument.")
    for index in range(args.num_return_sequences):
        if index:
            print("\n" + "-" * 40)
        seed = None if args.seed is None else args.seed + index
        pieces = stream_generate(
            model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
            seed=seed)
        print(args.prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()


def cmd_eval(args: argparse.Namespace) -> None:
    """Loss and perplexity of a model on a data directory or a text file."""
    from gptkit.evaluate import evaluate_lm

    result = evaluate_lm(args.model, args.data, batch_size=args.batch_size,
                         max_batches=args.max_batches, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"({result['tokens']:,} tokens)")


# -- flags from dataclass fields ----------------------------------------------------------

def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field; defaults are suppressed so a config file can fill them."""
    for f in fields(cls):
        if f.name in skip or f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f.type)
        default = f.default if f.default is not MISSING else None
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                                help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"(default: {default})")


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
    p.add_argument("--device", default="auto")

    tok = sub.add_parser("tokenizer", help="Train tokenizers.", description="Train tokenizers.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = command("train", cmd_tokenizer_train, tok_sub)
    p.add_argument("files", nargs="+", help="text files or directories")
    p.add_argument("--vocab-size", type=positive_int, default=8192)
    p.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")

    p = command("prepare", cmd_prepare)
    p.add_argument("inputs", nargs="+", help=".txt/.md/.jsonl files or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer or model directory")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--field", default="text", help="text field of .jsonl records (default: text)")

    from gptkit.config import TrainConfig

    p = command("train", cmd_train)
    p.add_argument("--config", help="TOML file of training settings (flags override it)")
    add_dataclass_flags(p, TrainConfig)

    p = command("generate", cmd_generate)
    add_generate_flags(p)

    p = command("eval", cmd_eval)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a data directory (val split) or a text file")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-batches", type=positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --input)")
    p.add_argument("--model", required=True, help="model directory or hub name")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
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

