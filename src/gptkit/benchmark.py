"""Standard benchmarks: lm-evaluation-harness's metrics and nanochat's CORE, scored fast.

    gptkit eval --model runs/mine --benchmark hellaswag --limit 500
    gptkit eval --model runs/mine --benchmark core

Metrics as lm-evaluation-harness defines them, so published figures compare: `acc` (the
option whose continuation has the highest summed log-probability), `acc_norm` (that sum
divided by the option's length in characters), `acc_bytes` (by its UTF-8 bytes); for
language modelling `acc` (greedy decoding reproduces the whole continuation) and
`perplexity` (exp of minus the mean summed log-probability). Contexts and continuations
are tokenized as lm-eval's `hf` model does (the whole text, split after the context's
tokens). `acc_token` (mean log-probability per continuation token) is the measure CORE
(nanochat, after DCLM) ranks options by.

Speed: an item's options share their context, so each context runs once and its
continuations follow it in the same row under a tree-shaped attention mask (each
continuation sees the context and itself, at the positions it would have alone); only
the positions whose next token is scored go through the LM head.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit import benchsets
from gptkit.benchsets import RESULTS_NAME, Item, Requests
from gptkit.errors import GptkitError

# nanochat's CORE: (label, set, shots, random baseline) of the 22 DCLM tasks held here
CORE_TASKS: tuple[tuple[str, str, int, float], ...] = (
    ("hellaswag_zeroshot", "hellaswag", 0, 0.25),
    ("arc_easy", "arc_easy", 10, 0.25),
    ("arc_challenge", "arc_challenge", 10, 0.25),
    ("copa", "copa", 0, 0.5),
    ("piqa", "piqa", 10, 0.5),
    ("openbook_qa", "openbook_qa", 0, 0.25),
    ("lambada_openai", "lambada_openai", 0, 0.0),
    ("hellaswag", "hellaswag", 10, 0.25),
    ("winogrande", "winogrande", 0, 0.5),
    ("boolq", "boolq", 10, 0.62),
)
CORE_TOTAL = 22
TOKEN_BUDGET = 2048  # padded tokens per forward pass when no batch size is given


@dataclass
class Tree:
    """One context and the continuations that follow it in one row."""

    context: list[int]
    continuations: list[list[int]]
    slots: list[int]  # which option of the item each continuation scores


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation; the whole text is
    tokenized once and the continuation is what follows the context's own tokens."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation)
    ctx = tokenizer.encode(stripped)
    if not ctx:  # nothing to condition on: the end-of-text token, as lm-eval does
        return [tokenizer.eos_token_id], whole
    return ctx, whole[len(ctx):]


def build_trees(requests: Requests, tokenizer: Any, block_size: int, share: bool
                ) -> tuple[list[Tree], bool, bool]:
    """The rows of one item; also whether its context was cut to fit, and whether it
    cannot fit at all. `share`: options with one context go into one row."""
    trees: list[Tree] = []
    cut = False
    for slot, (context, continuation) in enumerate(requests.pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if len(cont) - 1 >= block_size or not cont:
            return [], False, True
        room = block_size - (len(cont) - 1)  # the last token is scored, never fed
        if len(ctx) > room:
            ctx, cut = ctx[-room:], True
        last = trees[-1] if trees else None
        if (share and last is not None and last.context == ctx
                and len(ctx) + sum(len(c) - 1 for c in last.continuations) + len(cont) - 1
                <= block_size):
            last.continuations.append(cont)
            last.slots.append(slot)
        else:
            trees.append(Tree(ctx, [cont], [slot]))
    return trees, cut, False


@torch.no_grad()
def score_trees(model: Any, trees: Sequence[Tree]) -> list[list[tuple[float, bool]]]:
    """(summed log-probability, greedy) of every continuation of every tree, in one pass."""
    device = model.device
    rows, segments, positions, targets = [], [], [], []  # targets: (row, predictor, token)
    for r, tree in enumerate(trees):
        tokens, seg, pos = list(tree.context), [0] * len(tree.context), list(range(len(tree.context)))
        L = len(tree.context)
        for k, cont in enumerate(tree.continuations):
            start = len(tokens)
            for t, token in enumerate(cont):
                targets.append((r, L - 1 if t == 0 else start + t - 1, token, k))
            tokens += cont[:-1]
            seg += [k + 1] * (len(cont) - 1)
            pos += list(range(L, L + len(cont) - 1))
        rows.append(tokens)
        segments.append(seg)
        positions.append(pos)
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    seg = torch.tensor([s + [-1] * (T - len(s)) for s in segments], device=device)
    pos = torch.tensor([p + [0] * (T - len(p)) for p in positions], device=device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    # a query sees earlier keys of the context (segment 0) and of its own continuation
    mask = causal & ((seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == 0))
    hidden = model.hidden_states(idx, pos, None, mask.unsqueeze(1))
    where = torch.tensor([(r, p) for r, p, _, _ in targets], device=device)
    logits = model.lm_head(model.transformer.ln_f(hidden[where[:, 0], where[:, 1]]))
    cap = model.config.logit_softcap
    logits = (cap * torch.tanh(logits / cap) if cap else logits).float()
    logprobs = logits.log_softmax(-1)
    wanted = torch.tensor([tok for _, _, tok, _ in targets], device=device)
    token_lp = logprobs.gather(1, wanted[:, None])[:, 0].tolist()
    hits = (logits.argmax(-1) == wanted).tolist()
    out: list[list[list[float | bool]]] = [[[0.0, True] for _ in t.continuations] for t in trees]
    for (r, _, _, k), lp, hit in zip(targets, token_lp, hits, strict=True):
        out[r][k][0] += lp
        out[r][k][1] = out[r][k][1] and hit
    return [[(float(a), bool(b)) for a, b in row] for row in out]


def item_metrics(item: Item, requests: Requests, lls: np.ndarray, greedy: np.ndarray,
                 ntokens: np.ndarray) -> dict[str, float]:
    """One item's 0/1 scores (and, for language modelling, its log-likelihood)."""
    if item.kind == "language_modeling":
        return {"acc": float(greedy[0]), "loglikelihood": float(lls[0])}
    gold = requests.gold
    chars = np.array([float(len(c)) for c in requests.choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in requests.choices])
    scores = {"acc": float(np.argmax(lls) == gold),
              "acc_token": float(np.argmax(lls / ntokens) == gold)}
    if item.kind == "multiple_choice":  # a schema's options share one continuation
        scores["acc_norm"] = float(np.argmax(lls / chars) == gold)
        scores["acc_bytes"] = float(np.argmax(lls / nbytes) == gold)
    return scores


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def summarize(per_item: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each metric's value and standard error over the items."""
    metrics: dict[str, dict[str, float]] = {}
    for name in per_item[0]:
        values = [s[name] for s in per_item]
        if name == "loglikelihood":  # perplexity, its stderr by the delta method
            ppl = math.exp(-float(np.mean(values)))
            metrics["perplexity"] = {"value": ppl, "stderr": ppl * mean_stderr(values)}
        else:
            metrics[name] = {"value": float(np.mean(values)), "stderr": mean_stderr(values)}
    return metrics


def _row_length(tree: Tree) -> int:
    return len(tree.context) + sum(len(c) - 1 for c in tree.continuations)


def _batches(prepared: list, batch_size: int | None) -> Any:
    """`batch_size` items per forward pass, or (None) as many as fill TOKEN_BUDGET padded
    tokens: short items (ARC) then share a pass, where a fixed count would make many small
    ones, each paying the per-operation cost of every layer."""
    batch: list = []
    rows = longest = 0
    for entry in prepared:
        length = max(_row_length(t) for t in entry[2])
        full = (len(batch) == batch_size if batch_size else
                (rows + len(entry[2])) * max(longest, length) > TOKEN_BUDGET)
        if batch and full:
            yield batch
            batch, rows, longest = [], 0, 0
        batch.append(entry)
        rows, longest = rows + len(entry[2]), max(longest, length)
    if batch:
        yield batch


def run_task(model: Any, tokenizer: Any, name: str, *, shots: int = 0, limit: int | None = None,
             batch_size: int | None = None, label: str | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Score one set (a vendored name or a file): its metrics with stderr, n, and counts
    of contexts cut to fit the model and items skipped because nothing fits.
    `batch_size`: items per forward pass (default: as many as fill TOKEN_BUDGET tokens)."""
    items = benchsets.read_items(benchsets.resolve(name))
    chosen = items[:limit] if limit else items
    block_size = model.config.block_size
    share = all(getattr(block.attn, "window", None) is None for block in model.transformer.h)
    prepared, cut, skipped = [], 0, 0
    for i, item in enumerate(chosen):
        requests = benchsets.requests(item, benchsets.shots_for(items, i, shots))
        trees, was_cut, too_long = build_trees(requests, tokenizer, block_size, share)
        cut += was_cut
        skipped += too_long
        if trees:
            prepared.append((item, requests, trees))
    if not prepared:
        raise GptkitError(f"No item of {name} fits the model's context of {block_size} tokens.")
    # longest first: a batch's rows pad to similar lengths, and the ETA settles early
    prepared.sort(key=lambda p: -sum(len(t.context) + sum(map(len, t.continuations))
                                     for t in p[2]))
    per_item = []
    bar = _progress(len(prepared), label or name, progress)
    for batch in _batches(prepared, batch_size):
        scored = iter(score_trees(model, [t for _, _, trees in batch for t in trees]))
        for item, requests, trees in batch:
            n = len(requests.pairs)
            lls, greedy, ntok = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n)
            for tree in trees:
                for slot, cont, (ll, hit) in zip(tree.slots, tree.continuations,
                                                  next(scored), strict=True):
                    lls[slot], greedy[slot], ntok[slot] = ll, hit, len(cont)
            per_item.append(item_metrics(item, requests, lls, greedy, ntok))
        bar(len(batch))
    kind = prepared[0][0].kind
    baseline = 0.0 if kind == "language_modeling" else float(
        np.mean([1.0 / len(item.options) for item, _, _ in prepared]))
    if cut or skipped:
        print(f"note: {name}: {cut} context(s) cut on the left to fit {block_size} tokens, "
              f"{skipped} item(s) skipped (a continuation longer than the context).",
              file=sys.stderr)
    return {"task": label or name, "kind": kind, "shots": shots, "n": len(per_item),
            "random_baseline": baseline, "metrics": summarize(per_item),
            "cut": cut, "skipped": skipped}


def _progress(total: int, label: str, enabled: bool) -> Callable[[int], None]:
    """A tqdm bar over items with an ETA (on stderr, when it is a terminal)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="item", disable=None if enabled else True,
               file=sys.stderr, leave=False)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def run_core(model: Any, tokenizer: Any, *, limit: int | None = None,
             batch_size: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """nanochat's CORE over the tasks held here: per task (acc - b) / (1 - b), multiple
    choice and schema by `acc_token`, language modelling by greedy `acc`; their mean."""
    tasks, centered = [], {}
    for label, name, shots, baseline in CORE_TASKS:
        result = run_task(model, tokenizer, name, shots=shots, limit=limit,
                          batch_size=batch_size, label=label, progress=progress)
        metric = "acc" if result["kind"] == "language_modeling" else "acc_token"
        acc = result["metrics"][metric]["value"]
        centered[label] = (acc - baseline) / (1.0 - baseline)
        result["core"] = {"metric": metric, "baseline": baseline, "centered": centered[label]}
        tasks.append(result)
    return {"tasks": tasks, "core": {"value": float(np.mean(list(centered.values()))),
                                     "tasks": len(centered), "of": CORE_TOTAL}}


def evaluate_benchmarks(model_dir: str | Path, names: Sequence[str], *, limit: int | None = None,
                        num_fewshot: int | None = None, batch_size: int | None = None,
                        device: str = "auto", dtype: str = "float32",
                        out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Score a model on `names` (vendored sets, "core", or JSONL files) and save
    eval_results.json beside it (or at `out`). `dtype` ("float32" or "bfloat16") is that of
    the weights and activations. Returns what was saved."""
    from gptkit.checkpoint import atomic_write_text, resolve_model_dir
    from gptkit.inference import load_directory

    if "core" in names and num_fewshot is not None:
        raise GptkitError("core uses nanochat's shot counts per task; drop --num-fewshot.")
    for name in names:
        if name != "core":
            benchsets.resolve(name)  # every name checked before the model loads
    directory = resolve_model_dir(model_dir)
    model, tokenizer = load_directory(directory, device, dtype, fast=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"model": str(model_dir), "dtype": dtype, "tasks": []}
    for name in names:
        if name == "core":
            core = run_core(model, tokenizer, limit=limit, batch_size=batch_size,
                            progress=progress)
            results["tasks"] += core["tasks"]
            results["core"] = core["core"]
        else:
            results["tasks"].append(run_task(model, tokenizer, name, shots=num_fewshot or 0,
                                             limit=limit, batch_size=batch_size,
                                             progress=progress))
    results["limit"] = limit
    results["seconds"] = round(time.perf_counter() - started, 2)
    path = Path(out) if out else directory / RESULTS_NAME
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    results["saved_to"] = str(path)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The terminal table: task, metric, value ± stderr, random baseline, n."""
    lines = [f"{'task':<20} {'shots':>5} {'metric':<11} {'value ± stderr':>20} {'random':>7} "
             f"{'n':>6}"]
    for task in results["tasks"]:
        for metric, m in task["metrics"].items():
            baseline = "" if metric == "perplexity" else f"{task['random_baseline']:.4f}"
            lines.append(f"{task['task']:<20} {task['shots']:>5} {metric:<11} "
                         f"{_number(m['value']):>9} ± {_number(m['stderr']):<8} {baseline:>7} "
                         f"{task['n']:>6}")
    if "core" in results:
        core = results["core"]
        lines.append(f"CORE ({core['tasks']} of {core['of']} tasks): {core['value']:.4f}")
    return "\n".join(lines)


def _number(x: float) -> str:
    """4 decimals, or 4 significant digits for a large perplexity."""
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"


def training_scorer(names: str, limit: int, tokenizer: Any, batch_size: int | None = None
                    ) -> Callable[[Any], dict[str, float]]:
    """What `gptkit train --eval-benchmark` calls at each evaluation: the model's scores
    as metrics.jsonl keys (`benchmark/hellaswag/acc_norm`, `benchmark/core`). Every name
    is checked now, before training starts."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for name in chosen:
        if name != "core":
            benchsets.resolve(name)

    def score(model: Any) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            record: dict[str, float] = {}
            for name in chosen:
                if name == "core":
                    core = run_core(model, tokenizer, limit=limit, batch_size=batch_size,
                                    progress=False)
                    record["benchmark/core"] = core["core"]["value"]
                    continue
                result = run_task(model, tokenizer, name, limit=limit, batch_size=batch_size,
                                  progress=False)
                record.update({f"benchmark/{name}/{metric}": m["value"]
                               for metric, m in result["metrics"].items()})
            return record
        finally:
            model.train(was_training)

    return score
