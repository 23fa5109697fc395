"""`gptkit demo`: the whole path, offline, in a few minutes on a laptop CPU.

The corpus is Python's own documentation, present in every CPython: the reference
topics behind `help()` (`pydoc_data.topics`) and the standard library's docstrings,
read with `ast` (nothing is imported or executed). From it the demo trains a BPE
tokenizer, prepares token files, pretrains a small GPT within a time budget and
prints samples.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import time
from pathlib import Path

DOCSTRING_BUDGET = 2_500_000  # characters of stdlib docstrings added to the topics
PROMPTS = ("The return statement", "A class definition", "Raises ValueError if")


def demo_documents() -> list[tuple[str, str]]:
    """(name, text) documents: pydoc topics, then stdlib module docstrings."""
    from pydoc_data.topics import topics

    documents = [(f"topic-{name}", text) for name, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    used = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        parts = [doc for n in nodes if (doc := ast.get_docstring(n))]
        text = "\n\n".join(parts)
        if len(text) < 200:
            continue
        documents.append((f"stdlib-{path.stem}", text))
        used += len(text)
        if used > DOCSTRING_BUDGET:
            break
    return documents


def run_demo(out: str | Path = "runs/demo", minutes: float = 4.0, device: str = "auto") -> None:
    """Tokenizer, data, pretraining and three samples, printing what happens."""
    import torch

    from gptkit.checkpoint import TRAIN_STATE_NAME
    from gptkit.config import TrainConfig
    from gptkit.data import prepare
    from gptkit.generate import generate
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer
    from gptkit.train import train

    started = time.perf_counter()
    out = Path(out)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    documents = demo_documents()
    for name, text in documents:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    size = sum(len(t) for _, t in documents)
    print(f"[1/4] corpus: {len(documents)} documents of Python documentation, {size / 1e6:.1f}M characters")

    tokenizer = Tokenizer.train(texts=(text for _, text in documents), vocab_size=4096, kind="bpe")
    tokenizer.save_pretrained(out / "tokenizer")
    print(f"[2/4] tokenizer: byte-level BPE with {tokenizer.vocab_size} tokens")

    meta = prepare([corpus], out / "tokenizer", out / "data", val_fraction=0.05, progress=False)
    print(f"[3/4] data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")

    shape = dict(n_layer=4, n_head=4, n_embd=192, block_size=128)
    seconds = max(20.0, minutes * 60 - (time.perf_counter() - started) - 25)
    steps = _steps_in(seconds, shape, meta["vocab_size"], batch_size=16, device=device)
    cfg = TrainConfig(data=str(out / "data"), out=str(out / "model"), preset="tiny", **shape,
                      batch_size=16, max_steps=steps, lr=2e-3, min_lr=2e-4, warmup_steps=min(100, steps // 10),
                      eval_interval=max(1, steps // 4), eval_steps=10, save_interval=0,
                      device=device, max_time=seconds * 1.2, beta2=0.99)
    if (Path(cfg.out) / TRAIN_STATE_NAME).exists():
        import shutil

        shutil.rmtree(cfg.out)  # a fresh demo each time
    print(f"[4/4] pretraining a {shape['n_layer']}-layer GPT for ~{seconds / 60:.1f} min ({steps} steps)")
    result = train(cfg)
    after = result.val_loss
    if result.stopped_early or after is None:  # the last evaluation came before the saved step
        from gptkit.evaluate import evaluate_lm

        after = evaluate_lm(cfg.out, out / "data", batch_size=16, max_batches=10,
                            device=device)["loss"]
    print(f"val loss: {_first_val_loss(Path(cfg.out)):.3f} before training, {after:.3f} after")

    model = GPT.from_pretrained(cfg.out)
    generator = torch.Generator().manual_seed(0)
    print("\nsamples:")
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, return_tensors="pt")
        out_ids = generate(model, ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                           generator=generator)
        print(f"--- {tokenizer.decode(out_ids[0], skip_special_tokens=True)}\n")
    print(f"done in {time.perf_counter() - started:.0f}s. Try:\n"
          f"  gptkit generate --model {cfg.out} \"The with statement\"")


def _first_val_loss(run_dir: Path) -> float:
    from gptkit.runlog import METRICS_NAME, read_metrics

    losses = [r["val_loss"] for r in read_metrics(run_dir / METRICS_NAME) if "val_loss" in r]
    return losses[0] if losses else float("nan")


def _steps_in(seconds: float, shape: dict[str, int], vocab_size: int, batch_size: int,
              device: str) -> int:
    """How many training steps fit in `seconds`, timed on a throwaway model."""
    import torch

    from gptkit.config import GPTConfig, TrainConfig
    from gptkit.model import GPT
    from gptkit.runtime import pick_device
    from gptkit.train import make_optimizer

    dev = pick_device(device)
    model = GPT(GPTConfig(vocab_size=vocab_size, **shape)).to(dev)
    opt = make_optimizer(model, TrainConfig(), dev)  # the optimizer training will use
    x = torch.randint(0, vocab_size, (batch_size, shape["block_size"]), device=dev)
    timings = []
    for _ in range(4):
        t = time.perf_counter()
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t)
    per_step = sorted(timings)[1] * 1.1  # evaluation and logging take a little extra
    print(f"      ({per_step * 1000:.0f} ms per step on {dev})", file=sys.stderr)
    return max(50, int(seconds / per_step))
