"""Every evaluation: language-model loss and perplexity, and task metrics.

    gptkit eval --model runs/mine --data data/                  # loss, perplexity
    gptkit eval --model runs/sum --task summarize --data test.jsonl --limit 200 --out preds.jsonl

`lm_loss` is the one scoring loop (training's evaluations call it too). Task metrics:
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
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit import distributed
from gptkit.checkpoint import atomic_write_text, resolve_model_dir
from gptkit.conversation import (
    CHAT_TASK,
    Conversation,
    Message,
    chat_format,
    encode_conversations,
    fit_prompt,
    read_conversations,
)
from gptkit.data import iter_eval_batches, load_meta, load_tokens
from gptkit.errors import GptkitError
from gptkit.inference import load_directory, load_for_inference
from gptkit.kernels import IGNORE_INDEX
from gptkit.runtime import autocast, pick_device, pick_dtype
from gptkit.sft import batch_on, encode_pairs, iter_sft_batches
from gptkit.tasks import Example, TaskSpec, generate_texts, load_task, read_examples
from gptkit.tokenizer import decode_utf8

MAX_INVALID_BYTE_FRACTION = 0.01  # beyond this a file is not text with a few stray bytes


# -- language modelling ----------------------------------------------------------------

@torch.no_grad()
def lm_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, dtype: torch.dtype,
             info: distributed.DistInfo = distributed.SINGLE) -> tuple[float, int]:
    """Token-weighted mean loss over `batches`, and the number of target tokens.

    Under torchrun each rank scores an equal share of the batches (FSDP needs every rank
    to run the same number of forwards) and the sums are combined.
    """
    batches = list(batches)
    if info.enabled and len(batches) >= info.world_size:
        share = len(batches) // info.world_size
        batches = batches[info.rank * share:(info.rank + 1) * share]
        combine = True
    else:
        combine = False
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    for batch in batches:
        x, y, extra = batch_on(batch, device)
        with autocast(device, dtype):
            loss = model(x, targets=y, **extra)
        n = (y != IGNORE_INDEX).sum()
        sums += torch.stack([loss.double() * n, n.double()])
    model.train(was_training)
    if combine:
        sums = distributed.total(sums, info)
    loss_sum, count = sums.tolist()
    return loss_sum / max(count, 1.0), int(count)


def evaluate_lm(model_dir: str | Path, data: str | Path, *, batch_size: int = 8,
                max_batches: int | None = None, device: str = "auto") -> dict[str, float]:
    """`{"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}` over non-overlapping
    context-sized windows; bits per byte = the summed loss in bits over the UTF-8 bytes
    of the scored tokens.

    A data directory contributes its val split (checked against the model's tokenizer);
    a text file is tokenized with the model's tokenizer.
    """
    model, tokenizer = load_for_inference(model_dir, device)
    data = Path(data)
    if data.is_dir():
        meta = load_meta(data)
        if meta["tokenizer_hash"] != tokenizer.hash:
            raise GptkitError(f"{data} was tokenized with a different tokenizer than the model in "
                              f"{model_dir}; prepare it with the model's tokenizer.")
        tokens = load_tokens(data, "val")
    elif data.is_file():
        tokens = np.asarray(tokenizer.encode(_read_text(data)), dtype=np.int64)
    else:
        raise GptkitError(f"--data {data} does not exist; expected a data directory or a text file.")
    block_size = min(model.config.block_size, max(1, len(tokens) - 1))
    if len(tokens) < 2:
        raise GptkitError(f"{data} holds {len(tokens)} token(s); at least 2 are needed to score a model.")
    dev = pick_device(device)
    sizes = token_bytes(tokenizer, model.config.vocab_size)
    scored_bytes = 0

    def counted(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal scored_bytes
        for x, y in batches:
            scored_bytes += int(sizes[y.numpy()].sum())
            yield x, y

    loss, count = lm_loss(model, counted(iter_eval_batches(tokens, block_size, batch_size,
                                                           max_batches)),
                          dev, pick_dtype("float32", dev))
    bits_per_byte = loss * count / (math.log(2) * max(scored_bytes, 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": bits_per_byte, "tokens": count, "bytes": scored_bytes}


def token_bytes(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes of each token decoded alone, 0 for end-of-text and padded rows (as
    nanochat counts them): bits per byte then compares models whose tokenizers differ."""
    sizes = np.zeros(vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        sizes[i] = len(tokenizer.decode([i]).encode("utf-8"))
    sizes[tokenizer.eos_token_id] = 0
    return sizes


def _read_text(path: Path) -> str:
    """A text file to score; a file that is mostly not UTF-8 (a binary) is refused."""
    raw = path.read_bytes()
    text, invalid = decode_utf8(raw)
    if invalid > MAX_INVALID_BYTE_FRACTION * len(raw) or "\x00" in text:
        raise GptkitError(f"--data {path} is not UTF-8 text ({invalid:,} of {len(raw):,} bytes are "
                          "not valid UTF-8); expected a text file or a prepared data directory.")
    if invalid:
        print(f"note: {path} has {invalid:,} bytes that are not valid UTF-8; each was read as "
              "U+FFFD.", file=sys.stderr)
    return text


# -- tasks ---------------------------------------------------------------------------------

LOSS_TASKS = ("instruct", "completion")
CHAT_METRIC_TASKS = ("translate", "summarize", "qa")  # a conversation's "task" field
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
    if limit is not None and limit < 1:
        raise GptkitError(f"--limit is {limit}; expected at least 1.")
    if task == CHAT_TASK:
        if prompt_field or target_field:
            raise GptkitError("--prompt-field and --target-field do not apply to --task chat.")
        return evaluate_chat(model_dir, data, limit=limit, out=out, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, device=device, progress=progress)
    directory = resolve_model_dir(model_dir)
    spec = load_task(directory, task, prompt_field=prompt_field, target_field=target_field,
                     quiet=not progress)
    examples = read_examples(data, spec, limit=limit)
    model, tokenizer = load_directory(directory, device)
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


def evaluate_chat(model_dir: str | Path, data: str | Path, *, limit: int | None = None,
                  out: str | Path | None = None, batch_size: int = 16,
                  max_new_tokens: int | None = None, device: str = "auto",
                  progress: bool = True) -> dict[str, float]:
    """`gptkit eval --task chat`: held-out conversations, scored two ways.

    The loss and perplexity of every assistant token (each turn's text and end-of-turn
    token, as fine-tuning weighs them), and the model's greedy answer in place of each
    conversation's last assistant turn, given the turns before it: SQuAD exact match and
    F1 against that turn, and the task's own metrics (BLEU and chrF, ROUGE) for records
    that name a "task" (translate, summarize or qa), over those records. A model without
    a chat template is scored on the plain transcript. `out` receives each conversation's
    prompt messages, prediction and reference. Each conversation must end with its last
    assistant turn, right after a user turn: turns after it would be neither asked nor
    scored, so they are refused rather than ignored.
    """
    if limit is not None and limit < 1:
        raise GptkitError(f"--limit is {limit}; expected at least 1.")
    directory = resolve_model_dir(model_dir)
    conversations = read_conversations(data, limit=limit)
    histories, references = [], []
    for conversation in conversations:
        history, reference = _question_and_answer(conversation)
        histories.append(history)
        references.append(reference)
    model, tokenizer = load_directory(directory, device)
    fmt = chat_format(tokenizer)
    if fmt.plain and progress:
        print(f"note: {model_dir} has no chat template; scoring it on a plain "
              "'User: ... Assistant: ...' transcript.", file=sys.stderr)
    block = model.config.block_size
    encoded = encode_conversations(tokenizer, fmt, conversations, block, str(data), progress)
    loss, tokens = lm_loss(model, iter_sft_batches(encoded, batch_size, tokenizer.pad_token_id),
                           model.device, pick_dtype("float32", model.device))
    if max_new_tokens is None:
        longest = max(len(tokenizer.encode(r)) for r in references) + 1  # and end-of-turn
        max_new_tokens = min(longest * 3 // 2 + 8, block // 2)
    prompts = []
    for history in histories:
        fitted = fit_prompt(tokenizer, fmt, history, block - max_new_tokens)
        kept = fitted[1] if fitted else history  # too long even alone: cut from the left
        prompts.append(fmt.render(kept, add_generation_prompt=True)[0])
    predictions = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, stop=fmt.stop or None)
    result: dict[str, float] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                                "tokens": tokens}
    result.update(qa_scores(predictions, [[r] for r in references]))
    for task in ("translate", "summarize"):
        rows = [i for i, c in enumerate(conversations) if c.task == task]
        if rows:
            examples = [Example({}, [references[i]], conversations[i].where) for i in rows]
            result.update(score(task, [predictions[i] for i in rows], examples))
    if out is not None:
        lines = [json.dumps({"messages": h, "prediction": p, "reference": r}, ensure_ascii=False)
                 for h, p, r in zip(histories, predictions, references, strict=True)]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), "\n".join(lines) + "\n")
    result["n"] = len(conversations)
    return result


def _question_and_answer(conversation: Conversation) -> tuple[list[Message], str]:
    """The turns up to a held-out conversation's last assistant turn, which must answer a
    user turn and end the conversation, and that turn's text (the reference)."""
    where, messages = conversation.where, conversation.messages
    if conversation.task not in (None, *CHAT_METRIC_TASKS):
        raise GptkitError(f"{where}: task '{conversation.task}' has no metrics here; expected "
                          f"one of {', '.join(CHAT_METRIC_TASKS)}.")
    if messages[-1]["role"] != "assistant":
        raise GptkitError(f"{where} ends with a {messages[-1]['role']} turn after its last "
                          "assistant turn; expected a held-out conversation to end with the "
                          "assistant turn the model's answer is scored against.")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        before = f"a {messages[-2]['role']} turn" if len(messages) > 1 else "nothing"
        raise GptkitError(f"{where}: its last assistant turn follows {before}; expected a user "
                          "turn before it (the model answers that turn in its place).")
    return messages[:-1], messages[-1]["content"]


def target_loss(model: Any, tokenizer: Any, spec: TaskSpec, examples: Sequence[Example],
                batch_size: int) -> dict[str, float]:
    """Mean loss and perplexity of the target tokens (and end-of-text) given the prompts."""
    encoded = encode_pairs(tokenizer, [spec.render(e) for e in examples],
                           model.config.block_size, "the data")
    loss, tokens = lm_loss(model, iter_sft_batches(encoded, batch_size, tokenizer.eos_token_id),
                           model.device, pick_dtype("float32", model.device))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _write_predictions(path: Path, prompts: Sequence[str], predictions: Sequence[str],
                       examples: Sequence[Example]) -> None:
    lines = [json.dumps({"prompt": p, "prediction": pred, "references": e.targets},
                        ensure_ascii=False)
             for p, pred, e in zip(prompts, predictions, examples, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
