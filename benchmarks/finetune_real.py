"""Base vs fine-tuned (full and LoRA) metrics on real datasets, on a CPU.

    python benchmarks/finetune_real.py [--work /tmp/ft_real] [--data ../shared/data]

It needs the full train and test splits (translation/en-zh, summarization/scitldr,
qa/xquad_en) and the whole of prose/moby_dick.txt under --data, by default the shared data
folder beside the checkout; the repository's data/ holds only excerpts of them (data/README.md
names their sources, licences and conversion).

1. A byte-level BPE tokenizer and a small GPT pretrained for a few minutes on the train
   splits' texts (each sentence, abstract, summary and passage as its own document, so the
   base model has seen the languages but never a task layout) plus Moby Dick.
2. For translation (en-zh), summarization (SciTLDR) and QA (XQuAD en): the base model's
   metric on the first --limit test records, then full fine-tuning and LoRA fine-tuning
   on the train split, each evaluated the same way.

Every step is a `gptkit` command, printed as it runs; the end prints a markdown table.
Tiny models score low in absolute terms: the point is the measured difference.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # task: (train file, test file, metrics to report)
    "translate": ("translation/en-zh.train.jsonl", "translation/en-zh.test.jsonl", ["bleu", "chrf"]),
    "summarize": ("summarization/scitldr.train.jsonl", "summarization/scitldr.test.jsonl",
                  ["rouge1", "rouge2", "rougeL"]),
    "qa": ("qa/xquad_en.train.jsonl", "qa/xquad_en.test.jsonl", ["exact_match", "f1"]),
}
PRETRAIN = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "128",
            "--batch-size", "16", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "30",
            "--eval-interval", "250", "--eval-steps", "10", "--save-interval", "250",
            "--device", "cpu"]
FINETUNE = ["--batch-size", "16", "--warmup-steps", "20", "--eval-interval", "0",
            "--save-interval", "0", "--log-interval", "20", "--device", "cpu"]
VARIANTS = {  # name: extra finetune flags
    "full": ["--lr", "1e-3", "--min-lr", "1e-4"],
    "lora": ["--lr", "4e-3", "--min-lr", "4e-4", "--lora-rank", "16"],
}
commands: list[str] = []


def gptkit(*args: str) -> str:
    """Run one gptkit command (logged as the user would type it) and return its stdout."""
    line = "gptkit " + " ".join(shlex.quote(a) for a in args)
    commands.append(line)
    print(f"\n$ {line}", flush=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "gptkit", *args], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {line}")
    print(f"({time.time() - start:.0f}s)", flush=True)
    return done.stdout


def write_corpus(data: Path, out: Path) -> None:
    """Train-split texts, one document each, plus Moby Dick: what the base model reads."""
    docs: list[str] = []
    for line in (data / TASKS["translate"][0]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        docs += [record["source"], record["target"]]
    for line in (data / TASKS["summarize"][0]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        docs += [record["document"], record["summary"]]
    contexts = {}
    for line in (data / TASKS["qa"][0]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        contexts[record["context"]] = None
        docs.append(record["question"] + " " + record["answers"][0])
    docs += list(contexts)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    text = (data / "prose" / "moby_dick.txt").read_text(encoding="utf-8")
    (out / "moby_dick.txt").write_text(text, encoding="utf-8")
    # the tokenizer learns from plain text, not from JSON syntax
    (out.parent / "tokenizer_text.txt").write_text("\n".join(docs), encoding="utf-8")


def check_data(data: Path, pairs: list[tuple[str, ...]], script: str) -> None:
    """Exit with one sentence naming what is missing of the full sets and Moby Dick."""
    needed = [name for pair in pairs for name in pair] + ["prose/moby_dick.txt"]
    missing = [name for name in needed if not (data / name).is_file()]
    if missing:
        sys.exit(f"{script} needs the full task sets and Moby Dick under --data {data} "
                 f"(see data/README.md for their sources), and {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} missing there.")


def pretrain_base(data: Path, work: Path, shape: list[str], *, vocab_size: int,
                  minutes: float) -> Path:
    """The base model both benchmarks fine-tune: a BPE tokenizer and `minutes` of pretraining
    on the train splits' texts plus Moby Dick (reused when `work` already holds it)."""
    base = work / "base"
    if not (base / "model.safetensors").exists():
        write_corpus(data, work / "corpus")
        gptkit("tokenizer", "train", str(work / "tokenizer_text.txt"),
               str(work / "corpus" / "moby_dick.txt"), "--vocab-size", str(vocab_size),
               "--out", str(work / "tok"))
        gptkit("prepare", str(work / "corpus"), "--tokenizer", str(work / "tok"),
               "--out", str(work / "tokens"), "--val-fraction", "0.02")
        gptkit("train", "--data", str(work / "tokens"), "--out", str(base), *shape,
               "--max-steps", "100000", "--max-time", str(int(minutes * 60)))
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ft_real", help="folder for every output")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--pretrain-minutes", type=float, default=6.0)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--limit", type=int, default=100, help="test records per task")
    args = parser.parse_args()
    work, data = Path(args.work), Path(args.data)
    check_data(data, [files[:2] for files in TASKS.values()], "finetune_real.py")
    base = pretrain_base(data, work, PRETRAIN, vocab_size=4096, minutes=args.pretrain_minutes)
    rows = []
    for task, (train_file, test_file, names) in TASKS.items():
        def evaluate(model: Path, task: str = task, test_file: str = test_file) -> dict:
            out = gptkit("eval", "--model", str(model), "--task", task, "--data",
                         str(data / test_file), "--limit", str(args.limit), "--device", "cpu",
                         "--out", str(model / f"preds.{task}.jsonl"))
            return json.loads(out.strip().splitlines()[-1])

        results = {"base": evaluate(base)}
        for variant, flags in VARIANTS.items():
            run = work / f"{task}-{variant}"
            if not (run / "model.safetensors").exists():
                gptkit("finetune", "--model", str(base), "--task", task, "--data",
                       str(data / train_file), "--out", str(run), "--max-steps",
                       str(args.finetune_steps), *FINETUNE, *flags)
            results[variant] = evaluate(run)
        for name in names:
            rows.append((task, name, *(results[v][name] for v in ("base", "full", "lora")),
                         results["base"]["n"]))
    print("\n| task | metric | base | full fine-tune | LoRA (r=16) | test examples |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for task, name, b, full, lora, n in rows:
        scale = 1 if name in ("bleu", "chrf") else 100  # BLEU/chrF are 0-100 already
        print(f"| {task} | {name} | {b * scale:.2f} | {full * scale:.2f} | {lora * scale:.2f} | {n} |")
    print("\nCommands:\n" + "\n".join(commands))


if __name__ == "__main__":
    main()
