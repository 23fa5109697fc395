"""Task evaluation: generate for every test record and score it with the task's metrics.

    gptkit eval --model runs/sum --task summarize --data test.jsonl --limit 200 --out preds.jsonl

translate: BLEU and chrF (sacrebleu, tokenizer "zh" for Chinese targets); summarize:
ROUGE-1/2/L F1 (rouge-score; by character for Chinese); qa: exact match and F1 with
SQuAD's answer normalisation, best over the accepted answers; instruct and completion:
loss and perplexity of the targets given the prompts (teacher forcing, no generation).
BLEU and chrF are on sacrebleu's 0-100 scale, the rest are fractions in [0, 1].
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.tasks import Example, TaskSpec, generate_texts, load_task, read_examples

LOSS_TASKS = ("instruct", "completion")
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def is_chinese(texts: Sequence[str]) -> bool:
    """True when most texts contain Chinese characters (scores then count characters)."""
    return sum(bool(_CJK.search(t)) for t in texts) * 2 > len(texts)


def _require(module: str, package: str) -> Any:
    """Import a metric library, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptkitError(f"Task metrics need the '{package}' package, a gptkit dependency "
                          f"missing here; install it with `pip install {package}`.") from None


def translation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) against one reference per example."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    tokenize = "zh" if is_chinese(references) else "13a"
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score}


class _CharTokens:
    """rouge-score tokenizer for Chinese: its default keeps only [a-z0-9] and loses every Hanzi."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return [c for c in text.lower() if not c.isspace()]


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]
                 ) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1, each example scored against its best reference."""
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    types = ["rouge1", "rouge2", "rougeL"]
    chinese = is_chinese([refs[0] for refs in references])
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=not chinese,
                                      tokenizer=_CharTokens() if chinese else None)
    totals = dict.fromkeys(types, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(list(refs), prediction)
        for name in types:
            totals[name] += scores[name].fmeasure
    return {name: total / max(len(predictions), 1) for name, total in totals.items()}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD exact match and token F1, best over each question's answers, as fractions."""
    em = f1 = 0.0
    for prediction, golds in zip(predictions, answers, strict=True):
        em += max(normalize_answer(prediction) == normalize_answer(g) for g in golds)
        f1 += max(_f1(prediction, g) for g in golds)
    n = max(len(predictions), 1)
    return {"exact_match": em / n, "f1": f1 / n}


def score(task: str, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """The metrics of a generation task for predictions of `examples`."""
    references = [e.targets for e in examples]
    if task == "translate":
        return translation_scores(predictions, [r[0] for r in references])
    if task == "summarize":
        return rouge_scores(predictions, references)
    if task == "qa":
        return qa_scores(predictions, references)
    raise GptkitError(f"task '{task}' is scored by loss, not by generated text.")


def evaluate_task(model_dir: str | Path, task: str | None, data: str | Path, *,
                  limit: int | None = None, out: str | Path | None = None, batch_size: int = 16,
                  max_new_tokens: int | None = None, device: str = "auto",
                  prompt_field: str | None = None, target_field: str | None = None,
                  progress: bool = True) -> dict[str, float]:
    """`gptkit eval --task`: the task's metrics on a JSONL file, plus `n` (examples scored).

    `max_new_tokens` defaults to 1.5 times the longest reference (in tokens) plus 8, so
    generation time stays bounded by what the answers need. `out` receives one JSON
    object per example: its prompt, prediction and references.
    """
    from gptkit.inference import load_for_inference

    if limit is not None and limit < 1:
        raise GptkitError(f"--limit is {limit}; expected at least 1.")
    spec = load_task(model_dir, task, prompt_field=prompt_field, target_field=target_field,
                     quiet=not progress)
    examples = read_examples(data, spec, limit=limit)
    model, tokenizer = load_for_inference(model_dir, device)
    result: dict[str, float] = {}
    if spec.task in LOSS_TASKS:
        result.update(target_loss(model, tokenizer, spec, examples, batch_size))
    if spec.task not in LOSS_TASKS or out is not None:
        if max_new_tokens is None:
            longest = max(len(tokenizer.encode(spec.target_text(t))) for e in examples
                          for t in e.targets)
            max_new_tokens = min(longest * 3 // 2 + 8, model.config.block_size // 2)
        prompts = [spec.format_prompt(e.prompt) for e in examples]
        predictions = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress)
        if spec.task not in LOSS_TASKS:
            result.update(score(spec.task, predictions, examples))
        if out is not None:
            _write_predictions(Path(out), prompts, predictions, examples)
    result["n"] = len(examples)
    return result


def target_loss(model: Any, tokenizer: Any, spec: TaskSpec, examples: Sequence[Example],
                batch_size: int) -> dict[str, float]:
    """Mean loss and perplexity of the target tokens (and end-of-text) given the prompts."""
    from gptkit.finetune import encode_examples, iter_sft_batches
    from gptkit.runtime import pick_dtype
    from gptkit.train import evaluate

    encoded = encode_examples(tokenizer, spec, examples, model.config.block_size, "the data")
    device = model.device
    loss, tokens = evaluate(model, iter_sft_batches(encoded, batch_size, tokenizer.eos_token_id),
                            device, pick_dtype("float32", device))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _write_predictions(path: Path, prompts: Sequence[str], predictions: Sequence[str],
                       examples: Sequence[Example]) -> None:
    from gptkit.checkpoint import atomic_write_text

    lines = [json.dumps({"prompt": p, "prediction": pred, "references": e.targets},
                        ensure_ascii=False)
             for p, pred, e in zip(prompts, predictions, examples, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
