"""Base vs chat-tuned (full and LoRA) on the real task sets rendered as conversations, on a CPU.

    python benchmarks/chat_real.py [--work /tmp/chat_real] [--data ../shared/data]

It needs the full train and test splits (translation/en-zh, summarization/scitldr,
qa/xquad_en) and prose/moby_dick.txt under --data, by default the shared data folder beside
the checkout (the repository's data/ holds excerpts only; data/README.md names the sources).

1. A byte-level BPE tokenizer (2,048 tokens) and a small GPT (3 layers, 96 wide) pretrained for --pretrain-minutes on the train
   splits' texts plus Moby Dick (benchmarks/finetune_real.py's corpus: each sentence,
   abstract, summary and passage its own document, never a task layout or a conversation).
2. The task sets as conversations (`conversations/*.jsonl`): a system message, the user's
   request, the answer; a quarter of the training conversations chain two or three such
   exchanges of different tasks under one system message. Abstracts are cut to their first
   600 characters and QA passages to 500 characters around the answer, so that a
   conversation fits the 256-token context.
3. `gptkit finetune --task chat`, full and LoRA (rank 16), from the same base.
4. `gptkit eval --task chat` of the base, full and LoRA models on the first --limit test
   conversations of each task, and on multi-turn test conversations whose last request
   (a translation) follows two exchanges of other tasks.

Every step is a `gptkit` command, printed as it runs; the end prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_real import ROOT, check_data, commands, gptkit, pretrain_base  # noqa: E402

SETS = {  # task: (train file, test file, metrics)
    "translate": ("translation/en-zh.train.jsonl", "translation/en-zh.test.jsonl", ["bleu", "chrf"]),
    "summarize": ("summarization/scitldr.train.jsonl", "summarization/scitldr.test.jsonl",
                  ["rouge1", "rougeL"]),
    "qa": ("qa/xquad_en.train.jsonl", "qa/xquad_en.test.jsonl", ["exact_match", "f1"]),
}
SYSTEM = {
    "translate": "Translate the user's English into Chinese.",
    "summarize": "Summarize the user's abstract in one sentence.",
    "qa": "Answer the question from the passage, in a few words.",
}
MIXED_SYSTEM = "You translate English into Chinese, summarize abstracts and answer questions."
# small enough that the whole comparison takes minutes on a shared laptop-class CPU
PRETRAIN = ["--n-layer", "3", "--n-head", "3", "--n-embd", "96", "--block-size", "256",
            "--batch-size", "12", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "30",
            "--eval-interval", "250", "--eval-steps", "10", "--save-interval", "250",
            "--device", "cpu"]
FINETUNE = ["--batch-size", "12", "--warmup-steps", "20", "--eval-interval", "0",
            "--save-interval", "0", "--log-interval", "25", "--device", "cpu"]
VARIANTS = {  # name: extra finetune flags
    "full": ["--lr", "1e-3", "--min-lr", "1e-4"],
    "lora": ["--lr", "4e-3", "--min-lr", "4e-4", "--lora-rank", "16"],
}


def exchange(task: str, record: dict) -> tuple[str, str]:
    """(request, answer) of one task record."""
    if task == "translate":
        return record["source"], record["target"]
    if task == "summarize":
        document = record["document"]
        if len(document) > 600:
            document = document[:600].rsplit(" ", 1)[0] + " ..."
        return document, record["summary"]
    context, answer = record["context"], record["answers"][0]
    start = max(0, record["answer_starts"][0] - 250) if record.get("answer_starts") else 0
    passage = context[start:start + 500]
    if start:
        passage = "... " + passage.split(" ", 1)[-1]
    if start + 500 < len(context):
        passage = passage.rsplit(" ", 1)[0] + " ..."
    return f"{passage}\n\nQuestion: {record['question']}", answer


def single(task: str, record: dict) -> dict:
    request, answer = exchange(task, record)
    return {"task": task, "messages": [{"role": "system", "content": SYSTEM[task]},
                                       {"role": "user", "content": request},
                                       {"role": "assistant", "content": answer}]}


def chain(parts: list[tuple[str, dict]]) -> dict:
    """Several exchanges under one system message; scored as the last one's task."""
    messages = [{"role": "system", "content": MIXED_SYSTEM}]
    for task, record in parts:
        request, answer = exchange(task, record)
        messages += [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
    return {"task": parts[-1][0], "messages": messages}


def write_conversations(data: Path, out: Path, seed: int = 0) -> None:
    """conversations/train.jsonl (all tasks, a quarter chained) and one test file per task."""
    rng = random.Random(seed)
    records = {task: [json.loads(line) for line in (data / files[0]).open(encoding="utf-8")]
               for task, files in SETS.items()}
    short = {task: [r for r in rs if task != "summarize" or len(r["summary"]) < 200]
             for task, rs in records.items()}
    train = [single(task, r) for task, rs in records.items() for r in rs]
    for _ in range(len(train) // 3):  # multi-turn chains: two or three tasks in one conversation
        tasks = rng.sample(list(SETS), rng.randint(2, 3))
        train.append(chain([(task, rng.choice(short[task])) for task in tasks]))
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    lines = {"train": train}
    tests = {task: [json.loads(line) for line in (data / files[1]).open(encoding="utf-8")]
             for task, files in SETS.items()}
    for task in SETS:
        lines[f"test.{task}"] = [single(task, r) for r in tests[task]]
    lines["test.mixed"] = [chain([("qa", rng.choice(tests["qa"])),
                                  ("summarize", rng.choice(tests["summarize"])), ("translate", r)])
                           for r in tests["translate"][:200]]
    for name, conversations in lines.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/chat_real", help="folder for every output")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--limit", type=int, default=50, help="test conversations per file")
    args = parser.parse_args()
    work, data = Path(args.work), Path(args.data)
    check_data(data, [files[:2] for files in SETS.values()], "chat_real.py")
    base = pretrain_base(data, work, PRETRAIN, vocab_size=2048, minutes=args.pretrain_minutes)
    conversations = work / "conversations"
    write_conversations(data, conversations)
    models = {"base": base}
    for variant, flags in VARIANTS.items():
        models[variant] = run = work / f"chat-{variant}"
        if not (run / "model.safetensors").exists():
            gptkit("finetune", "--model", str(base), "--task", "chat", "--data",
                   str(conversations / "train.jsonl"), "--out", str(run), "--max-steps",
                   str(args.finetune_steps), *FINETUNE, *flags)
    results: dict[tuple[str, str], dict] = {}
    for test in [*SETS, "mixed"]:
        for name, model in models.items():
            out = gptkit("eval", "--model", str(model), "--task", "chat", "--data",
                         str(conversations / f"test.{test}.jsonl"), "--limit", str(args.limit),
                         "--device", "cpu", "--out", str(work / f"preds.{name}.{test}.jsonl"))
            results[test, name] = json.loads(out.strip().splitlines()[-1])
    print("\n| test conversations | metric | base | chat, full | chat, LoRA (r=16) | n |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for test in [*SETS, "mixed"]:
        metrics = ["loss", *SETS["translate" if test == "mixed" else test][2]]
        for metric in metrics:
            values = [results[test, name][metric] for name in models]
            scale = 100 if metric in ("rouge1", "rougeL", "exact_match", "f1") else 1
            cells = " | ".join(f"{v * scale:.2f}" for v in values)
            print(f"| {test} | {metric} | {cells} | {results[test, 'base']['n']} |")
    print("\nCommands:\n" + "\n".join(commands))


if __name__ == "__main__":
    main()
