"""Supervised fine-tuning for a task, fully or with LoRA, through the one training loop.

    gptkit finetune --model runs/mine --task summarize --data train.jsonl --out runs/sum

Each JSONL record is rendered by the task's template (`gptkit.tasks`) and encoded with its
loss mask (`gptkit.sft`); `train.run_loop` does the rest. The output directory is a plain model directory (LoRA
merged) with the tokenizer and `gptkit_task.json`, so generation formats prompts alike.

`--task chat` trains on conversations (`gptkit.conversation`): the base tokenizer gains
the ChatML tokens and template, the model rows for them (`gptkit.vocab`), the loss falls
on the assistant's turns, and short conversations are packed several to a row. Its
output names <|im_end|> as eos in the tokenizer and generation_config.json.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gptkit import distributed
from gptkit.checkpoint import GENERATION_CONFIG_NAME, resolve_model_dir, write_json
from gptkit.config import FinetuneOptions, TrainConfig
from gptkit.conversation import (
    CHAT_TASK,
    add_chat_tokens,
    chat_format,
    encode_conversations,
    read_conversations,
    stop_token_ids,
)
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
from gptkit.sft import SFTBatches, encode_pairs, iter_sft_batches, pack
from gptkit.tasks import get_task, read_examples, task_file_writer
from gptkit.tokenizer import Tokenizer
from gptkit.train import (
    LoopResult,
    build_model,
    check_extras,
    check_run_dir,
    run_loop,
    tokenizer_files,
)
from gptkit.vocab import fold_rows, grow_vocab, load_row_deltas, row_deltas, train_rows

LORA_STATE_NAME = "lora_state.safetensors"  # adapters of a LoRA run, for --resume
ROWS_PREFIX = "vocab_rows."  # new token rows of a LoRA run, in the same file
ADAPTER_DIR = "adapter"  # where --save-adapter puts the peft files
DEFAULT_EPOCHS = 3.0

Encoded = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX on the prompt)


# -- the run -------------------------------------------------------------------------------

def choose_epochs(epochs: float | None, max_steps: int | None) -> float | None:
    """How many epochs a run trains for: `epochs`, else DEFAULT_EPOCHS unless `max_steps`
    ends the run instead (None). One of them decides, so giving both is refused."""
    if epochs is not None and max_steps is not None:
        raise GptkitError("Pass either --epochs or --max-steps, not both.")
    return DEFAULT_EPOCHS if epochs is None and max_steps is None else epochs


def finetune(cfg: TrainConfig, progress: bool = True) -> LoopResult:
    """`gptkit finetune`: train `cfg.init_from` on the task JSONL `cfg.data` into `cfg.out`.

    Settings of fine-tuning live in `cfg.finetune` (`FinetuneOptions`); `cfg.max_steps`
    is replaced by the number of steps `epochs` take when that is set. Under torchrun
    each process trains on its share of every batch (DDP), as `gptkit train` does.
    """
    check_extras(cfg)
    return distributed.launch(_finetune, cfg, progress)


def _finetune(cfg: TrainConfig, info: distributed.DistInfo, progress: bool) -> LoopResult:
    opts = cfg.finetune
    if opts is None:
        raise GptkitError("gptkit finetune needs its options (--task, ...); cfg.finetune is unset.")
    chat = opts.task == CHAT_TASK
    if chat and (opts.prompt_field or opts.target_field):
        raise GptkitError("--prompt-field and --target-field do not apply to --task chat, whose "
                          "records hold messages (or ShareGPT conversations).")
    spec = None if chat else get_task(opts.task, opts.prompt_field, opts.target_field)
    if not cfg.init_from:
        raise GptkitError("gptkit finetune needs --model, the model directory to start from.")
    base_dir = resolve_model_dir(cfg.init_from)
    run_dir = Path(cfg.out)
    check_run_dir(run_dir, cfg.resume)
    tokenizer = Tokenizer.from_pretrained(base_dir)
    new_rows = range(tokenizer.vocab_size, tokenizer.vocab_size)
    if chat:  # read (and check) the data before anything slower happens
        conversations = read_conversations(cfg.data)
        val_conversations = read_conversations(opts.val) if opts.val else None
        add_chat_tokens(tokenizer)
        new_rows = range(new_rows.start, tokenizer.vocab_size)
    model = _load_model(cfg, opts, base_dir, run_dir, tokenizer, new_rows)
    block_size = cfg.block_size or model.config.block_size
    if chat:
        fmt = chat_format(tokenizer)
        train_set = encode_conversations(tokenizer, fmt, conversations, block_size, cfg.data,
                                         progress)
        val_set = (encode_conversations(tokenizer, fmt, val_conversations, block_size, opts.val,
                                        progress) if val_conversations else None)
    else:
        train_set = encode_pairs(tokenizer, [spec.render(e) for e in read_examples(cfg.data, spec)],
                                 block_size, cfg.data, progress)
        val_set = (encode_pairs(tokenizer, [spec.render(e) for e in read_examples(opts.val, spec)],
                                block_size, opts.val, progress) if opts.val else None)
    examples = len(train_set)
    packed = opts.pack if opts.pack is not None else (
        chat and sum(len(ids) for ids, _ in train_set) / examples <= block_size / 2)
    if packed:  # rows of the context's width, several examples each
        train_set = pack(train_set, block_size)
        val_set = pack(val_set, block_size) if val_set else None
    if opts.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * info.world_size
        steps = max(1, math.ceil(opts.epochs * len(train_set) / per_step))
        cfg = dataclasses.replace(cfg, max_steps=steps)
    pad = tokenizer.pad_token_id
    eval_batches = None
    if val_set:
        def eval_batches() -> Iterator[tuple[torch.Tensor, ...]]:
            return iter_sft_batches(val_set, cfg.batch_size, pad, cfg.eval_steps, packed=packed)
    save_extra = tokenizer_files(tokenizer)
    if chat:  # transformers' and vLLM's generate stop where gptkit stops: at <|im_end|>
        generation = {"bos_token_id": pad, "eos_token_id": stop_token_ids(tokenizer),
                      "pad_token_id": pad}
        save_extra[GENERATION_CONFIG_NAME] = lambda p: write_json(p, generation)
    else:
        save_extra.update(task_file_writer(spec))
    if opts.lora_rank:
        save_extra[LORA_STATE_NAME] = lambda p: _save_tensors(
            {**lora_state_dict(model), **{ROWS_PREFIX + k: v for k, v in row_deltas(model).items()}}, p)
    if progress:
        layout = (f" packed into {len(train_set):,} rows of up to {block_size} tokens"
                  if packed else "")
        print(f"fine-tuning for '{opts.task}' on {examples:,} "
              f"{'conversations' if chat else 'examples'}{layout} for {cfg.max_steps} steps; "
              f"{trainable_parameters(model):,} of {model.num_params():,} parameters train"
              + (f" (LoRA rank {opts.lora_rank})" if opts.lora_rank else "")
              + (f"; {len(new_rows)} new tokens" if new_rows else ""), file=sys.stderr)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    batches = SFTBatches(train_set, cfg.batch_size, cfg.seed, pad, info.rank, info.world_size,
                         packed=packed)
    result = run_loop(model, cfg, batches, eval_batches, run_dir, save_extra=save_extra,
                      prepare_model=_merged if opts.lora_rank else None, progress=progress,
                      info=info)
    if opts.save_adapter and info.is_main:
        save_peft_adapter(model, run_dir / ADAPTER_DIR, base_model=str(Path(base_dir).resolve()))
        if new_rows and progress:
            print(f"note: {run_dir / ADAPTER_DIR} holds the adapters only, not the rows of the "
                  f"{len(new_rows)} new tokens; {run_dir} itself is the complete model.",
                  file=sys.stderr)
    return result


def _merged(model: GPT) -> GPT:
    """What a LoRA run saves: a copy with the adapters and any new token rows folded in."""
    return fold_rows(merged_model(model))


def _load_model(cfg: TrainConfig, opts: FinetuneOptions, base_dir: Path, run_dir: Path,
                tokenizer: Tokenizer, new_rows: range) -> GPT:
    """The model to train: the base (plus LoRA), or the run's own weights on --resume.

    A LoRA run resumes from the frozen base and its saved adapters, which is exact; a
    full fine-tune resumes from the weights in the run directory. Tokens the tokenizer
    gained (`new_rows`, chat tokens) get rows initialised from the base's; a LoRA run
    trains those rows besides its adapters.
    """
    full_resume = cfg.resume and not opts.lora_rank
    start = dataclasses.replace(cfg, init_from=str(run_dir if full_resume else base_dir))
    base_vocab = tokenizer.vocab_size if full_resume else new_rows.start
    model = build_model(start, base_vocab, tokenizer.eos_token_id)
    if new_rows and not full_resume:
        grow_vocab(model, tokenizer.vocab_size, new_rows, seed=cfg.seed)
    if tokenizer.chat_template is not None:
        model.config.eos_token_id = tokenizer.eos_token_id  # the end-of-turn token
    if opts.lora_rank:
        torch.manual_seed(cfg.seed)  # adapters start from the seed: runs repeat exactly
        apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
        if new_rows:
            train_rows(model, new_rows)
        if cfg.resume:
            _load_adapters(model, run_dir / LORA_STATE_NAME)
    return model


def _load_adapters(model: GPT, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise GptkitError(f"--resume with --lora-rank: {path.parent} holds no adapters "
                          f"({path.name}); it was not a LoRA run.")
    state = load_file(str(path))
    rows = {k[len(ROWS_PREFIX):]: v for k, v in state.items() if k.startswith(ROWS_PREFIX)}
    load_lora_state_dict(model, {k: v for k, v in state.items() if not k.startswith(ROWS_PREFIX)},
                         str(path))
    load_row_deltas(model, rows)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def train_settings(**kwargs: Any) -> TrainConfig:
    """A `TrainConfig` for fine-tuning from keyword arguments of both kinds, for Python users:

        finetune(train_settings(init_from="runs/mine", data="train.jsonl", out="runs/sum",
                                task="summarize", lora_rank=8, epochs=2))
    """
    names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    options = FinetuneOptions(**{k: v for k, v in kwargs.items() if k in names})
    return TrainConfig(**{k: v for k, v in kwargs.items() if k not in names}, finetune=options)
