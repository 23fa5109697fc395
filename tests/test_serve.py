"""The HTTP server against a live uvicorn on 127.0.0.1: the official `openai` client,
greedy parity with offline generation, 64 concurrent requests, every error case."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI
from serve_helpers import _loaded, free_port, live_server, make_model_dir, offline

PROMPTS = ["the quick", "hello", "lazy dog. hel", "0123", "fox", "over the la", "w", "brown ;"]
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def url(model_dir):
    with live_server(model_dir, max_batch_size=8, max_queue=128) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completions_match_offline_generate(client, model_dir):
    result = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=24,
                                       temperature=0)
    assert [c.text for c in result.choices] == [offline(model_dir, p, 24) for p in PROMPTS[:3]]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.completion_tokens == 72
    assert result.usage.prompt_tokens == sum(len(p) for p in PROMPTS[:3])
    assert client.models.list().data[0].id == MODEL


def test_the_model_path_the_server_was_started_with_names_the_model_too(url, model_dir):
    """As vLLM and `transformers serve` name a model: clients may send the path."""
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/v1/completions", json={**body, "model": str(model_dir)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == offline(model_dir, "hello", 4)
        other = http.post("/v1/completions", json={**body, "model": str(model_dir.parent)})
        assert other.status_code == 404 and "serves 'tiny'" in other.json()["error"]["message"]


def test_streaming_equals_whole_and_reports_usage(client, model_dir):
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=30,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline(model_dir, "hello", 30)
    assert len(chunks) > 5  # pieces arrive as they are generated
    assert chunks[-1].usage.completion_tokens == 30


def test_chat_uses_the_plain_template(client, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reference = offline(model_dir, "be brief\n\nUser: hi\nAssistant:", 40, stop="\nUser:")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                           temperature=0)
    assert whole.choices[0].message.content == reference
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reference


def test_stop_strings_end_the_text(client, model_dir):
    reference = offline(model_dir, "the quick", 40)
    stop = reference[10:13]
    expected = reference[:reference.index(stop)]
    whole = client.completions.create(model=MODEL, prompt="the quick", max_tokens=40,
                                      temperature=0, stop=[stop, "@@"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model=MODEL, prompt="the quick", max_tokens=40,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_seed_logprobs_and_echo(client):
    def sample(seed):
        return [c.text for c in client.completions.create(
            model=MODEL, prompt="fox", max_tokens=20, n=3, temperature=1.0, seed=seed).choices]

    first = sample(7)
    assert len(first) == 3 and first == sample(7) and len(set(first)) > 1
    result = client.completions.create(model=MODEL, prompt="fox", max_tokens=5, temperature=0,
                                       logprobs=2, echo=True)
    choice = result.choices[0]
    assert choice.text.startswith("fox") and len(choice.text) == 8
    assert choice.logprobs.tokens == list(choice.text)
    assert choice.logprobs.token_logprobs[0] is None
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, logprobs=True, top_logprobs=3,
                                          presence_penalty=1.0, frequency_penalty=0.5)
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [3] * 4


def test_64_concurrent_requests(url, model_dir):
    expected = {p: offline(model_dir, p, 20) for p in PROMPTS}

    async def one(http, i):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0,
                "stream": i % 2 == 1}
        if not body["stream"]:
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return prompt, response.json()["choices"][0]["text"]
        text = ""
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return prompt, text

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    results = asyncio.run(run())
    assert all(text == expected[prompt] for prompt, text in results)


ERRORS = [
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": "a" * 200, "max_tokens": 100}, 400, "max_tokens"),  # beyond the context
    ({"prompt": "a", "n": 10**9}, 400, "n"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "logprobs": 10}, 400, "logprobs"),
    ({"prompt": "a", "seed": 1.5}, 400, "seed"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "temprature": 1}, 400, "temprature"),
    ({"prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": {"text": "a"}}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": "a" * 5000}, 400, "prompt"),  # a token bomb within the body limit
    ({"prompt": "\ud800"}, 400, "prompt"),  # a lone surrogate has no UTF-8 bytes
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
]


def test_error_cases_do_not_disturb_requests_in_flight(url, model_dir):
    """Every bad request gets OpenAI's error JSON naming the field; a stream going on at the
    same time finishes with the right text."""
    streamed = []

    def long_stream():
        body = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            streamed.extend(json.loads(line[6:])["choices"][0]["text"]
                            for line in response.iter_lines() if line.startswith("data: {"))

    thread = threading.Thread(target=long_stream)
    thread.start()
    with httpx.Client(base_url=url, timeout=60) as http:
        for body, status, param in ERRORS:
            response = http.post("/v1/completions", content=json.dumps(body))  # \ud800 escaped
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and param in error["message"], error
        chat_errors = [
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
            ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
            ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages[0].weight"),
            ({"messages": [{"role": "user", "content": "x"}],
              "response_format": {"type": "json_object"}}, "response_format"),
            ({"messages": [{"role": "user", "content": "x"}], "user": 5}, "user"),
            ({"messages": [{"role": "user", "content": "x"}], "min_p": 2}, "min_p"),
            ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0},
             "repetition_penalty"),
            ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
            ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
            ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        ]
        for body, param in chat_errors:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param
        raw_errors = [
            (b'{"prompt": "a",', 400, "not valid JSON"),
            (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
            (b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
            (b'["prompt"]', 400, "JSON object"),
            (b'{"prompt": "caf\xe9"}', 400, "not UTF-8: byte 0xe9 at position 15"),
            (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "larger than"),
        ]
        for raw, status, message in raw_errors:
            response = http.post("/v1/completions", content=raw,
                                 headers={"content-type": "application/json"})
            assert response.status_code == status and message in response.json()["error"]["message"]
        for method, path in (("GET", "/v1/nothing"), ("POST", "/v2/completions")):
            response = http.request(method, path)
            assert response.status_code == 404 and "Unknown route" in response.text
        assert http.get("/v1/completions").status_code == 405
    thread.join(timeout=120)
    assert "".join(streamed) == offline(model_dir, "hello", 200)


def test_api_key_and_queue_full(model_dir):
    with live_server(model_dir, api_key="s3cret", max_batch_size=1, max_queue=1) as url:
        body = {"prompt": "hello", "max_tokens": 150}
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # open, for load balancers
            assert http.get("/").status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = http.post("/v1/completions", json=body, headers=headers)
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"

        async def flood():
            headers = {"Authorization": "Bearer s3cret"}
            async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as http:
                return await asyncio.gather(*(http.post("/v1/completions", json=body)
                                              for _ in range(6)))

        responses = asyncio.run(flood())
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses  # 1 running + 1 queued fit
        busy = [r for r in responses if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" for r in busy)
        assert busy[0].json()["error"]["type"] == "rate_limit_error"
        assert set(statuses) == {200, 429}


def test_client_disconnect_frees_the_slot(url):
    def stats():
        return httpx.get(f"{url}/health").json()

    before = stats()["cancelled"]
    body = {"prompt": "hello", "max_tokens": 250, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first piece arrived; now hang up
    deadline = time.monotonic() + 30
    while stats()["active"] or stats()["cancelled"] == before:
        assert time.monotonic() < deadline, stats()
        time.sleep(0.05)
    assert stats()["cancelled"] == before + 1


def test_cli_serve_warns_prints_url_and_stops_on_sigterm(model_dir):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GPTKIT_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", "--model", str(model_dir), "--host", "0.0.0.0",
         "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert f":{port}/v1" in line
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "without --api-key" in err and "Traceback" not in err
    assert "context 256 tokens, device cpu, batch size 8, float32 activations" in err
    assert "GET /health 200" in err  # the access log


def test_lenient_openai_fields_are_accepted_and_sampling_extensions_honoured(client, model_dir):
    """Fields vLLM and llama.cpp accept: `user`, `response_format` text, `parallel_tool_calls`
    and a message's `name` are accepted and ignored; `top_k`, `repetition_penalty` and
    `min_p` (in `extra_body`, as the openai client sends them) change the sampling."""
    from gptkit.generate import generate

    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                            temperature=0).choices[0].message.content
    lenient = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, user="ann-42",
        response_format={"type": "text"}, parallel_tool_calls=False)
    assert lenient.choices[0].message.content == greedy
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # only the likeliest token stays: greedy
        sampled = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                 temperature=1.5, extra_body=extra)
        assert sampled.choices[0].message.content == greedy, extra
    prompt = "User: hi\nAssistant:"
    model, tokenizer = _loaded(model_dir)
    ids = tokenizer.encode(prompt, return_tensors="pt")
    penalized = tokenizer.decode(generate(model, ids, max_new_tokens=20, tokenizer=tokenizer,
                                          repetition_penalty=1.5)[0, ids.size(1):].tolist())
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                       extra_body={"repetition_penalty": 1.5, "top_k": 0})
    assert answer.choices[0].text == penalized != offline(model_dir, prompt, 20)


def test_one_model_by_id(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        card = http.get(f"/v1/models/{MODEL}")
        assert card.status_code == 200 and card.json()["id"] == MODEL
        assert card.json()["context_length"] == 256
        missing = http.get("/v1/models/gpt-4")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_fit_drops_the_oldest_exchanges_as_gptkit_chat_does(url, model_dir):
    """/v1/chat/fit (what the playground asks before each answer) keeps the messages a
    `ChatSession` keeps, and clamps the answer to the room left."""
    from gptkit.chat import ChatSession

    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"question {i} " + "x" * 20},
                  {"role": "assistant", "content": f"answer {i} " + "y" * 20}]
    asked = [{"role": "system", "content": "be brief"}, *turns, {"role": "user", "content": "last"}]
    with httpx.Client(base_url=url, timeout=60) as http:
        fit = http.post("/v1/chat/fit", json={"messages": asked, "max_tokens": 100}).json()
        model, tokenizer = _loaded(model_dir)
        session = ChatSession(model, tokenizer, max_new_tokens=100, notice=lambda text: None)
        session.messages = asked[:-1]
        _, room, kept = session.prompt("last")
        assert fit["messages"] == kept and fit["dropped"] == len(asked) - len(kept) > 0
        assert fit["messages"][0] == asked[0] and fit["max_tokens"] == room
        assert fit["prompt_tokens"] + fit["max_tokens"] <= fit["context_length"] == 256
        # an answer longer than the context allows is clamped, not refused
        clamped = http.post("/v1/chat/fit", json={"messages": asked[-1:], "max_tokens": 10_000})
        assert clamped.json()["max_tokens"] == 256 - clamped.json()["prompt_tokens"]
        chat = http.post("/v1/chat/completions", json={
            "messages": fit["messages"], "max_tokens": fit["max_tokens"], "temperature": 0})
        assert chat.status_code == 200, chat.text
        too_long = http.post("/v1/chat/fit", json={
            "messages": [{"role": "user", "content": "z" * 400}]})
        assert too_long.status_code == 400 and "no room" in too_long.json()["error"]["message"]


def test_cors_origin_and_access_log(model_dir):
    """--cors-origin lets that origin's pages call the API (none by default); every
    request gets one access-log line."""
    from fastapi.testclient import TestClient

    from gptkit.serve import create_app

    lines: list[str] = []
    origin = {"Origin": "http://localhost:3000"}
    preflight = {**origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(model_dir, device="cpu", cors_origins=["http://localhost:3000"],
                               access_log=lines.append)) as http:
        answer = http.options("/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert http.get("/v1/models", headers=origin).headers[
            "access-control-allow-origin"] == "http://localhost:3000"
        http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
        http.get("/nothing")
    assert [line.split()[1:4] for line in lines] == [
        ["OPTIONS", "/v1/chat/completions", "200"], ["GET", "/v1/models", "200"],
        ["POST", "/v1/completions", "200"], ["GET", "/nothing", "404"]]
    assert all(line.endswith("s") for line in lines)
    with TestClient(create_app(model_dir, device="cpu")) as http:
        assert "access-control-allow-origin" not in http.get("/v1/models", headers=origin).headers


def test_a_taken_or_impossible_port_is_one_sentence(model_dir, capsys):
    """No traceback and no "serving on" banner: the port is taken before the model loads."""
    import socket

    from gptkit.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, message in ((["--port", str(port)], f"port {port} on 127.0.0.1 is already in use"),
                               (["--port", "70000"], "--port 70000 is out of range")):
            with pytest.raises(SystemExit) as exit_:
                main(["serve", "--model", str(model_dir), "--device", "cpu", *flags])
            captured = capsys.readouterr()
            assert exit_.value.code == 2 and message in captured.err, captured
            assert "Traceback" not in captured.err and "http://" not in captured.out
