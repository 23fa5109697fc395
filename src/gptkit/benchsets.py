"""The benchmark sets: the vendored files in data/eval, their three formats, and prompts.

A set is a list of items in one of the formats the llm-foundry / nanochat eval bundle uses
(one JSON object per line) or llama.cpp's HellaSwag text (six lines an item):

- multiple choice `{"query", "choices", "gold"}`: which continuation follows the query;
- schema `{"context_options", "continuation", "gold"}`: which context the shared
  continuation follows (WinoGrande);
- language modelling `{"context", "continuation"}`: does greedy decoding reproduce it.

Every item becomes `Requests`: (context, continuation) text pairs, few-shot examples and
the delimiters of lm-evaluation-harness (" " between context and continuation, a blank
line between examples) already in the text, so a scorer only sees pairs.
"""

from __future__ import annotations

import bz2
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from gptkit.errors import GptkitError

EVAL_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"  # in a source checkout
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
RESULTS_NAME = "eval_results.json"  # beside the model: what `gptkit info` shows
FEWSHOT_SEED = 1234  # nanochat's: item i draws its shots with random.Random(1234 + i)

# name: (file in data/eval, what it measures)
SETS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc_easy.jsonl", "grade-school science questions (easy split)"),
    "arc_challenge": ("arc_challenge.jsonl", "grade-school science questions (hard split)"),
    "boolq": ("boolq.jsonl.gz", "yes/no questions about a Wikipedia passage"),
    "copa": ("copa.jsonl", "choice of plausible cause or effect"),
    "hellaswag": ("hellaswag_val.txt.bz2", "commonsense sentence completion"),
    "lambada_openai": ("lambada_openai.jsonl.gz", "the last word of a passage"),
    "openbook_qa": ("openbook_qa.jsonl", "elementary science with an open book of facts"),
    "piqa": ("piqa.jsonl", "physical commonsense: which of two solutions works"),
    "winogrande": ("winogrande.jsonl", "pronoun resolution (Winograd schema)"),
}
KINDS = ("multiple_choice", "schema", "language_modeling")


@dataclass(frozen=True)
class Item:
    """One test item: `kind` says how `options` (contexts or continuations) are read."""

    kind: str
    context: str  # the query (multiple choice, language modelling) or "" (schema)
    options: tuple[str, ...]  # choices, or the schema's context options
    continuation: str  # the schema's shared continuation, the LM's target, or ""
    gold: int


@dataclass(frozen=True)
class Requests:
    """An item as text pairs: `pairs[i]` = (context, continuation) of option i."""

    pairs: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]  # option i's text as lm-eval measures its length
    gold: int


def _open_text(path: Path) -> str:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def resolve(name: str) -> Path:
    """The file of a vendored set's `name`, or `name` itself when it is a file."""
    if name in SETS:
        path = EVAL_DIR / SETS[name][0]
        if not path.is_file():
            raise GptkitError(f"The benchmark file {path} is missing; the vendored sets live in "
                              "the repository's data/eval (a source checkout), or pass a path.")
        return path
    path = Path(name)
    if path.is_file():
        return path
    raise GptkitError(f"Unknown benchmark {name!r}; choose from {', '.join(sorted(SETS))}, "
                      "core, or give a JSONL file.")


def read_items(path: Path) -> list[Item]:
    """Every item of a set file, each line checked: one sentence names a line that fits no format."""
    text = _open_text(path)
    if path.name.startswith("hellaswag") and path.suffixes[:1] == [".txt"]:
        return _hellaswag(text, path)
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(_item(line, path, number))
    if not items:
        raise GptkitError(f"{path} holds no items.")
    return items


def _hellaswag(text: str, path: Path) -> list[Item]:
    """llama.cpp's --hellaswag file: context, gold index, then four endings per item."""
    lines = text.splitlines()
    if len(lines) % 6:
        raise GptkitError(f"{path} has {len(lines)} lines; llama.cpp's HellaSwag text has six per item.")
    return [Item("multiple_choice", lines[i], tuple(lines[i + 2:i + 6]), "", int(lines[i + 1]))
            for i in range(0, len(lines), 6)]


def _item(line: str, path: Path, number: int) -> Item:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise GptkitError(f"{where} is not JSON.") from None
    if not isinstance(record, dict):
        record = {}
    if _strings(record.get("choices")) and isinstance(record.get("query"), str):
        item = Item("multiple_choice", record["query"], tuple(record["choices"]), "",
                    record.get("gold"))
    elif _strings(record.get("context_options")) and isinstance(record.get("continuation"), str):
        item = Item("schema", "", tuple(record["context_options"]), record["continuation"],
                    record.get("gold"))
    elif isinstance(record.get("context"), str) and isinstance(record.get("continuation"), str):
        return Item("language_modeling", record["context"], (record["continuation"],),
                    record["continuation"], 0)
    else:
        raise GptkitError(f"{where} is in none of the three formats: {{query, choices, gold}}, "
                          "{context_options, continuation, gold} or {context, continuation}.")
    if not isinstance(item.gold, int) or isinstance(item.gold, bool) \
            or not 0 <= item.gold < len(item.options):
        raise GptkitError(f"{where}: gold {item.gold!r} is not an index of its "
                          f"{len(item.options)} options.")
    return item


def _strings(value: object) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def shots_for(items: list[Item], index: int, k: int) -> list[Item]:
    """`k` examples for item `index`, drawn reproducibly from the other items of its file."""
    if k < 0:
        raise GptkitError(f"--num-fewshot {k} must be 0 or more.")
    if k == 0:
        return []
    if k > len(items) - 1:
        raise GptkitError(f"{k} shots need {k + 1} items but the set has {len(items)}.")
    rng = random.Random(FEWSHOT_SEED + index)
    others = [i for i in range(len(items)) if i != index]
    return [items[i] for i in rng.sample(others, k)]


def _solved(item: Item) -> str:
    """A few-shot example: the item with its right answer."""
    if item.kind == "schema":
        return item.options[item.gold] + TARGET_DELIMITER + item.continuation
    return item.context + TARGET_DELIMITER + item.options[item.gold]


def requests(item: Item, shots: list[Item]) -> Requests:
    """The item's (context, continuation) pairs, `shots` before each context."""
    prefix = "".join(_solved(s) + FEWSHOT_DELIMITER for s in shots)
    if item.kind == "schema":
        pairs = tuple((prefix + option, TARGET_DELIMITER + item.continuation)
                      for option in item.options)
    else:
        pairs = tuple((prefix + item.context, TARGET_DELIMITER + option) for option in item.options)
    return Requests(pairs, item.options, item.gold)
