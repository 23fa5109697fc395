"""Tiny char-level model directories and JSONL files for the fine-tuning tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from gptkit import GPT, GPTConfig, Tokenizer

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def make_model_dir(path: Path, *, n_embd: int = 32, block_size: int = 64, chars: str = CHARS,
                   seed: int = 0) -> Path:
    """A random 2-layer GPT and a char tokenizer over `chars`, saved as a model directory."""
    tokenizer = Tokenizer.train(texts=[chars], kind="char", vocab_size=len(set(chars)) + 2)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2,
                       n_head=4, n_embd=n_embd, eos_token_id=tokenizer.eos_token_id)
    GPT(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path
