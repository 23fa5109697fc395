"""Shared by the serving tests: a tiny model directory, a live server, offline references."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

TEXT = "the quick brown fox jumps over the lazy dog. hello world! 0123456789 ,;:?\n"


def make_model_dir(directory: Path, block_size: int = 256) -> Path:
    """A random char-level model that never ends its text: every request runs to its limit.

    Weights are scaled up so that logits are far apart (batched and single-row greedy
    picks cannot differ by float noise), and end-of-text gets a large negative logit
    through a constant feature of the final LayerNorm.
    """
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(texts=[TEXT], vocab_size=64, kind="char")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2,
                          n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
        model.transformer.ln_f.weight[0] = 0.0  # feature 0 of the final hidden state is 1
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[tokenizer.eos_token_id] = 0.0
        model.transformer.wte.weight[tokenizer.eos_token_id, 0] = -100.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def offline(model_dir: Path, prompt: str, max_new_tokens: int, stop: str | None = None) -> str:
    """What `gptkit.generate.generate` continues `prompt` with, greedily."""
    from gptkit.generate import generate

    model, tokenizer = _loaded(model_dir)
    ids = tokenizer.encode(prompt, return_tensors="pt")
    out = generate(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
    text = tokenizer.decode(out[0, ids.size(1):].tolist())
    return text[:text.index(stop)] if stop and stop in text else text


_models: dict[Path, tuple] = {}


def _loaded(model_dir: Path) -> tuple:
    from gptkit.inference import load_for_inference

    if model_dir not in _models:
        _models[model_dir] = load_for_inference(model_dir, "cpu")
    return _models[model_dir]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model_dir: Path, **options) -> Iterator[str]:
    """Run `create_app(model_dir, **options)` under uvicorn on 127.0.0.1; yields its URL."""
    import uvicorn

    from gptkit.serve import create_app

    app = create_app(model_dir, device="cpu", **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def request(tokenizer, prompt: str, max_new: int, **kwargs):
    """An engine request for `prompt` whose events land in the returned queue."""
    import queue

    from gptkit.serve.engine import GenerationRequest

    inbox: queue.Queue = queue.Queue()
    return GenerationRequest(tokenizer.encode(prompt), max_new, inbox.put, **kwargs), inbox


def collect(inbox) -> tuple[str, str | None, int]:
    """A request's whole text, how it ended (finish reason or error) and its token count."""
    text = ""
    while True:
        event = inbox.get(timeout=60)
        text += event.text
        if event.finish_reason or event.error:
            return text, event.finish_reason or event.error, event.completion_tokens


def serve_all(engine, pairs) -> list[tuple[str, str | None, int]]:
    """Submit (request, inbox) pairs to a new engine, run it until each has finished, close
    it, and return what `collect` gives for each."""
    engine.submit([r for r, _ in pairs])
    engine.start()
    try:
        return [collect(inbox) for _, inbox in pairs]
    finally:
        engine.close()
