"""An engine that survives: a failure in one request fails that request alone, and ids a
tokenizer cannot decode (a vocabulary padded beyond it) are never generated."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import TEXT, collect, make_model_dir, offline, request, serve_all

from gptkit import GPT, GPTConfig, Tokenizer
from gptkit.generate import TextStream, generate, stream_generate
from gptkit.inference import load_for_inference
from gptkit.serve.engine import Engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("failures") / "tiny", block_size=128)


def test_a_row_that_fails_mid_batch_fails_alone(model_dir, monkeypatch):
    model, tokenizer = load_for_inference(model_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=64)
    prompts = [TEXT[i:i + 8] for i in (0, 10, 20, 30)]
    pairs = [request(tokenizer, p, 12, temperature=0) for p in prompts]
    doomed = pairs[1][0]
    push = TextStream.push
    pushes = {"doomed": 0}

    def failing_push(stream, token):
        # the doomed request's 5th token fails while the other rows are mid-generation
        row = engine._rows[1]
        if row is not None and row.request is doomed and stream is row.text:
            pushes["doomed"] += 1
            if pushes["doomed"] == 5:
                raise RuntimeError("injected failure")
        return push(stream, token)

    monkeypatch.setattr(TextStream, "push", failing_push)
    engine.submit([r for r, _ in pairs])
    engine.start()
    try:
        results = [collect(inbox)[:2] for _, inbox in pairs]
        monkeypatch.setattr(TextStream, "push", push)
        later, inbox = request(tokenizer, prompts[1], 12, temperature=0)  # the engine still serves
        engine.submit([later])
        after = collect(inbox)[:2]
        alive = engine.alive
    finally:
        engine.close()
    assert results[1][1] == "generation failed: RuntimeError: injected failure"
    for index in (0, 2, 3):
        assert results[index] == (offline(model_dir, prompts[index], 12), "length")
    assert after == (offline(model_dir, prompts[1], 12), "length")
    assert alive and engine.stats()["completed"] == 5


def test_a_prompt_that_fails_its_shared_prefill_fails_alone(model_dir, monkeypatch):
    model, tokenizer = load_for_inference(model_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=64)
    prompts = ["the quick brown", "hello! world", "lazy dog. 0123"]
    poison = tokenizer.encode("!")[0]
    hidden_states = model.hidden_states

    def failing(idx, *args, **kwargs):  # any prefill pass that carries the second prompt
        if idx.size(1) > 1 and bool((idx == poison).any()):
            raise RuntimeError("injected prefill failure")
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)
    results = serve_all(engine, [request(tokenizer, p, 10, temperature=0) for p in prompts])
    assert results[1][1] == "generation failed: RuntimeError: injected prefill failure"
    for index in (0, 2):
        assert results[index] == (offline(model_dir, prompts[index], 10), "length", 10)


def test_a_scheduler_that_breaks_is_reported_not_hidden(model_dir, monkeypatch):
    model, tokenizer = load_for_inference(model_dir, "cpu")
    engine = Engine(model, tokenizer, max_batch_size=2)
    told = []
    engine.on_fatal = lambda: told.append(True)
    monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(MemoryError("boom")))
    first, inbox = request(tokenizer, "hello", 4, temperature=0)
    engine.submit([first])
    engine.start()
    text, error, _ = collect(inbox)
    engine._running.exception(timeout=30)  # the scheduler has ended
    assert error.startswith("the generation engine stopped: boom")
    assert not engine.alive and isinstance(engine.fatal, MemoryError) and told == [True]
    engine.close()


def test_health_says_when_the_engine_has_stopped(model_dir):
    from fastapi.testclient import TestClient

    from gptkit.serve import create_app

    app = create_app(model_dir, device="cpu")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine = app.state.engine
        engine.fatal = RuntimeError("gone")
        reply = client.get("/health")
        assert reply.status_code == 503 and reply.json()["status"] == "engine stopped"
        engine.fatal = None


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A model whose vocabulary is padded to twice its tokenizer's, with the padding rows of
    the head made the most likely tokens: unmasked, every decoding path would pick them."""
    directory = tmp_path_factory.mktemp("padded") / "model"
    tokenizer = Tokenizer.train(texts=[TEXT], kind="char", vocab_size=64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2 * tokenizer.vocab_size, block_size=64, n_layer=1,
                          n_head=2, n_embd=16, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.vocab_size:] *= 50  # tied head: huge logits
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_padded_vocabulary_rows_are_never_generated(padded):
    model, tokenizer = load_for_inference(padded, "cpu")
    limit = tokenizer.vocab_size
    assert model.token_limit == limit < model.config.vocab_size
    with torch.no_grad():  # the raw model would pick a padding row
        assert int(model(tokenizer.encode("the", return_tensors="pt"))[0, -1].argmax()) >= limit
    ids = tokenizer.encode("the quick", return_tensors="pt")
    paths = {
        "greedy": generate(model, ids, max_new_tokens=16),
        "sampled": generate(model, ids, max_new_tokens=16, do_sample=True, seed=0),
        "beam": generate(model, ids, max_new_tokens=16, num_beams=3, num_return_sequences=3),
        "speculative": generate(model, ids, max_new_tokens=16, draft_model=model),
    }
    for name, out in paths.items():
        new = out[:, ids.size(1):]
        assert new.numel() and int(new.max()) < limit, name
    assert "".join(stream_generate(model, tokenizer, "the quick", max_new_tokens=16))


def test_the_engine_never_generates_padding_rows(padded):
    model, tokenizer = load_for_inference(padded, "cpu")
    engine = Engine(model, tokenizer, max_batch_size=2)
    pairs = [request(tokenizer, "the quick", 16, temperature=0),
             request(tokenizer, "hello", 16, temperature=0)]
    results = serve_all(engine, pairs)
    assert [reason for _, reason, _ in results] == ["length", "length"]


def test_the_server_takes_the_fast_layouts_and_keeps_greedy_text(model_dir):
    from fastapi.testclient import TestClient

    from gptkit.kernels.int8 import Int8Linear
    from gptkit.serve import create_app

    app = create_app(model_dir, device="cpu", quantize="int8")
    assert isinstance(app.state.engine.model.transformer.h[0].mlp.c_fc, Int8Linear)
    fast, tokenizer = load_for_inference(model_dir, "cpu", fast=True, quantize="int8")
    want = tokenizer.decode(generate(fast, tokenizer.encode("hello", return_tensors="pt"),
                                     max_new_tokens=8)[0, 5:].tolist())
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello",
                                                     "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == want
