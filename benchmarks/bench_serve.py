"""Serving throughput and latency: continuous batching against one-request-at-a-time serving.

Starts two real `gptkit serve` processes on the same random `small` model (a byte-level
BPE tokenizer of 8,192 tokens trained on Python's bundled docs): one batching up to 32
requests per forward pass, one with --max-batch-size 1 (sequential serving, the same code
path otherwise). Clients keep 1, 8 and 32 greedy /v1/completions requests in flight and
the table reports generated tokens/s and p50/p99 request latency for each.

    python benchmarks/bench_serve.py           # ~2 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --quick   # fewer requests, ~1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONCURRENCY = (1, 8, 32)
PROMPT_WORDS = 24
MAX_TOKENS = 64


def make_model(directory: Path) -> None:
    import pydoc_data.topics

    import torch

    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(texts=list(pydoc_data.topics.topics.values()), vocab_size=8192)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("small", vocab_size=tokenizer.vocab_size))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def start_server(model: Path, batch: int, device: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", "--model", str(model), "--port", str(port),
         "--max-batch-size", str(batch), "--max-queue", "1024", "--device", device],
        stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}/health").raise_for_status()
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


async def load(url: str, concurrency: int, requests: int, prompts: list[str]
               ) -> tuple[float, list[float], int]:
    """Keep `concurrency` requests in flight until `requests` are done: seconds, latencies,
    generated tokens."""
    latencies: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            response = await http.post("/v1/completions", json={
                "prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS, "temperature": 0})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one(http, 0)  # warm up
        latencies.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(http, i) for i in range(requests)))
    return time.perf_counter() - start, latencies, tokens


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per level")
    parser.add_argument("--device", default="cpu", help="where the servers run (default: cpu)")
    args = parser.parse_args()
    import pydoc_data.topics

    words = " ".join(pydoc_data.topics.topics.values()).split()
    prompts = [" ".join(words[i * 50:i * 50 + PROMPT_WORDS]) for i in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "small"
        make_model(model)
        results: dict[tuple[str, int], tuple[float, float, float]] = {}
        for mode, batch in (("sequential", 1), ("batched", 32)):
            process, url = start_server(model, batch, args.device)
            try:
                for concurrency in CONCURRENCY:
                    requests = max(8, concurrency * (1 if args.quick else 2))
                    seconds, latencies, tokens = asyncio.run(
                        load(url, concurrency, requests, prompts))
                    results[(mode, concurrency)] = (tokens / seconds, percentile(latencies, 50),
                                                    percentile(latencies, 99))
                    print(f"{mode:>10} c={concurrency:<3} {requests} requests {tokens} tokens "
                          f"in {seconds:.1f}s", file=sys.stderr)
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(f"\nsmall preset on {args.device}, greedy, {MAX_TOKENS} new tokens per request, "
          f"prompts of ~{PROMPT_WORDS} words\n")
    print("| concurrency | serving | tokens/s | p50 latency (s) | p99 latency (s) | speed-up |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for concurrency in CONCURRENCY:
        base = results[("sequential", concurrency)][0]
        for mode in ("sequential", "batched"):
            tps, p50, p99 = results[(mode, concurrency)]
            print(f"| {concurrency} | {mode} | {tps:,.0f} | {p50:.2f} | {p99:.2f} | "
                  f"{tps / base:.1f}x |")


if __name__ == "__main__":
    main()
