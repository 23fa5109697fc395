"""Chat end to end on a synthetic task that needs memory: the user states a fact in turn 1,
chats about something else, and asks for the fact in turn 3 or later. A tiny model tuned
with `gptkit finetune --task chat` answers held-out conversations (`gptkit eval --task
chat`), talks in `gptkit chat`, and `gptkit serve` gives the official `openai` client the
same greedy answers."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from serve_helpers import live_server
from serve_helpers import make_model_dir as make_random_model
from tiny_models import make_model_dir, write_jsonl

from gptkit import GPT, GPTConfig, Tokenizer
from gptkit.chat import ChatSession, chat_in_terminal
from gptkit.cli import main
from gptkit.conversation import (
    IM_END,
    add_chat_tokens,
    chat_format,
    encode_conversation,
    prompt_ids,
    read_conversations,
)

FACTS = {"pet": ["cat", "dog", "fox", "owl", "bee", "yak", "emu", "ant", "bat", "cow", "eel", "hen"],
         "color": ["red", "blue", "green", "pink", "gold", "gray", "teal", "navy", "lime", "plum"],
         "city": ["rome", "oslo", "lima", "kyiv", "doha", "bern", "riga", "baku", "suva", "apia"]}
WORDS = ["hi", "thanks", "sure", "maybe", "yes", "no", "later", "okay"]
SYSTEM = "Remember what I tell you."
TIMES: dict[str, float] = {}


def memory_conversation(rng: random.Random) -> dict:
    """A fact in turn 1, one or two turns of something else, then the question."""
    key = rng.choice(list(FACTS))
    value = rng.choice(FACTS[key])
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": f"my {key} is {value}"},
                 {"role": "assistant", "content": "ok"}]
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            messages += [{"role": "user", "content": f"{a} plus {b}?"},
                         {"role": "assistant", "content": str(a + b)}]
        else:
            word = rng.choice(WORDS)
            messages += [{"role": "user", "content": f"say {word}"},
                         {"role": "assistant", "content": word}]
    messages += [{"role": "user", "content": f"my {key}?"},
                 {"role": "assistant", "content": value}]
    return {"messages": messages}


def memory_file(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [memory_conversation(rng) for _ in range(n)])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A random 2-layer base with a small BPE, chat-tuned on 2,000 conversations (200 steps,
    under a minute on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and does not stall
    root = tmp_path_factory.mktemp("memory")
    train = memory_file(root / "train.jsonl", 2000, seed=0)
    memory_file(root / "test.jsonl", 100, seed=1)
    tokenizer = Tokenizer.train(texts=[train.read_text(), "system user assistant\n"],
                                vocab_size=400)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=64,
                  eos_token_id=tokenizer.eos_token_id)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    start = time.perf_counter()
    main(["finetune", "--model", str(root / "base"), "--task", "chat", "--data", str(train),
          "--out", str(root / "chat"), "--max-steps", "200", "--batch-size", "32", "--lr", "8e-3",
          "--min-lr", "4e-4", "--warmup-steps", "20", "--eval-interval", "0", "--save-interval",
          "0", "--log-interval", "50", "--device", "cpu", "--seed", "1"])
    TIMES["train"] = time.perf_counter() - start
    yield root
    torch.set_num_threads(threads)


def test_tuned_model_remembers_base_does_not(tuned, capsys):
    capsys.readouterr()
    scores = {}
    for name in ("chat", "base"):
        main(["eval", "--model", str(tuned / name), "--task", "chat", "--data",
              str(tuned / "test.jsonl"), "--device", "cpu", "--out", str(tuned / f"{name}.jsonl")])
        scores[name] = json.loads(capsys.readouterr().out)
    print(f"chat-tuned in {TIMES['train']:.0f}s: {scores}")
    assert scores["chat"]["n"] == 100 and scores["chat"]["exact_match"] >= 0.9
    assert scores["base"]["exact_match"] <= 0.05
    assert scores["chat"]["loss"] < scores["base"]["loss"] / 5
    first = json.loads((tuned / "chat.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1]["role"] == "user" and first["prediction"] == first["reference"]


def test_terminal_chat_history_commands_and_save(tuned, tmp_path):
    model, tokenizer = GPT.from_pretrained(tuned / "chat"), Tokenizer.from_pretrained(tuned / "chat")
    lines = iter(["my pet is owl", "say thanks", "my pet?", "/save " + str(tmp_path / "c.jsonl"),
                  "/reset", "my pet?", "/system " + SYSTEM, "my color is lime", "7 plus 1?",
                  "my color?", "/save " + str(tmp_path / "c.jsonl"), "/help", "/nonsense",
                  "/exit", "never read"])
    out = _Output()

    def read(prompt: str) -> str:
        out.write(prompt)
        return next(lines)

    session = ChatSession(model, tokenizer, max_new_tokens=8)
    chat_in_terminal(session, "chat", read=read, out=out)
    text = out.getvalue()
    assert "ok\n" in text and "thanks\n" in text and "owl\n" in text and "lime\n" in text
    assert "(new conversation)" in text and "/save FILE" in text and "unknown command" in text
    saved = read_conversations(tmp_path / "c.jsonl")
    assert [m["content"] for m in saved[0].messages] == ["my pet is owl", "ok", "say thanks",
                                                         "thanks", "my pet?", "owl"]
    assert saved[1].messages[0] == {"role": "system", "content": SYSTEM}
    assert saved[1].messages[-1] == {"role": "assistant", "content": "lime"}
    assert next(lines) == "never read"


class _Output:
    """A text stream that keeps what is written (pieces arrive one by one)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def write(self, text: str) -> None:
        self.pieces.append(text)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self.pieces)


def test_ctrl_c_stops_the_answer_not_the_conversation(tuned):
    model, tokenizer = GPT.from_pretrained(tuned / "chat"), Tokenizer.from_pretrained(tuned / "chat")
    session = ChatSession(model, tokenizer, max_new_tokens=8)

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    answer, stopped = session.respond("my city is oslo", interrupt)
    assert stopped and session.messages[-1] == {"role": "assistant", "content": answer}
    session.respond("say hi", lambda piece: None)
    answer, stopped = session.respond("my city?", lambda piece: None)
    assert (answer, stopped) == ("oslo", False)


def test_ctrl_c_before_the_answer_leaves_the_history_as_it_was(tmp_path, monkeypatch):
    """Ctrl-C before the first piece of an answer, while the model reads the prompt or
    while the prompt is built, drops the message (as if not sent) rather than leaving it
    unanswered in the history, where the next answer would answer it too."""
    directory = random_chat_model(tmp_path / "random", block_size=64)
    session = ChatSession(GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory),
                          max_new_tokens=4)
    session.respond("hello", lambda piece: None)
    history = [dict(m) for m in session.messages]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]

    def reading_the_prompt(*args, **kwargs):
        yield from ctrl_c()  # a generator, as stream_generate is: Ctrl-C in its first step

    monkeypatch.setattr("gptkit.chat.stream_generate", reading_the_prompt)
    assert session.respond("lost", lambda piece: None) == ("", True)
    assert session.messages == history
    monkeypatch.setattr("gptkit.chat.fit_chat", ctrl_c)  # Ctrl-C while the prompt is built
    out = _Output()
    lines = iter(["also lost"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    chat_in_terminal(session, "random", read=read, out=out)
    assert "[stopped before an answer; the message was dropped from the history]" in out.getvalue()
    assert session.messages == history
    monkeypatch.undo()
    answer, stopped = session.respond("again", lambda piece: None)
    assert session.messages == [*history, {"role": "user", "content": "again"},
                                {"role": "assistant", "content": answer}] and not stopped


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_history_beyond_the_context_drops_oldest_turns_with_a_notice(tuned):
    model, tokenizer = GPT.from_pretrained(tuned / "chat"), Tokenizer.from_pretrained(tuned / "chat")
    notices: list[str] = []
    session = ChatSession(model, tokenizer, max_new_tokens=16, system=SYSTEM,
                          notice=notices.append)
    for i in range(12):
        session.respond(f"say {WORDS[i % len(WORDS)]}", lambda piece: None)
    assert len(encode_conversation(tokenizer, session.format, session.messages)[0]) <= 128
    assert notices and "dropped its 2 oldest messages" in notices[0]
    assert session.messages[0]["content"] == SYSTEM  # the system message stays
    assert session.messages[-2] == {"role": "user", "content": f"say {WORDS[11 % len(WORDS)]}"}


def test_model_without_template_talks_in_a_plain_transcript(tuned):
    model, tokenizer = GPT.from_pretrained(tuned / "base"), Tokenizer.from_pretrained(tuned / "base")
    notices: list[str] = []
    session = ChatSession(model, tokenizer, max_new_tokens=5, notice=notices.append)
    lines = iter(["hello", "again"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    chat_in_terminal(session, "base", read=read, out=_Output())
    assert session.plain and len(notices) == 1 and "plain" in notices[0]
    assert tokenizer.decode(prompt_ids(tokenizer, session.format, session.messages[:-1])).startswith(
        "User: hello\nAssistant:")


def test_openai_client_matches_terminal_chat_and_python_api(tuned):
    """Plain, streamed, multi-turn and n>1 calls of the official client against a live
    `gptkit serve` give the greedy answers `ChatSession` (what `gptkit chat` runs) gives."""
    from openai import OpenAI

    model, tokenizer = GPT.from_pretrained(tuned / "chat"), Tokenizer.from_pretrained(tuned / "chat")
    conversations = [c.messages for c in read_conversations(tuned / "test.jsonl", limit=4)]
    with live_server(tuned / "chat") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        for messages in conversations:
            asked = messages[:-1]
            session = ChatSession(model, tokenizer, max_new_tokens=16)
            session.messages = asked[:-1]
            expected, _ = session.respond(asked[-1]["content"], lambda piece: None)
            assert expected == messages[-1]["content"]
            whole = client.chat.completions.create(model="chat", messages=asked, max_tokens=16,
                                                   temperature=0)
            assert whole.choices[0].message.content == expected
            assert whole.choices[0].finish_reason == "stop"  # at <|im_end|>, not the limit
            assert whole.usage.prompt_tokens == len(prompt_ids(tokenizer, chat_format(tokenizer),
                                                               asked))
            streamed = client.chat.completions.create(model="chat", messages=asked,
                                                      max_tokens=16, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
        several = client.chat.completions.create(model="chat", messages=conversations[0][:-1],
                                                 max_tokens=16, temperature=0, n=3)
        assert [c.message.content for c in several.choices] == [conversations[0][-1]["content"]] * 3
        plain = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "my pet is yak"}], max_tokens=16,
            temperature=0)
        session = ChatSession(model, tokenizer, max_new_tokens=16)
        assert plain.choices[0].message.content == session.respond("my pet is yak",
                                                                   lambda piece: None)[0] == "ok"


def random_chat_model(directory: Path, block_size: int) -> Path:
    """A random char model that never ends its text by itself, given the ChatML tokens and
    their rows as fine-tuning gives them."""
    from gptkit.vocab import grow_vocab

    make_random_model(directory, block_size=block_size)
    tokenizer = Tokenizer.from_pretrained(directory)
    add_chat_tokens(tokenizer)
    model = GPT.from_pretrained(directory)
    grow_vocab(model, tokenizer.vocab_size, range(model.config.vocab_size, tokenizer.vocab_size))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_transformers_generate_stops_at_the_end_of_turn_like_gptkit(tuned):
    """transformers' `generate`, left to the model's generation_config.json and template,
    ends each answer at <|im_end|> with the text gptkit's chat gives."""
    transformers = pytest.importorskip("transformers")
    directory = tuned / "chat"
    model, tokenizer = GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    end_of_turn = tokenizer.token_to_id(IM_END)
    assert hf.generation_config.eos_token_id == [end_of_turn, tokenizer.pad_token_id]
    for conversation in read_conversations(tuned / "test.jsonl", limit=4):
        asked = conversation.messages[:-1]
        session = ChatSession(model, tokenizer, max_new_tokens=16)
        session.messages = asked[:-1]
        expected, _ = session.respond(asked[-1]["content"], lambda piece: None)
        prompt = hf_tokenizer.apply_chat_template(asked, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**prompt, max_new_tokens=16, do_sample=False)
        answer = out[0, prompt["input_ids"].size(1):].tolist()
        assert answer[-1] == end_of_turn and len(answer) < 16  # stopped there, not at the limit
        assert hf_tokenizer.decode(answer, skip_special_tokens=True) == expected


def test_model_tuned_for_a_task_chats_through_its_task_template(tmp_path):
    """A model fine-tuned for a task (no chat template) gets each user turn in its task's
    prompt and each answer as a target; the reply is what /v1/completions continues that
    prompt with."""
    from fastapi.testclient import TestClient

    from gptkit.serve import create_app
    from gptkit.tasks import TASK_FILE, get_task

    directory = make_model_dir(tmp_path / "translator", block_size=128)
    (directory / TASK_FILE).write_text(json.dumps(get_task("translate").to_dict()))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]
    prompt = "Be brief.\n\nEnglish: hi\nChinese: yo\n\nEnglish: bye\nChinese:"
    with TestClient(create_app(directory, device="cpu")) as client:
        chat = client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 8, "temperature": 0}).json()
        plain = client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    assert chat["usage"] == plain["usage"]
    assert chat["usage"]["prompt_tokens"] == len(Tokenizer.from_pretrained(directory).encode(prompt))
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"] != ""


def test_chat_command_survives_ctrl_c_during_an_answer(tmp_path):
    """The real `gptkit chat` process: Ctrl-C during a long answer stops it; the next
    message is answered; Ctrl-D ends the chat with status 0."""
    directory = random_chat_model(tmp_path / "random", block_size=512)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "chat", "--model", str(directory), "--greedy",
         "--max-new-tokens", "450", "--device", "cpu"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    received: list[str] = []

    def read_output() -> None:
        while character := process.stdout.read(1):
            received.append(character)

    threading.Thread(target=read_output, daemon=True).start()

    def wait_for(condition, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition("".join(received)):
                return "".join(received)
            time.sleep(0.01)
        process.kill()
        raise AssertionError(f"timed out; output so far: {''.join(received)!r}, "
                             f"{process.stderr.read()!r}")

    try:
        wait_for(lambda text: text.endswith("\n> "))
        process.stdin.write("hello\n")
        process.stdin.flush()
        wait_for(lambda text: len(text.split("\n> ", 1)[1]) > 5)
        process.send_signal(signal.SIGINT)
        wait_for(lambda text: "[stopped]" in text and text.endswith("\n> "))
        answer = "".join(received).split("\n> ", 1)[1].split(" [stopped]")[0]
        assert 5 < len(answer) < 450  # long enough that Ctrl-C lands before its end
        process.stdin.write("again\n")
        process.stdin.flush()
        wait_for(lambda text: text.count("\n> ") >= 3, timeout=120)
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_defaults_fit_a_small_model_and_a_seed_seeds_the_chat_once(tmp_path, monkeypatch, capsys):
    """`gptkit chat` on a 64-token model starts with its defaults (answers of at most half
    the context); --seed gives one random stream for the chat: answers to the same
    message differ from turn to turn, and the same seed repeats the whole chat."""
    directory = random_chat_model(tmp_path / "random", block_size=64)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # Ctrl-D at once
    main(["chat", "--model", str(directory), "--device", "cpu"])
    assert "context 64 tokens" in capsys.readouterr().out
    model, tokenizer = GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory)
    assert ChatSession(model, tokenizer).max_new_tokens == 32

    def chat(seed: int) -> list[str]:
        session = ChatSession(model, tokenizer, max_new_tokens=8,
                              sampling={"do_sample": True, "temperature": 1.0, "seed": seed})
        answers = []
        for _ in range(3):
            session.reset()
            answers.append(session.respond("hello", lambda piece: None)[0])
        return answers

    first = chat(1)
    assert len(set(first)) == 3 and chat(1) == first != chat(2)


def test_terminal_multiline_load_set_regen_verbose_and_bytes(tmp_path):
    """The terminal's own features: messages over several lines (a backslash at the end, or
    a \"\"\" block), /load of what /save wrote, /set mid-chat, /regen, the speed line of
    /set verbose, and a byte that is not UTF-8 said in plain words with its position."""
    from gptkit.chat import read_message

    def reader(lines):
        it = iter(lines)

        def read(prompt: str) -> str:
            line = next(it, None)
            if line is None:
                raise EOFError
            if isinstance(line, Exception):
                raise line
            return line
        return read

    assert read_message(reader(["one\\", "two\\", "three"])) == "one\ntwo\nthree"
    assert read_message(reader(['"""', "def f():", "    return 1", '"""'])) == "def f():\n    return 1"
    assert read_message(reader(['"""a', 'b"""'])) == "a\nb"
    assert read_message(reader(['"""one line"""'])) == "one line"

    directory = random_chat_model(tmp_path / "random", block_size=128)
    model, tokenizer = GPT.from_pretrained(directory), Tokenizer.from_pretrained(directory)
    session = ChatSession(model, tokenizer, max_new_tokens=6)
    saved = tmp_path / "saved.jsonl"
    bad_bytes = UnicodeDecodeError("utf-8", b"caf\xe9 au lait", 3, 4, "invalid continuation byte")
    out = _Output()
    chat_in_terminal(session, "random", out=out, read=reader([
        "first\\", "line", '"""', "a block", '"""', f"/save {saved}", "/set", "/set top_k 5",
        "/set temperature 0.7", "/set temperature 0", "/set max_new_tokens 999", "/set bogus 1",
        "/set top_p x", "/set verbose on", "/regen", "/set verbose off", bad_bytes, "caf\udce9"]))
    text = out.getvalue()
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["first\nline",
                                                                              "a block"]
    assert "settings: temperature 0, top_k None, top_p None, repetition_penalty 1.0, " \
           "max_new_tokens 6, verbose off" in text
    assert "(top_k set to 5)" in text and session.sampling == {}  # temperature 0: greedy
    assert "max_new_tokens is 999; expected 1 to 127" in text
    assert "there is no setting 'bogus'" in text and "top_p must be a number; got 'x'" in text
    assert re.search(r"\(prompt \d+ tokens, [\d.]+ tokens/s · answer \d+ tokens, [\d.]+ tokens/s\)",
                     text), text
    assert text.count("tokens/s") == 2  # verbose only for /regen
    assert "byte 0xe9 at byte 4 of the line; the message was not sent" in text
    assert "byte 0xe9 at character 4 of the message; the message was not sent" in text
    # /regen answered the last message again (greedy: the same answer), in its place
    assert len(session.messages) == 4
    regen = ChatSession(model, tokenizer, max_new_tokens=6,
                        sampling={"do_sample": True, "temperature": 1.0, "seed": 3})
    regen.respond("hello", lambda piece: None)
    answers = {regen.messages[-1]["content"]}
    for _ in range(3):
        regen.regenerate(lambda piece: None)
        answers.add(regen.messages[-1]["content"])
        assert [m["role"] for m in regen.messages] == ["user", "assistant"]
    assert len(answers) > 1
    # /load goes on with the saved conversation
    other = ChatSession(model, tokenizer, max_new_tokens=6)
    out = _Output()
    chat_in_terminal(other, "random", out=out, read=reader([f"/load {saved}", "/load nowhere.jsonl"]))
    assert f"(loaded the last conversation of {saved}: 4 messages)" in out.getvalue()
    assert "nowhere.jsonl does not exist" in out.getvalue()
    assert other.messages == read_conversations(saved)[-1].messages
    session.configure("temperature", 0.7)
    assert session.sampling == {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": None,
                                "seed": None}


def test_shipped_conversations_are_valid_and_as_their_script_writes_them():
    """data/chat/conversations.jsonl, what the README's chat commands train on: 300 valid
    multi-turn conversations, exactly what data/chat/make_conversations.py writes."""
    import runpy

    path = Path(__file__).resolve().parent.parent / "data" / "chat" / "conversations.jsonl"
    conversations = read_conversations(path)
    assert len(conversations) == 300
    assert all(sum(m["role"] == "assistant" for m in c.messages) >= 2 for c in conversations)
    script = runpy.run_path(str(path.parent / "make_conversations.py"))
    assert script["file_text"]() == path.read_text(encoding="utf-8")
