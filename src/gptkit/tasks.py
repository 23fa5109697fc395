"""Tasks: prompt templates, JSONL fields, and running a fine-tuned model on a task.

A task turns one JSONL record into a prompt (through a template) and a target. The
template is saved with the fine-tuned model as `gptkit_task.json`, so fine-tuning,
evaluation, `gptkit generate --task` and `run_task` all format prompts the same way:

    from gptkit.tasks import load_task, run_task
    spec = load_task("runs/sum", "summarize")
    print(run_task(model, tokenizer, spec, ["A long document ..."])[0])

| task | fields (prompt ...; target) | metrics (`gptkit.evaluate`) |
| --- | --- | --- |
| translate | source (+ source_lang, target_lang); target | BLEU, chrF |
| summarize | document; summary | ROUGE-1/2/L |
| qa | context, question; answers (list, train on the first) | exact match, F1 |
| instruct | instruction, input (optional); output | loss, perplexity |
| completion | prompt; completion | loss, perplexity |
"""

from __future__ import annotations

import dataclasses
import json
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.data import jsonl_records
from gptkit.errors import GptkitError, closest, read_json

if TYPE_CHECKING:
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer

TASK_FILE = "gptkit_task.json"
TASK_FILE_VERSION = 1


@dataclass
class TaskSpec:
    """One task's template and field names; what `gptkit_task.json` stores.

    `template` is a `str.format` string over the prompt fields; a paragraph of it
    (text between blank lines) whose fields are all empty is left out, which is how
    optional fields (an instruction's `input`) drop their heading. The target follows
    the prompt after `target_prefix` (a space, so BPE sees words as in running text).
    `fields` maps each field's role to its name in the JSONL records.
    """

    task: str
    template: str
    target_prefix: str
    prompt_fields: tuple[str, ...]
    target_field: str
    optional: dict[str, str] = field(default_factory=dict)  # role -> default value
    fields: dict[str, str] = field(default_factory=dict)  # role -> JSONL name
    target_is_list: bool = False  # qa: several accepted answers

    def name_of(self, role: str) -> str:
        return self.fields.get(role, role)

    def format_prompt(self, record: dict[str, Any]) -> str:
        """The prompt for a record given by role (defaults filled, empty paragraphs dropped)."""
        values = {**self.optional, **{k: v for k, v in record.items() if v != ""}}
        paragraphs = []
        for paragraph in self.template.split("\n\n"):
            names = [n for _, n, _, _ in string.Formatter().parse(paragraph) if n]
            if names and all(values.get(n, "") == "" for n in names):
                continue
            paragraphs.append(paragraph.format_map(_Blank(values)))
        return "\n\n".join(paragraphs)

    def target_text(self, target: str) -> str:
        return self.target_prefix + target

    def render(self, example: Example) -> tuple[str, str]:
        """(prompt text, target text) of a training example: its first target."""
        return self.format_prompt(example.prompt), self.target_text(example.targets[0])

    def to_dict(self) -> dict[str, Any]:
        return {"version": TASK_FILE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> TaskSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in values.items() if k != "version"}
            if set(values) - names:
                raise TypeError(f"unknown keys {sorted(set(values) - names)}")
            spec = cls(**values)
        except TypeError as exc:
            raise GptkitError(f"{source} is not a gptkit task file ({exc}).") from None
        spec.prompt_fields = tuple(spec.prompt_fields)
        if spec.task not in TASKS:
            raise GptkitError(f"{source} names the unknown task '{spec.task}'; "
                              f"expected one of {', '.join(TASKS)}.")
        return spec


class _Blank(dict):
    """Formatting values where a missing optional field reads as empty."""

    def __missing__(self, key: str) -> str:
        return ""


TASKS: dict[str, TaskSpec] = {
    "translate": TaskSpec(
        "translate", "{source_lang}: {source}\n{target_lang}:", " ",
        ("source",), "target",
        optional={"source_lang": "English", "target_lang": "Chinese"}),
    # GPT-2's zero-shot summarisation prompt (Radford et al. 2019, section 3.6)
    "summarize": TaskSpec("summarize", "{document}\nTL;DR:", " ", ("document",), "summary"),
    "qa": TaskSpec("qa", "{context}\nQuestion: {question}\nAnswer:", " ",
                   ("context", "question"), "answers", target_is_list=True),
    # the Alpaca layout (Taori et al. 2023), Input paragraph left out when empty
    "instruct": TaskSpec(
        "instruct", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "", ("instruction", "input"), "output", optional={"input": ""}),
    "completion": TaskSpec("completion", "{prompt}", "", ("prompt",), "completion"),
}
# The field `--prompt-field` renames: the one a user's data is most likely to call otherwise.
MAIN_PROMPT_FIELD = {"translate": "source", "summarize": "document", "qa": "question",
                     "instruct": "instruction", "completion": "prompt"}


def get_task(name: str, prompt_field: str | None = None, target_field: str | None = None
             ) -> TaskSpec:
    """The built-in task `name`, with the JSONL field names overridden where given."""
    if name not in TASKS:
        raise GptkitError(f"Unknown task '{name}'{closest(name, tuple(TASKS))}; "
                          f"expected one of {', '.join(TASKS)}.")
    spec = dataclasses.replace(TASKS[name], fields={})
    return rename_fields(spec, prompt_field, target_field)


def rename_fields(spec: TaskSpec, prompt_field: str | None, target_field: str | None) -> TaskSpec:
    """`spec` reading its main prompt field and its target from other JSONL names."""
    fields = dict(spec.fields)
    if prompt_field:
        fields[MAIN_PROMPT_FIELD[spec.task]] = prompt_field
    if target_field:
        fields[spec.target_field] = target_field
    return dataclasses.replace(spec, fields=fields)


# -- gptkit_task.json -------------------------------------------------------------------

def task_file_writer(spec: TaskSpec) -> dict[str, Any]:
    """A `save_extra` entry writing `gptkit_task.json` into a checkpoint commit."""
    from gptkit.checkpoint import write_json

    return {TASK_FILE: lambda p: write_json(p, spec.to_dict())}


def read_task_file(model_dir: str | Path) -> TaskSpec | None:
    """The template stored with a fine-tuned model, or None for a plain model."""
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        return None
    values = read_json(path)
    if not isinstance(values, dict):
        raise GptkitError(f"{path} must hold a JSON object.")
    return TaskSpec.from_dict(values, str(path))


def load_task(model_dir: str | Path, task: str | None = None, *, prompt_field: str | None = None,
              target_field: str | None = None, quiet: bool = False) -> TaskSpec:
    """The template to run `task` with on the model in `model_dir`.

    The stored template when the model was fine-tuned for `task` (or `task` is None);
    the built-in one, with a note, for a model fine-tuned for nothing (a base model).
    """
    stored = read_task_file(model_dir)
    if stored is None and task is None:
        raise GptkitError(f"{model_dir} has no task template ({TASK_FILE}); pass --task with one "
                          f"of {', '.join(TASKS)} or fine-tune it with `gptkit finetune --task`.")
    if stored is None:
        spec = get_task(task)  # type: ignore[arg-type]
        if not quiet:
            print(f"note: {model_dir} was not fine-tuned for a task; using the built-in "
                  f"'{task}' template.", file=sys.stderr)
    elif task is not None and task != stored.task:
        raise GptkitError(f"{model_dir} was fine-tuned for '{stored.task}' and knows no template "
                          f"for '{task}'; use --task {stored.task} or another model.")
    else:
        spec = stored
    return rename_fields(spec, prompt_field, target_field)


# -- JSONL records ----------------------------------------------------------------------

@dataclass
class Example:
    """One record read for a task: prompt fields by role, the targets, and where it came from."""

    prompt: dict[str, str]
    targets: list[str]
    where: str


def read_examples(path: str | Path, spec: TaskSpec, *, limit: int | None = None,
                  require_target: bool = True) -> list[Example]:
    """Every record of a JSONL file, checked: one clear error with file and line number."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist or is not a file; expected a JSONL file.")
    examples = []
    for where, record in jsonl_records(path):
        examples.append(parse_record(record, spec, where, require_target))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise GptkitError(f"{path} holds no records; expected one JSON object per line.")
    return examples


def parse_record(record: Any, spec: TaskSpec, where: str, require_target: bool = True) -> Example:
    """Read a record's prompt fields and targets by the names `spec` gives them."""
    if not isinstance(record, dict):
        raise GptkitError(f"{where} is a JSON {type(record).__name__}; expected an object with "
                          f"the fields {', '.join(_expected(spec))}.")
    prompt = {}
    for role in (*spec.prompt_fields, *(r for r in spec.optional if r not in spec.prompt_fields)):
        name = spec.name_of(role)
        if name not in record:
            if role in spec.optional:
                continue
            raise GptkitError(f"{where} has no field '{name}' (expected {', '.join(_expected(spec))}"
                              f"; rename with --prompt-field/--target-field).")
        value = record[name]
        if not isinstance(value, str):
            raise GptkitError(f"{where}: field '{name}' is a {type(value).__name__}; "
                              "expected a string.")
        prompt[role] = value
    targets: list[str] = []
    name = spec.name_of(spec.target_field)
    if name in record:
        targets = _targets(record[name], name, spec, where)
    elif require_target:
        raise GptkitError(f"{where} has no field '{name}' (expected {', '.join(_expected(spec))}"
                          f"; rename with --prompt-field/--target-field).")
    return Example(prompt, targets, where)


def _targets(value: Any, name: str, spec: TaskSpec, where: str) -> list[str]:
    if spec.target_is_list:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise GptkitError(f"{where}: field '{name}' must be a non-empty list of strings.")
    elif isinstance(value, str):
        values = [value]
    else:
        raise GptkitError(f"{where}: field '{name}' is a {type(value).__name__}; expected a string.")
    if not values[0].strip():
        raise GptkitError(f"{where}: field '{name}' is empty; expected the target text.")
    return values


def _expected(spec: TaskSpec) -> list[str]:
    return [spec.name_of(r) for r in (*spec.prompt_fields, spec.target_field)
            if r not in spec.optional]


def as_examples(inputs: str | Sequence[str | dict[str, Any] | Example], spec: TaskSpec
                ) -> list[Example]:
    """Texts (the main prompt field), records or examples, as examples."""
    if isinstance(inputs, str):
        inputs = [inputs]
    main = spec.name_of(MAIN_PROMPT_FIELD[spec.task])
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, Example):
            out.append(item)
            continue
        record = {main: item} if isinstance(item, str) else item
        out.append(parse_record(record, spec, f"input {i + 1}", require_target=False))
    return out


def read_inputs(value: str, spec: TaskSpec) -> list[Example]:
    """`--input`: a JSONL file of records, another file holding one text, one JSON record
    (for tasks of several fields), or the text itself."""
    path = Path(value)
    if path.suffix == ".jsonl" and path.is_file():
        return read_examples(path, spec, require_target=False)
    if path.is_file():
        return as_examples(path.read_bytes().decode("utf-8", errors="replace"), spec)
    if value.lstrip().startswith("{"):
        try:
            return as_examples([json.loads(value)], spec)
        except json.JSONDecodeError:
            pass  # text that merely starts with a brace
    return as_examples(value, spec)


def read_task_inputs(model_dir: str | Path, task: str | None, prompt: str | None,
                     input: str | None, *, num_beams: int = 1, draft_model: str | None = None,
                     num_return_sequences: int = 1) -> tuple[TaskSpec, list[Example]]:
    """`gptkit generate --task/--input`: the template to run and the inputs to run it on,
    from exactly one of the prompt argument or --input; read before the model loads.
    Task outputs are generated in batches, one per input, greedy or sampled: several
    sequences, beams and a draft model are refused rather than ignored."""
    spec = load_task(model_dir, task)
    if (prompt is None) == (input is None):
        raise GptkitError("gptkit generate --task needs exactly one of a prompt argument or --input.")
    if num_return_sequences != 1:
        raise GptkitError("--num-return-sequences works with plain prompts only, not --task/--input.")
    if num_beams != 1 or draft_model is not None:
        raise GptkitError("--task/--input does not combine with --num-beams or --draft-model; "
                          "task outputs are generated greedily or sampled.")
    return spec, read_inputs(input if input is not None else prompt, spec)


# -- running a task -----------------------------------------------------------------------

def run_task(model: GPT, tokenizer: Tokenizer, task: TaskSpec | str,
             inputs: str | Sequence[str | dict[str, Any] | Example], *, max_new_tokens: int = 64,
             batch_size: int = 16, progress: bool = False, **generate_kwargs: Any) -> list[str]:
    """Generate the task's output for each input (a text or a record); greedy by default.

    Prompts are formatted with the task template, batched (left padded), cut from the
    left to fit the context, and generation stops at end-of-text.
    """
    spec = get_task(task) if isinstance(task, str) else task
    prompts = [spec.format_prompt(e.prompt) for e in as_examples(inputs, spec)]
    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress, **generate_kwargs)


def generate_texts(model: GPT, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
                   batch_size: int, progress: bool = False, **generate_kwargs: Any) -> list[str]:
    """Completions of `prompts` up to end-of-text, in length-sorted batches."""
    import torch
    from tqdm.auto import tqdm

    from gptkit.generate import generate

    sequences = generate_kwargs.get("num_return_sequences", 1)
    if sequences != 1:
        raise GptkitError(f"task generation gives one output per prompt; num_return_sequences "
                          f"must be 1, got {sequences!r}.")
    if not prompts:
        return []
    keep = model.config.block_size - max_new_tokens
    if keep < 1:
        raise GptkitError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {model.config.block_size} tokens.")
    encoded = [tokenizer.encode(p) or [tokenizer.eos_token_id] for p in prompts]
    cut = sum(len(ids) > keep for ids in encoded)
    if cut:
        print(f"note: {cut} of {len(prompts)} prompts are longer than the context allows "
              f"({keep} tokens); their beginnings were cut.", file=sys.stderr)
    encoded = [ids[-keep:] for ids in encoded]
    # sorting by length keeps padding (wasted compute) small within each batch
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    device = model.device
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), disable=not progress, unit="example", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        out = generate(model, ids.to(device), attention_mask=mask.to(device),
                       max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                       tokenizer=tokenizer, **generate_kwargs)
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            new = new[:new.index(eos)] if eos in new else new
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        bar.update(len(rows))
    bar.close()
    model.train(was_training)
    return outputs
