"""Conversations as data: the JSONL shapes, loss only on assistant turns, earliest turns
dropped when too long, packing that changes no loss, ChatML tokens added to a base model,
and parity with transformers' `apply_chat_template` on 100 random conversations."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from tiny_models import make_model_dir, write_jsonl

from gptkit import GPT, GPTConfig, GptkitError, Tokenizer
from gptkit.conversation import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    PLAIN_STOP,
    ChatFormat,
    add_chat_tokens,
    chat_format,
    encode_conversation,
    encode_conversations,
    fit_conversation,
    fit_prompt,
    parse_conversation,
    prompt_ids,
    read_conversations,
)
from gptkit.kernels import IGNORE_INDEX
from gptkit.sft import collate, collate_packed, pack

TEXT = "the quick brown fox jumps over the lazy dog. Hello, world! 0123456789 ?\n" * 20
UNICODE = ["", " ", "hello", "  two  spaces", "\nnew\nlines\n", "你好世界", "🙂🙃", "é", "a\tb",
           " lead", "trail ", "Ünïcödé façade", "<tag>", "x" * 40]


@pytest.fixture(scope="module")
def chat_bpe(tmp_path_factory):
    """A small byte-level BPE with the ChatML tokens, saved and reloaded."""
    tokenizer = Tokenizer.train(texts=[TEXT, "".join(UNICODE)], vocab_size=400)
    assert add_chat_tokens(tokenizer) == 2
    directory = tmp_path_factory.mktemp("chat_bpe")
    tokenizer.save_pretrained(directory)
    return directory


def labels_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True)
                             if label != IGNORE_INDEX])


def test_openai_and_sharegpt_shapes_read_alike(tmp_path):
    openai = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
    sharegpt = {"id": "7", "conversations": [{"from": "system", "value": "s"},
                                             {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [openai, sharegpt])
    first, second = read_conversations(path)
    assert first.messages == second.messages == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]
    assert first.where.endswith("c.jsonl line 1") and second.task is None


@pytest.mark.parametrize("record, message", [
    (["a list"], r"line 1 is a JSON list; expected an object with \"messages\""),
    ({"text": "x"}, r"neither 'messages' nor 'conversations'"),
    ({"messages": []}, r"'messages' is empty"),
    ({"messages": "hi"}, r"'messages' is a string; expected a list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role is \"robot\"; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\]\.content is a number; expected a string"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, r"unknown field 'weight'"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"has no assistant turn"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]\.from is \"bot\"; expected one of system, human"),
])
def test_bad_records_get_one_sentence_naming_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(GptkitError, match=message) as error:
        read_conversations(path)
    assert "line 1" in str(error.value) and "\n" not in str(error.value)


def test_loss_falls_on_assistant_turns_and_their_end_token_only(chat_bpe):
    tokenizer = Tokenizer.from_pretrained(chat_bpe)
    fmt = chat_format(tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "the dog"}]
    ids, labels = encode_conversation(tokenizer, fmt, messages)
    text = tokenizer.decode(ids)
    assert text == fmt.render(messages)[0] == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nthe fox<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n"
        "<|im_start|>assistant\nthe dog<|im_end|>\n")
    assert labels_text(tokenizer, ids, labels) == "the fox<|im_end|>the dog<|im_end|>"
    assert labels.count(tokenizer.eos_token_id) == 2  # each turn's end-of-turn token
    prompt = prompt_ids(tokenizer, fmt, messages[:-1])
    assert tokenizer.decode(prompt) == text[:text.rindex("the dog")]


def test_plain_transcript_for_a_model_without_template():
    tokenizer = Tokenizer.train(texts=[TEXT], kind="char")
    fmt = chat_format(tokenizer)
    assert fmt.plain and fmt.stop == [PLAIN_STOP]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    assert fmt.render(messages, add_generation_prompt=True)[0] == (
        "be brief\n\nUser: hi\nAssistant: hello\nUser: and?\nAssistant:")
    ids, labels = encode_conversation(tokenizer, fmt, messages[:3])
    assert labels_text(tokenizer, ids, labels) == " hello\n"


def test_too_long_conversations_drop_whole_earliest_exchanges(chat_bpe, tmp_path, capsys):
    tokenizer = Tokenizer.from_pretrained(chat_bpe)
    fmt = chat_format(tokenizer)
    system = [{"role": "system", "content": "be brief"}]
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i} " + "fox " * 5},
                  {"role": "assistant", "content": f"answer {i} " + "dog " * 5}]
    full = len(encode_conversation(tokenizer, fmt, system + turns)[0])
    last = len(encode_conversation(tokenizer, fmt, system + turns[-2:])[0])
    (ids, labels), dropped = fit_conversation(tokenizer, fmt, system + turns, full - 1)
    assert dropped == 2 and len(ids) <= full - 1
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief") and "question 0" not in text
    assert "question 1" in text and text.endswith("dog " * 4 + "dog <|im_end|>\n")
    assert fit_conversation(tokenizer, fmt, system + turns, last)[1] == 6
    assert fit_conversation(tokenizer, fmt, system + turns, last - 1) == (None, 9)
    kept = fit_prompt(tokenizer, fmt, system + turns[:-1], last - 1)
    assert kept is not None and kept[1] == system + turns[-2:-1]
    with pytest.raises(GptkitError, match="^the last message is from the assistant; expected the "
                                          "user's message to answer.$"):
        fit_prompt(tokenizer, fmt, system + turns, full)  # an answer to what?
    # a run reports how many conversations were shortened and skipped
    conversations = [parse_conversation({"messages": system + turns}, "a"),
                     parse_conversation({"messages": system + turns[-2:]}, "b"),
                     parse_conversation({"messages": [turns[0], {"role": "assistant",
                                                                 "content": "dog " * 99}]}, "c")]
    encoded = encode_conversations(tokenizer, fmt, conversations, last - 1, "data.jsonl")
    assert len(encoded) == 2
    err = capsys.readouterr().err
    assert "2 of 3 conversations in data.jsonl" in err and "1 lost their earliest turns" in err
    assert "1 were skipped" in err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_rows_give_the_loss_of_unpacked_ones(chat_bpe, arch):
    tokenizer = Tokenizer.from_pretrained(chat_bpe)
    fmt = chat_format(tokenizer)
    rng = random.Random(0)
    examples = []
    for _ in range(12):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": " ".join(rng.choices(UNICODE, k=2))},
                         {"role": "assistant", "content": " ".join(rng.choices(UNICODE, k=3))}]
        examples.append(encode_conversation(tokenizer, fmt, messages))
    block = 96
    examples = [e for e in examples if len(e[0]) <= block + 1]
    rows = pack(examples, block)
    assert len(rows) < len(examples) and sorted(map(id, sum(rows, []))) == sorted(map(id, examples))
    assert all(sum(len(ids) - 1 for ids, _ in row) <= block for row in rows)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block, n_layer=2, n_head=2,
                          n_embd=32, arch=arch)).eval()
    x, y = collate(examples, tokenizer.pad_token_id)
    px, py, extra = collate_packed(rows, tokenizer.pad_token_id)
    assert (py != IGNORE_INDEX).sum() == (y != IGNORE_INDEX).sum()
    assert px.size(0) == len(rows) and extra["attn_mask"].shape == (len(rows), 1, px.size(1), px.size(1))
    with torch.no_grad():
        unpacked, packed = model(x, targets=y), model(px, targets=py, **extra)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)


def test_pack_flags_override_the_rule_and_change_no_loss(tmp_path, capsys, monkeypatch):
    """Short conversations pack by default; --no-pack trains them a row each, --pack as the
    default does: an epoch takes fewer rows and steps, and the validation loss (at step 0:
    the same weights) is the unpacked one's."""
    from gptkit.cli import main

    monkeypatch.setattr("gptkit.plot.plot_runs", lambda *args: None)  # the loss plot: 1 s a run

    base = make_model_dir(tmp_path / "base", block_size=64)
    rng = random.Random(0)
    words = ["hi", "yo", "ok", "sure", "no", "a b c", "0123", "?!"]
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": rng.choice(words)},
                      {"role": "assistant", "content": rng.choice(words)}]} for _ in range(24)])
    runs = {}
    for flag in ("default", "--pack", "--no-pack"):
        out = tmp_path / flag.strip("-")
        main(["finetune", "--model", str(base), "--task", "chat", "--data", str(data), "--val",
              str(data), "--out", str(out), "--epochs", "1", "--batch-size", "4",
              "--eval-steps", "100", "--eval-interval", "100", "--device", "cpu",
              *([flag] if flag != "default" else [])])
        layout = re.search(r"on 24 conversations( packed into (\d+) rows)?.* for (\d+) steps",
                           capsys.readouterr().err)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        val = next(r["val_loss"] for r in records if "val_loss" in r)  # step 0's
        runs[flag] = (layout[2] and int(layout[2]), int(layout[3]), val)
    rows, steps, val = runs["--pack"]
    assert runs["default"] == runs["--pack"] and 1 < rows < 24 and steps == -(-rows // 4)
    assert runs["--no-pack"][:2] == (None, 6)
    assert runs["--no-pack"][2] == pytest.approx(val, abs=1e-5)


def test_chat_tokens_added_to_a_base_tokenizer_are_saved_with_the_template(tmp_path):
    tokenizer = Tokenizer.train(texts=[TEXT], vocab_size=300)
    base_size, eot = tokenizer.vocab_size, tokenizer.eos_token_id
    assert add_chat_tokens(tokenizer) == 2
    assert (tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)) == (base_size,
                                                                                   base_size + 1)
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token_id == eot
    assert tokenizer.uses_tiktoken  # the fast engine still applies
    assert add_chat_tokens(tokenizer) == 0  # a chat tokenizer keeps its template
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (tmp_path / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (
        IM_END, "<|endoftext|>", "<|endoftext|>")
    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.chat_template, again.eos_token_id, again.pad_token_id) == (
        CHATML_TEMPLATE, base_size + 1, eot)
    assert again.decode(again.encode("<|im_start|>user\nhi<|im_end|>"),
                        skip_special_tokens=True) == "user\nhi"
    # a char tokenizer also gains the header characters it lacks (here: every one)
    chars = Tokenizer.train(texts=["0123456789"], kind="char")
    add_chat_tokens(chars)
    assert chars.count_unknown("system\nuser\nassistant\n") == 0


def test_a_template_without_generation_marks_cannot_train():
    tokenizer = Tokenizer.train(texts=[TEXT], kind="char")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(GptkitError, match="no \\{% generation %\\} markers"):
        add_chat_tokens(tokenizer)
    with pytest.raises(GptkitError, match="refused the conversation: no system"):
        ChatFormat("{{ raise_exception('no system') }}").render([])


def base_model_dir(path, arch: str):
    """A tiny char-level base: GPT-2 (its head tied to the token embedding) or Llama with
    an untied head."""
    base = make_model_dir(path, block_size=64)
    if arch == "llama":
        tokenizer = Tokenizer.from_pretrained(base)
        torch.manual_seed(0)
        GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4,
                      n_embd=32, arch="llama", tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id)).save_pretrained(base)
    return base


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_finetune_grows_the_model_and_names_the_end_of_turn_token(tmp_path, arch):
    """The embedding grows, and the head with it (shared when tied, its own rows when not);
    transformers reads the grown model and computes gptkit's logits."""
    transformers = pytest.importorskip("transformers")
    from gptkit.cli import main

    base = base_model_dir(tmp_path / "base", arch)
    before = GPT.from_pretrained(base)
    assert before.config.tie_word_embeddings == (arch == "gpt2")
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 8)
    main(["finetune", "--model", str(base), "--task", "chat", "--data", str(data), "--out",
          str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
          "--eval-interval", "0", "--lr", "1e-9", "--min-lr", "0", "--warmup-steps", "0"])
    run = tmp_path / "run"
    tokenizer = Tokenizer.from_pretrained(run)
    model = GPT.from_pretrained(run)
    grown = tokenizer.vocab_size
    assert model.config.vocab_size == grown > before.config.vocab_size
    assert model.config.eos_token_id == tokenizer.token_to_id(IM_END) == tokenizer.eos_token_id
    generation = json.loads((run / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    old = before.transformer.wte.weight
    new = model.transformer.wte.weight
    torch.testing.assert_close(new[:old.size(0)], old, atol=1e-6, rtol=0)  # lr ~ 0
    old_head, head = before.lm_head.weight, model.lm_head.weight
    assert head.shape == (grown, old.size(1))
    assert (head.data_ptr() == new.data_ptr()) == (arch == "gpt2")
    torch.testing.assert_close(head[:old.size(0)], old_head, atol=1e-6, rtol=0)
    for weight, trained in ((new, old), (head, old_head)):
        # new rows start at the mean of the old ones (the untied head's: of its own)
        for row in range(trained.size(0), grown):
            assert torch.allclose(weight[row], trained.mean(0), atol=1e-3)
    assert not (run / "gptkit_task.json").exists()
    assert (run / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    hf = transformers.AutoModelForCausalLM.from_pretrained(run).eval()
    assert hf.get_output_embeddings().weight.shape == (grown, old.size(1))
    ids = torch.tensor([prompt_ids(tokenizer, chat_format(tokenizer),
                                   [{"role": "user", "content": "hi"}])])
    assert ids.max() >= old.size(0)  # the new tokens are read, and predicted below
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_lora_chat_run_trains_only_adapters_and_new_rows(tmp_path):
    from gptkit.finetune import finetune, train_settings

    base = make_model_dir(tmp_path / "base", block_size=64)
    before = GPT.from_pretrained(base)
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 8)
    settings = dict(init_from=str(base), data=str(data), out=str(tmp_path / "run"), task="chat",
                    lora_rank=2, max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0,
                    eval_interval=0, device="cpu")
    finetune(train_settings(**settings), progress=False)
    model = GPT.from_pretrained(tmp_path / "run")
    old, new = before.transformer.wte.weight, model.transformer.wte.weight
    changed = (new[:old.size(0)] - old).abs().amax().item()
    assert changed < 1e-5 < (new[old.size(0):] - old.mean(0)).abs().amax().item()
    # stopping after every step and resuming restores the adapters and the new rows exactly
    stepwise = {**settings, "out": str(tmp_path / "run2"), "max_time": 0}
    finetune(train_settings(**stepwise), progress=False)
    for _ in range(2):
        finetune(train_settings(**stepwise, resume=True), progress=False)
    resumed = GPT.from_pretrained(tmp_path / "run2")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=1e-6, rtol=0)


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(UNICODE)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 6)):
        for role in ("user", "assistant"):
            messages.append({"role": role, "content": "".join(rng.choices(UNICODE,
                                                                          k=rng.randint(0, 3)))})
    return messages


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_apply_chat_template_gives_our_ids_masks_and_prompts(tmp_path, kind):
    """100 random conversations (system or not, 1-6 turns, Unicode, empty contents):
    `AutoTokenizer.apply_chat_template` gives gptkit's token ids and loss mask, and with
    `add_generation_prompt=True` the prompt the server builds."""
    transformers = pytest.importorskip("transformers")
    from gptkit.serve.app import render_chat

    tokenizer = Tokenizer.train(texts=[TEXT, "".join(UNICODE)], kind=kind,
                                vocab_size=400 if kind == "bpe" else 60)
    add_chat_tokens(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    fmt = chat_format(tokenizer)
    rng = random.Random(0)
    for _ in range(100):
        messages = random_conversation(rng)
        ids, labels = encode_conversation(tokenizer, fmt, messages)
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ids, messages
        assert theirs["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]
        asking = messages[:-1]
        text, stops = render_chat([(m["role"], m["content"]) for m in asking], None, fmt)
        assert stops == []
        assert hf.apply_chat_template(asking, tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"] == tokenizer.encode(text)
    assert hf.eos_token == IM_END


def test_refused_chat_data_writes_nothing(tmp_path, capsys):
    from gptkit.cli import main

    base = make_model_dir(tmp_path / "base", block_size=64)
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}])
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(base), "--task", "chat", "--data", str(data), "--out",
              str(tmp_path / "run"), "--device", "cpu"])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gptkit finetune: error: {data} line 2: messages[1].role is \"robot\"; "
                   "expected one of system, user, assistant."]
