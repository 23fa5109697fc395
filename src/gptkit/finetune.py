"""Supervised fine-tuning for a task, fully or with LoRA, through the one training loop.

    gptkit finetune --model runs/mine --task summarize --data train.jsonl --out runs/sum

Each JSONL record becomes `prompt + target + <|endoftext|>` (formatted by the task's
template, `gptkit.tasks`); only target tokens and the end-of-text carry loss, the prompt
is masked with IGNORE_INDEX. An example longer than the context loses the start of its
prompt. `SFTBatches` shuffles examples per epoch from the seed and resumes exactly;
`train.run_loop` does the rest. The output directory is a plain model directory (LoRA
merged) with the tokenizer and `gptkit_task.json`, so generation formats prompts alike.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptkit import distributed
from gptkit.checkpoint import resolve_model_dir
from gptkit.config import TrainConfig, closest
from gptkit.errors import GptkitError
from gptkit.lora import (
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merged_model,
    save_peft_adapter,
    trainable_parameters,
)
from gptkit.model import GPT
from gptkit.tasks import Example, TaskSpec, get_task, read_examples, task_file_writer
from gptkit.tokenizer import Tokenizer
from gptkit.train import (
    IGNORE_INDEX,
    LoopResult,
    build_model,
    check_run_dir,
    run_loop,
    tokenizer_files,
)

LORA_STATE_NAME = "lora_state.safetensors"  # adapters of a LoRA run, for --resume
ADAPTER_DIR = "adapter"  # where --save-adapter puts the peft files
DEFAULT_EPOCHS = 3.0

Encoded = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX on the prompt)


@dataclass
class FinetuneOptions:
    """The fine-tuning settings; stored in `TrainConfig.extra` (and so in train_config.json)."""

    task: str = ""
    val: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float = 0.0
    epochs: float | None = None  # None: TrainConfig.max_steps decides
    save_adapter: bool = False
    prompt_field: str | None = None
    target_field: str | None = None

    def __post_init__(self) -> None:
        get_task(self.task)  # an unknown task lists the known ones
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or self.lora_rank < 1):
            raise GptkitError(f"--lora-rank is {self.lora_rank}; expected an integer of at least 1.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise GptkitError(f"--lora-dropout is {self.lora_dropout}; expected a number in [0, 1).")
        if self.lora_rank is None and (self.save_adapter or self.lora_alpha is not None):
            raise GptkitError("--save-adapter and --lora-alpha need LoRA; pass --lora-rank too.")
        if self.epochs is not None and self.epochs <= 0:
            raise GptkitError(f"--epochs is {self.epochs}; expected a positive number.")

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> FinetuneOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in extra:
            if key not in names:
                raise GptkitError(f"Unknown fine-tuning setting '{key}'{closest(key, names)}; "
                                  f"expected some of: {', '.join(names)}.")
        return cls(**extra)


# -- examples to token ids ---------------------------------------------------------------

def encode_example(tokenizer: Tokenizer, spec: TaskSpec, example: Example,
                   max_tokens: int) -> tuple[Encoded, bool]:
    """(ids, labels) of one example within `max_tokens`, and whether it had to be cut.

    The prompt loses its beginning first; a target too long on its own keeps its start
    (and then has no end-of-text).
    """
    prompt = tokenizer.encode(spec.format_prompt(example.prompt))
    target = tokenizer.encode(spec.target_text(example.targets[0])) + [tokenizer.eos_token_id]
    cut = len(prompt) + len(target) > max_tokens
    if cut:
        target = target[:max_tokens - 1]  # one prompt token at least, so the target is predicted
        prompt = prompt[len(prompt) - (max_tokens - len(target)):]
    return (prompt + target, [IGNORE_INDEX] * len(prompt) + target), cut


def encode_examples(tokenizer: Tokenizer, spec: TaskSpec, examples: Sequence[Example],
                    block_size: int, name: str, progress: bool = True) -> list[Encoded]:
    """Every example encoded for a context of `block_size`; says how many were cut."""
    encoded, cut = [], 0
    for example in examples:
        pair, was_cut = encode_example(tokenizer, spec, example, block_size + 1)
        encoded.append(pair)
        cut += was_cut
    if cut and progress:
        print(f"note: {cut} of {len(examples)} examples in {name} are longer than the context of "
              f"{block_size} tokens; the beginning of their prompts was cut.", file=sys.stderr)
    return encoded


def collate(rows: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (x, y): x the ids but the last, y the labels shifted left by one."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


class SFTBatches:
    """Examples in a fresh seeded order every epoch, `batch_size` at a time; resumable.

    Under torchrun every rank walks the same order, taking `batch_size * world_size`
    examples per step and keeping its own slice, so ranks see disjoint examples.
    """

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not examples:
            raise GptkitError("no training examples; expected at least one record.")
        self.examples = examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pad_id = pad_id
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size * self.world_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            rows.append(self.examples[self._order[self.position]])
            self.position += 1
        return collate(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size],
                       self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle()


def iter_sft_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Examples in file order, for evaluation (the same batches every time)."""
    for n, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield collate(examples[start:start + batch_size], pad_id)


# -- the run -------------------------------------------------------------------------------

def finetune(cfg: TrainConfig, progress: bool = True) -> LoopResult:
    """`gptkit finetune`: train `cfg.init_from` on the task JSONL `cfg.data` into `cfg.out`.

    Settings of fine-tuning live in `cfg.extra` (see `FinetuneOptions`); `cfg.max_steps`
    is replaced by the number of steps `epochs` take when that is set. Under torchrun
    each process trains on its share of every batch (DDP), as `gptkit train` does.
    """
    return distributed.launch(_finetune, cfg, progress)


def _finetune(cfg: TrainConfig, info: distributed.DistInfo, progress: bool) -> LoopResult:
    opts = FinetuneOptions.from_extra(cfg.extra)
    spec = get_task(opts.task, opts.prompt_field, opts.target_field)
    if not cfg.init_from:
        raise GptkitError("gptkit finetune needs --model, the model directory to start from.")
    base_dir = resolve_model_dir(cfg.init_from)
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, cfg.resume)
    tokenizer = Tokenizer.from_pretrained(base_dir)
    model = _load_model(cfg, opts, base_dir, run_dir, tokenizer)
    block_size = cfg.block_size or model.config.block_size
    train_set = encode_examples(tokenizer, spec, read_examples(cfg.data, spec), block_size,
                                cfg.data, progress)
    val_set = (encode_examples(tokenizer, spec, read_examples(opts.val, spec), block_size,
                               opts.val, progress) if opts.val else None)
    if opts.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * info.world_size
        steps = max(1, math.ceil(opts.epochs * len(train_set) / per_step))
        cfg = dataclasses.replace(cfg, max_steps=steps)
    eos = tokenizer.eos_token_id
    eval_batches = None
    if val_set:
        def eval_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iter_sft_batches(val_set, cfg.batch_size, eos, cfg.eval_steps)
    save_extra = {**tokenizer_files(tokenizer), **task_file_writer(spec)}
    if opts.lora_rank:
        save_extra[LORA_STATE_NAME] = lambda p: _save_tensors(lora_state_dict(model), p)
    if progress:
        print(f"fine-tuning for '{spec.task}' on {len(train_set):,} examples for {cfg.max_steps} "
              f"steps; {trainable_parameters(model):,} of {model.num_params():,} parameters train"
              + (f" (LoRA rank {opts.lora_rank})" if opts.lora_rank else ""), file=sys.stderr)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    batches = SFTBatches(train_set, cfg.batch_size, cfg.seed, eos, info.rank, info.world_size)
    result = run_loop(model, cfg, batches, eval_batches, run_dir, save_extra=save_extra,
                      prepare_model=merged_model if opts.lora_rank else None, progress=progress,
                      info=info)
    if opts.save_adapter and info.is_main:
        save_peft_adapter(model, run_dir / ADAPTER_DIR, base_model=str(Path(base_dir).resolve()))
    return result


def _load_model(cfg: TrainConfig, opts: FinetuneOptions, base_dir: Path, run_dir: Path,
                tokenizer: Tokenizer) -> GPT:
    """The model to train: the base (plus LoRA), or the run's own weights on --resume.

    A LoRA run resumes from the frozen base and its saved adapters, which is exact; a
    full fine-tune resumes from the weights in the run directory.
    """
    full_resume = cfg.resume and not opts.lora_rank
    start = dataclasses.replace(cfg, init_from=str(run_dir if full_resume else base_dir))
    model = build_model(start, tokenizer.vocab_size, tokenizer.eos_token_id)
    if opts.lora_rank:
        torch.manual_seed(cfg.seed)  # adapters start from the seed: runs repeat exactly
        apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
        if cfg.resume:
            _load_adapters(model, run_dir / LORA_STATE_NAME)
    return model


def _load_adapters(model: GPT, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise GptkitError(f"--resume with --lora-rank: {path.parent} holds no adapters "
                          f"({path.name}); it was not a LoRA run.")
    load_lora_state_dict(model, load_file(str(path)), str(path))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def train_settings(**kwargs: Any) -> TrainConfig:
    """A `TrainConfig` for fine-tuning from keyword arguments of both kinds, for Python users:

        finetune(train_settings(init_from="runs/mine", data="train.jsonl", out="runs/sum",
                                task="summarize", lora_rank=8, epochs=2))
    """
    names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    extra = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    given = rest.pop("extra", {})
    return TrainConfig(**rest, extra={**given, **extra})
