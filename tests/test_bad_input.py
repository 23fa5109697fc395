"""The bad-input table: what users get wrong, and the one sentence each mistake earns.

Every case runs for real (CLI in-process through `gptkit.cli.main`, the Python API, the
HTTP server through its ASGI app) and asserts the message and the exit code or status.
`docs/errors.md` is rendered from this table, and a test checks that each of its rows
shows a message the case accepts (regenerate it with
`GPTKIT_WRITE_ERRORS=1 python -m pytest -n 0 tests/test_bad_input.py`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    where: str  # "cli", "api" or "http"
    mistake: str  # what the user did
    call: Any  # cli: argv (with {tmp}/{model}/{data} placeholders); api: a function; http: request
    match: str  # regex the message must contain
    code: int  # CLI exit status, HTTP status, or 0 for a Python exception
    out: str | None = None  # cli: what --out names, which a refusal must not create
    param: str | None = None  # http: the error's "param" (the request field at fault)
    error_code: str | None = None  # http: the error's "code"


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def api_cases() -> list[Case]:
    from gptkit import GPT, GPTConfig, Tokenizer
    from gptkit.config import TrainConfig
    from gptkit.conversation import prompt_ids
    from gptkit.generate import generate
    from gptkit.tasks import run_task

    def tiny(env):
        return GPT.from_pretrained(env["model"])

    return [
        Case("api", "GPTConfig whose width is not divisible by the heads",
             lambda env: GPTConfig(n_embd=30, n_head=4), r"n_embd=30 is not divisible by n_head=4", 0),
        Case("api", "misspelt config key", lambda env: GPTConfig.from_dict({"n_layers": 2}),
             r"Unknown key 'n_layers' in model config \(did you mean 'n_layer'\?\)", 0),
        Case("api", "unknown preset", lambda env: GPTConfig.from_preset("gpt3"),
             r"Unknown preset 'gpt3'.*expected one of tiny, small", 0),
        Case("api", "absurd size in config.json (n_layer = 10^9)",
             lambda env: _edited_config(env, n_layer=10**9), r"'n_layer' is 1000000000", 0),
        Case("api", "config.json of another architecture",
             lambda env: _edited_config(env, model_type="mamba"),
             r"model_type 'mamba', which gptkit does not build; it supports gemma3_text, gpt2, llama, nanochat, qwen2, qwen3", 0),
        Case("api", "n_kv_head that does not divide n_head",
             lambda env: GPTConfig(arch="llama", n_head=4, n_kv_head=3, n_embd=32),
             r"n_kv_head=3 does not divide n_head=4", 0),
        Case("api", "an odd head size with rotary positions",
             lambda env: GPTConfig(arch="llama", n_head=4, n_embd=60), r"head size 15 is odd", 0),
        Case("api", "weights that disagree with config.json",
             lambda env: _edited_config(env, n_embd=64, n_head=2), r"has shape .* config.json implies", 0),
        Case("api", "truncated model.safetensors",
             lambda env: _truncated_weights(env), r"model.safetensors is damaged", 0),
        Case("api", "tokenizer.json that does not parse",
             lambda env: Tokenizer.from_pretrained(_dir_with(env, "tokenizer.json", "{oops")),
             r"tokenizer.json", 0),
        Case("api", "a folder that is not a model",
             lambda env: GPT.from_pretrained(env["tmp"]), r"is not a model directory", 0),
        Case("api", "text with an unpaired surrogate",
             lambda env: Tokenizer.from_pretrained(env["model"]).encode("a\ud800b"),
             r"unpaired surrogate", 0),
        Case("api", "decoding an id outside the vocabulary",
             lambda env: Tokenizer.from_pretrained(env["model"]).decode([10**6]), r"10+", 0),
        Case("api", "negative temperature",
             lambda env: generate(tiny(env), _ids(), do_sample=True, temperature=-0.5),
             r"temperature", 0),
        Case("api", "top_p outside (0, 1]",
             lambda env: generate(tiny(env), _ids(), do_sample=True, top_p=1.5), r"top_p", 0),
        Case("api", "repetition_penalty of 0",
             lambda env: generate(tiny(env), _ids(), repetition_penalty=0.0), r"repetition_penalty", 0),
        Case("api", "beam search with sampling",
             lambda env: generate(tiny(env), _ids(), num_beams=2, do_sample=True), r"num_beams", 0),
        Case("api", "min-lr above lr", lambda env: TrainConfig(lr=1e-4, min_lr=1e-3),
             r"min-lr", 0),
        Case("api", "several sequences per task input",
             lambda env: run_task(tiny(env), Tokenizer.from_pretrained(env["model"]), "summarize",
                                  ["a text"], num_return_sequences=2),
             r"one output per prompt; num_return_sequences must be 1, got 2", 0),
        Case("api", "a chat prompt whose last message is not from the user",
             lambda env: prompt_ids(*_chat(env), [_USER, _ANSWER]),
             r"the last message is from the assistant; expected the user's message to answer", 0),
        Case("api", "a ChatSession history ending with an unanswered user message",
             lambda env: setattr(_session(env), "messages", [_USER]),
             r"the session's history ends with a user message that has no answer", 0),
        Case("api", "a ChatSession history with an unknown role",
             lambda env: setattr(_session(env), "messages", [{"role": "bot", "content": "x"}]),
             r"the session's history: messages\[0\]\.role is \"bot\"; expected one of system", 0),
    ]


_USER, _ANSWER = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}


def _chat(env):
    from gptkit import Tokenizer
    from gptkit.conversation import chat_format

    tokenizer = Tokenizer.from_pretrained(env["model"])
    return tokenizer, chat_format(tokenizer)


def _session(env):
    from gptkit import GPT, Tokenizer
    from gptkit.chat import ChatSession

    return ChatSession(GPT.from_pretrained(env["model"]), Tokenizer.from_pretrained(env["model"]),
                       max_new_tokens=8)


def _ids():
    import torch

    return torch.tensor([[1, 2, 3]])


def _dir_with(env, name: str, content: str) -> Path:
    directory = Path(env["tmp"]) / f"with-{name}"
    write(directory / name, content)
    return directory


def _copy_model(env, name: str) -> Path:
    import shutil

    target = Path(env["tmp"]) / name
    shutil.copytree(env["model"], target)
    return target


def _edited_config(env, **changes):
    from gptkit import GPT

    directory = _copy_model(env, "edited-" + "-".join(changes))
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return GPT.from_pretrained(directory)


def _truncated_weights(env):
    from gptkit import GPT

    directory = _copy_model(env, "truncated")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return GPT.from_pretrained(directory)


CLI_CASES = [
    Case("cli", "prepare with a path that does not exist",
         ["prepare", "{tmp}/nowhere", "--tokenizer", "{model}", "--out", "{tmp}/d"], r"does not exist", 2),
    Case("cli", "prepare an empty corpus",
         ["prepare", "{tmp}/empty.txt", "--tokenizer", "{model}", "--out", "{tmp}/d"], r"contains no text", 2),
    Case("cli", "a JSONL line that is not JSON",
         ["prepare", "{tmp}/broken.jsonl", "--tokenizer", "{model}", "--out", "{tmp}/d"], r"broken.jsonl.*line 2", 2),
    Case("cli", "a JSONL record without the text field",
         ["prepare", "{tmp}/nofield.jsonl", "--tokenizer", "{model}", "--out", "{tmp}/d"], r"line 1.*'text'", 2),
    Case("cli", "a JSONL line that is not an object",
         ["prepare", "{tmp}/list.jsonl", "--tokenizer", "{model}", "--out", "{tmp}/d"], r"line 1.*object", 2),
    Case("cli", "a BPE vocabulary smaller than the 256 bytes",
         ["tokenizer", "train", "{tmp}/text.txt", "--vocab-size", "100", "--out", "{tmp}/t"], r"vocab", 2),
    Case("cli", "train on a folder that is not prepared data",
         ["train", "--data", "{tmp}", "--out", "{tmp}/run"], r"not a gptkit data directory", 2),
    Case("cli", "--resume without a checkpoint",
         ["train", "--data", "{data}", "--out", "{tmp}/fresh", "--resume"], r"holds no checkpoint", 2),
    Case("cli", "a misspelt key in the --config file",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--config", "{tmp}/bad.toml"],
         r"Unknown key 'max_step'.*did you mean 'max_steps'", 2),
    Case("cli", "a misspelt preset",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--preset", "smal"], r"did you mean 'small'", 2),
    Case("cli", "an --arch that does not exist",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--arch", "llama2"],
         r"--arch 'llama2' is unknown \(did you mean 'llama'\?\); expected one of gemma3, gpt2, llama, nanochat, qwen2, qwen3", 2),
    Case("cli", "an untied head for GPT-2, whose head is always the embedding",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--no-tie-word-embeddings"],
         r"tie_word_embeddings=False does not fit arch 'gpt2' \(transformers' GPT2LMHeadModel\); "
         r"expected True", 2),
    Case("cli", "an --optimizer that does not exist",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--optimizer", "adam"],
         r"--optimizer 'adam' is unknown \(did you mean 'adamw'\?\); expected one of adamw, muon", 2),
    Case("cli", "Muon with --fsdp",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--optimizer", "muon", "--fsdp"],
         r"--optimizer muon does not work with --fsdp", 2),
    Case("cli", "a Muon run resumed as AdamW",
         ["train", "--data", "{data}", "--out", "{tmp}/muon-run", "--resume", "--optimizer", "adamw",
          "--max-steps", "2", "--device", "cpu"],
         r"muon-run was trained with --optimizer muon; resume it with --optimizer muon", 2),
    Case("cli", "a block size beyond the model's context",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--init-from", "{model}", "--block-size", "4096"],
         r"larger than the context", 2),
    Case("cli", "a batch size of 0",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "0"], r"--batch-size is 0", 2),
    Case("cli", "an unknown --dtype",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--dtype", "fp8"], r"--dtype 'fp8' is unknown", 2),
    Case("cli", "--device cuda on a machine without a GPU",
         ["train", "--data", "{data}", "--out", "{tmp}/r", "--device", "cuda"], r"no CUDA GPU", 2),
    Case("cli", "generate from a folder that is not a model",
         ["generate", "--model", "{tmp}", "hello"], r"is not a model directory", 2),
    Case("cli", "temperature below 0", ["generate", "--model", "{model}", "hi", "--temperature", "-1"],
         r"temperature", 2),
    Case("cli", "top-p of 0", ["generate", "--model", "{model}", "hi", "--top-p", "0"], r"top_p", 2),
    Case("cli", "negative top-k", ["generate", "--model", "{model}", "hi", "--top-k", "-3"], r"top_k", 2),
    Case("cli", "max-new-tokens of 0", ["generate", "--model", "{model}", "hi", "--max-new-tokens", "0"],
         r"max_new_tokens", 2),
    Case("cli", "--show-probs with --quantize",
         ["generate", "--model", "{model}", "hi", "--show-probs", "--quantize", "int8"],
         r"--show-probs does not combine with --quantize", 2),
    Case("cli", "--task with --num-beams",
         ["generate", "--model", "{model}", "a text", "--task", "summarize", "--num-beams", "2"],
         r"--task/--input does not combine with --num-beams or --draft-model", 2),
    Case("cli", "--task with --num-return-sequences",
         ["generate", "--model", "{model}", "a text", "--task", "summarize",
          "--num-return-sequences", "2"],
         r"--num-return-sequences works with plain prompts only, not --task/--input", 2),
    Case("cli", "--show-probs with a temperature below 0",
         ["generate", "--model", "{model}", "hi", "--show-probs", "--temperature", "-1"],
         r"temperature must be a number >= 0", 2),
    Case("cli", "--num-return-sequences of 0",
         ["generate", "--model", "{model}", "hi", "--num-return-sequences", "0"],
         r"num_return_sequences must be an integer >= 1; got 0", 2),
    Case("cli", "beam search with a temperature below 0",
         ["generate", "--model", "{model}", "hi", "--num-beams", "2", "--temperature", "-1"],
         r"temperature must be a number >= 0", 2),
    Case("cli", "eval on a file that does not exist",
         ["eval", "--model", "{model}", "--data", "{tmp}/missing.txt"], r"does not exist", 2),
    Case("cli", "eval on a binary file",
         ["eval", "--model", "{model}", "--data", "{tmp}/random.bin"], r"random.bin is not UTF-8 text", 2),
    *[Case("cli", f"chat data: {mistake}",
           ["finetune", "--model", "{model}", "--task", "chat", "--data", f"{{tmp}}/{name}.jsonl",
            "--out", "{tmp}/chat-run"], match, 2, out="{tmp}/chat-run")
      for mistake, name, match in [
        ("a JSONL line that is not an object", "chat_list",
         r"chat_list.jsonl line 1 is a JSON list; expected an object with \"messages\""),
        ("a message with an unknown role", "chat_role",
         r"line 1: messages\[1\]\.role is \"robot\"; expected one of system, user, assistant"),
        ("a message whose content is not a string", "chat_content",
         r"line 2: messages\[0\]\.content is a number; expected a string"),
        ("an empty messages list", "chat_empty", r"line 1: 'messages' is empty"),
        ("a conversation with no assistant turn", "chat_no_answer",
         r"line 1 has no assistant turn; expected at least one"),
    ]],
    *[Case("cli", f"chat evaluation data: {mistake}",
           ["eval", "--model", "{model}", "--task", "chat", "--data", f"{{tmp}}/{name}.jsonl",
            "--out", "{tmp}/chat-preds.jsonl"], match, 2, out="{tmp}/chat-preds.jsonl")
      for mistake, name, match in [
        ("a message with an unknown role", "chat_role",
         r"line 1: messages\[1\]\.role is \"robot\"; expected one of system, user, assistant"),
        ("a conversation with no assistant turn", "chat_no_answer",
         r"line 1 has no assistant turn; expected at least one"),
        ("a user turn after the last assistant turn", "chat_unanswered",
         r"line 2 ends with a user turn after its last assistant turn; expected a held-out "
         r"conversation to end with the assistant turn"),
        ("a last assistant turn that answers no user turn", "chat_no_question",
         r"line 1: its last assistant turn follows a system turn; expected a user turn before it"),
    ]],
    Case("cli", "a benchmark name that does not exist",
         ["eval", "--model", "{model}", "--benchmark", "hellaswg"],
         r"Unknown benchmark 'hellaswg'; choose from arc_challenge, .*hellaswag.*, core, or give "
         r"a JSONL file", 2),
    Case("cli", "a benchmark --limit of 0",
         ["eval", "--model", "{model}", "--benchmark", "copa", "--limit", "0"],
         r"--limit: expected an integer of at least 1, got 0", 2),
    Case("cli", "a training data mixture entry without a weight",
         ["train", "--data", "web={data}", "--out", "{tmp}/r"],
         r"--data web=.* is not NAME=DIR:WEIGHT with a positive weight", 2),
    Case("cli", "--dedup without sharded output",
         ["prepare", "{tmp}/text.txt", "--tokenizer", "{model}", "--out", "{tmp}/d", "--dedup"],
         r"--dedup applies to sharded output; add --shard-tokens N", 2),
    Case("cli", "a port out of range",
         ["serve", "--model", "{model}", "--port", "70000"],
         r"--port 70000 is out of range; expected 0 to 65535", 2),
]


HTTP_CASES = [
    Case("http", "temperature below 0",
         ("POST", "/v1/completions", {"model": "model", "prompt": "hi", "temperature": -1}), r"temperature", 400,
         param="temperature"),
    Case("http", "an unknown request field",
         ("POST", "/v1/completions", {"model": "model", "prompt": "hi", "temprature": 1}), r"temprature", 400,
         param="temprature"),
    Case("http", "max_tokens of 0",
         ("POST", "/v1/completions", {"model": "model", "prompt": "hi", "max_tokens": 0}), r"max_tokens", 400,
         param="max_tokens"),
    Case("http", "max_tokens beyond the context",
         ("POST", "/v1/completions", {"model": "model", "prompt": "hi", "max_tokens": 10**6}), r"max_tokens", 400,
         param="max_tokens"),
    Case("http", "a prompt of the wrong type",
         ("POST", "/v1/completions", {"model": "model", "prompt": 42}), r"prompt", 400, param="prompt"),
    Case("http", "a huge n", ("POST", "/v1/completions", {"model": "model", "prompt": "hi", "n": 10**6}), r"\bn\b", 400,
         param="n"),
    Case("http", "malformed JSON", ("POST", "/v1/completions", b"{not json"), r"JSON", 400),
    Case("http", "deeply nested JSON",
         ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"), r".", 400),
    Case("http", "a body over the size limit",
         ("POST", "/v1/completions", {"model": "model", "prompt": "x" * (2 << 20)}), r"\d", 413),
    Case("http", "chat messages without content",
         ("POST", "/v1/chat/completions", {"model": "model", "messages": [{"role": "user"}]}), r"content", 400,
         param="messages[0].content"),
    Case("http", "a chat message with an unknown role",
         ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
         r"'messages\[0\]\.role' must be one of system, developer, user, assistant; got \"robot\"", 400,
         param="messages[0].role"),
    Case("http", "chat message content that is not a string",
         ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
         r"'messages\[0\]\.content' must be a string", 400, param="messages[0].content"),
    Case("http", "an empty messages list",
         ("POST", "/v1/chat/completions", {"messages": []}), r"'messages' must be a list of 1 to", 400,
         param="messages"),
    Case("http", "a last chat message that is not from the user",
         ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}),
         r"last chat message must come from the user", 400, param="messages[1].role"),
    Case("http", "an unknown model name",
         ("POST", "/v1/completions", {"model": "gpt-5", "prompt": "hi"}), r"gpt-5", 404,
         param="model", error_code="model_not_found"),
    Case("http", "an unknown route", ("GET", "/v2/nothing", None), r".", 404),
]


def render(messages: dict[tuple[str, str], str]) -> str:
    """docs/errors.md: every case with the message a run of this file observed."""
    lines = ["# Errors users meet, and what gptkit says", "",
             "Every row is a case in `tests/test_bad_input.py`. The CLI exits with status 2 and",
             "prints one line (`gptkit COMMAND: error: ...`); the Python API raises",
             "`gptkit.GptkitError` (a `ValueError`) with the same sentence; the server answers in",
             "OpenAI's error shape (`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`).",
             "No traceback is shown for any of them. MODEL, DATA and TMP stand for the paths given.",
             ""]
    for title, cases, code_name in (("Command line", CLI_CASES, "exit status"),
                                    ("Python API", api_cases(), None),
                                    ("HTTP server", HTTP_CASES, "HTTP status")):
        head = "| mistake | message |" if code_name is None else f"| mistake | {code_name} | message |"
        lines += [f"## {title}", "", head, "|" + " --- |" * (head.count("|") - 1)]
        for case in cases:
            message = messages.get((case.where, case.mistake), "").replace("|", "\\|")
            code = "" if code_name is None else f" {case.code} |"
            lines.append(f"| {case.mistake} |{code} {message} |")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def env(tmp_path_factory, char_data) -> dict[str, str]:
    from gptkit import GPT, GPTConfig, Tokenizer

    tmp = tmp_path_factory.mktemp("bad")
    model = tmp / "model"
    tokenizer = Tokenizer.from_pretrained(char_data / "tokenizer")
    GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2,
                  n_embd=16)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    write(tmp / "empty.txt", "")
    write(tmp / "text.txt", "some text " * 100)
    write(tmp / "broken.jsonl", '{"text": "fine"}\n{not json\n')
    write(tmp / "nofield.jsonl", '{"body": "no text field"}\n')
    write(tmp / "list.jsonl", '["a list"]\n')
    write(tmp / "bad.toml", "max_step = 10\n")
    write(tmp / "random.bin", bytes(random.Random(0).randrange(256) for _ in range(20_000)))
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    for name, lines in {"chat_list": [["hi"]],
                        "chat_role": [{"messages": [user, {"role": "robot", "content": "x"}]}],
                        "chat_content": [{"messages": [user, answer]},
                                         {"messages": [{"role": "user", "content": 5}, answer]}],
                        "chat_empty": [{"messages": []}],
                        "chat_no_answer": [{"messages": [user]}],
                        "chat_unanswered": [{"messages": [user, answer]},
                                            {"messages": [user, answer, user]}],
                        "chat_no_question": [{"messages": [{"role": "system", "content": "s"},
                                                           answer]}]}.items():
        write(tmp / f"{name}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    _muon_run(tmp / "muon-run", char_data)
    return {"tmp": str(tmp), "model": str(model), "data": str(char_data)}


def _muon_run(out: Path, data: Path) -> None:
    """One step of Muon training, for resuming it as something else."""
    from gptkit.config import TrainConfig
    from gptkit.train import train

    train(TrainConfig(data=str(data), out=str(out), optimizer="muon", preset="tiny", n_layer=1,
                      n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=1, eval_interval=0,
                      device="cpu"), progress=False)


def run_case(case: Case, env: dict[str, str], capsys) -> tuple[str, int]:
    from gptkit import GptkitError

    if case.where == "cli":
        from gptkit.cli import main

        argv = [a.format(**env) for a in case.call]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        if case.out is not None:  # nothing is written on refusal
            assert not Path(case.out.format(**env)).exists(), case.out
        captured = capsys.readouterr()
        err = captured.err
        last = err.strip().splitlines()[-1]  # progress bars may precede it
        assert captured.out == "", captured.out  # every option is checked before any output
        assert "Traceback" not in err and err.count(" error: ") == 1, err
        assert last.startswith(f"gptkit {argv[0]}") or last.startswith("gptkit tokenizer"), err
        return last.split("error: ", 1)[-1], exit_info.value.code
    with pytest.raises(GptkitError) as error:
        case.call(env)
    return str(error.value), 0


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.mistake for c in CLI_CASES])
def test_cli(case, env, capsys):
    message, code = run_case(case, env, capsys)
    assert code == case.code
    assert re.search(case.match, message), message
    observed[case.where, case.mistake] = _generic(message, env)


def test_api(env, capsys):
    cases = api_cases()
    assert len(cases) >= 10
    for case in cases:
        message, _ = run_case(case, env, capsys)
        assert re.search(case.match, message), (case.mistake, message)
        assert "\n" not in message, message
        observed[case.where, case.mistake] = _generic(message, env)


@pytest.fixture(scope="module")
def http(env):
    from fastapi.testclient import TestClient

    from gptkit.serve import create_app

    with TestClient(create_app(env["model"], device="cpu")) as client:
        yield client


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.mistake for c in HTTP_CASES])
def test_http(case, http):
    method, route, body = case.call
    if isinstance(body, bytes):
        response = http.request(method, route, content=body, headers={"content-type": "application/json"})
    else:
        response = http.request(method, route, json=body)
    assert response.status_code == case.code, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(case.match, error["message"]), error["message"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", case.param, case.error_code), error
    observed[case.where, case.mistake] = error["message"]
    # the server is still healthy afterwards
    assert http.get("/health").status_code == 200


def test_table_has_at_least_thirty_cases():
    assert len(CLI_CASES) + len(api_cases()) + len(HTTP_CASES) >= 30


observed: dict[tuple[str, str], str] = {}


def _generic(message: str, env: dict[str, str]) -> str:
    """Paths of this test run replaced by placeholders, for the documentation."""
    for key in ("model", "data", "tmp"):
        message = message.replace(env[key], key.upper())
    return message


def test_docs_errors_md_lists_every_case():
    """docs/errors.md has a row for every case, showing a message that matches it.

    `GPTKIT_WRITE_ERRORS=1 python -m pytest tests/test_bad_input.py` rewrites it from the
    messages this run observed.
    """
    import os

    if os.environ.get("GPTKIT_WRITE_ERRORS") == "1":
        assert len(observed) == len(CLI_CASES) + len(api_cases()) + len(HTTP_CASES)
        DOC.write_text(render(observed))
    sections = DOC.read_text().split("\n## ")
    for case in CLI_CASES + api_cases() + HTTP_CASES:
        section = sections[{"cli": 1, "api": 2, "http": 3}[case.where]]
        row = next((line for line in section.splitlines() if line.startswith(f"| {case.mistake} |")),
                   None)
        assert row is not None, f"docs/errors.md lacks '{case.mistake}'"
        assert re.search(case.match, row.replace("\\|", "|")), row

