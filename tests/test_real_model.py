"""A real published model, as users have it: SmolLM2-135M-Instruct in the Q4_1 GGUF file that
llama.cpp's own converter and quantizer wrote (the `smollm2_gguf` fixture). `gptkit import`
turns it into a Hugging Face directory that transformers opens with the same logits; its
tokenizer gives llama.cpp's token ids; gptkit's greedy tokens are llama.cpp's on the same
weights (gptkit's f32 re-export: the quantized original differs by llama.cpp's activation
rounding); and it answers a question through `gptkit chat`'s code path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export_gguf import assert_greedy_matches, run_llamacpp

from gptkit import GPT, Tokenizer
from gptkit.chat import ChatSession

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "北京是中国的首都，上海是最大的城市。",
    "Emoji: 🚀🔥👍🏽 and ZWJ 👨‍👩‍👧 family",
    "def f(x):\n\treturn x ** 2  # square\n\n\n",
    "spaces:    four,        eight, and a tab\tthen\r\nCRLF",
    "Numbers 12345 and 3.14159 and 1,000,000 in 2024.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé ÀÉÎÕÜ ß ø œ — “quotes” … ‘single’",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was",
           "The three primary colors are", "import numpy as np\n", "Water boils at"]
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory) -> dict[str, Any]:
    """The imported directory, its f32 re-export, and what llama.cpp makes of both files."""
    from gptkit.export.gguf import export_gguf
    from gptkit.export.gguf_import import import_gguf

    root = tmp_path_factory.mktemp("smollm2")
    directory = import_gguf(smollm2_gguf, root / "smol")
    export_gguf(directory, root / "smol-f32.gguf", dtype="f32", progress=False)
    tokenizer = Tokenizer.from_pretrained(directory)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    jobs = {"models": [
        {"path": str(smollm2_gguf), "tokenize": TEXTS},
        {"path": str(root / "smol-f32.gguf"), "tokenize": TEXTS, "greedy": prompts,
         "max_tokens": GREEDY_TOKENS, "context": 128, "threads": 2},
    ]}
    original, f32 = run_llamacpp(jobs, root)["models"]
    return dict(dir=directory, tokenizer=tokenizer, prompts=prompts, original=original, f32=f32)


def test_import_keeps_the_files_metadata(smol):
    """Keys llama.cpp's converter leaves out take llama.cpp's defaults (head size = width /
    heads), the missing output head means a tied one, the chat template and end of turn
    come along."""
    model = GPT.from_pretrained(smol["dir"])
    config = model.config
    assert (config.arch, config.n_layer, config.n_embd, config.n_head, config.n_kv_head,
            config.head_dim, config.vocab_size) == ("llama", 30, 576, 9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.block_size == 8192 and config.layer_norm_epsilon == 1e-5
    assert "<|im_start|>" in (Path(smol["dir"]) / "chat_template.jinja").read_text()
    assert smol["tokenizer"].decode([config.eos_token_id]) == "<|im_end|>"
    mask = os.umask(0)
    os.umask(mask)  # the directory is as readable as any the user makes, not private
    assert Path(smol["dir"]).stat().st_mode & 0o777 == 0o777 & ~mask
    assert (Path(smol["dir"]) / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_transformers_opens_the_import_with_the_same_logits_and_ids(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(smol["dir"]).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tokenizer = AutoTokenizer.from_pretrained(smol["dir"])
    ids = [hf_tokenizer(text, add_special_tokens=True)["input_ids"] for text in TEXTS]
    assert ids == [smol["tokenizer"].encode(text) for text in TEXTS]
    batch = torch.tensor([smol["tokenizer"].encode(TEXTS[0] + " " + TEXTS[3])])
    with torch.no_grad():
        difference = (GPT.from_pretrained(smol["dir"])(batch) - hf(batch).logits).abs().max()
    assert difference < 1e-4


@pytest.mark.parametrize("file", ["original", "f32"])
def test_token_ids_equal_llamacpp(smol, file):
    """Chinese, emoji, code, whitespace runs, digits (split one by one by 'smollm'),
    special tokens: the ids llama.cpp gives, in the original file and gptkit's re-export."""
    ours = [smol["tokenizer"].encode(text) for text in TEXTS]
    assert smol[file]["tokens"] == ours
    assert [smol["tokenizer"].decode(ids) for ids in ours] == TEXTS


def test_greedy_tokens_equal_llamacpp(smol):
    """llama.cpp on gptkit's f32 re-export continues each prompt as gptkit does, up to
    near-ties (see `assert_greedy_matches`); these are trained weights, so ties are rare."""
    model = GPT.from_pretrained(smol["dir"])
    ours = []
    for ids in smol["prompts"]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             eos_token_id=[])
        ours.append(out[0, len(ids):].tolist())
    assert_greedy_matches(smol["dir"], smol["prompts"], smol["f32"]["greedy"], ours, "f32")
    assert "Paris" in smol["tokenizer"].decode(ours[0])


def test_answers_a_question_through_gptkit_chat(smol):
    """The conversation `gptkit chat` holds: the file's own chat template, its end of turn."""
    session = ChatSession(GPT.from_pretrained(smol["dir"]), smol["tokenizer"], max_new_tokens=32)
    answer, stopped = session.respond("What is the capital of France?", lambda piece: None)
    assert not stopped and "Paris" in answer, answer
    assert session.messages[-1] == {"role": "assistant", "content": answer}


def test_bfloat16_import_loads_in_float32_unless_asked(smollm2_gguf, tmp_path):
    """`gptkit import --dtype bfloat16` halves the directory, as hub models are saved; gptkit
    then computes in float32 by default and in bfloat16 when asked, both answering alike."""
    from safetensors import safe_open

    from gptkit.export.gguf_import import import_gguf

    directory = import_gguf(smollm2_gguf, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    tokenizer = Tokenizer.from_pretrained(directory)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    for dtype in (None, torch.bfloat16):
        model = GPT.from_pretrained(directory, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype or torch.float32}
        out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=[])
        assert "Paris" in tokenizer.decode(out[0, ids.size(1):].tolist())
