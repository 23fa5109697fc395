"""The server under load and attack: random valid and hostile requests, zero 5xx allowed.

    python benchmarks/bench_load.py [--model DIR] [--requests 1000] [--concurrency 32]

Starts `gptkit serve` as its own process on 127.0.0.1 (a tiny random model when --model
is not given), then sends a mix of valid completions and chat requests (some streaming,
some abandoned mid-stream) and invalid ones (wrong types, unknown fields, malformed or
deeply nested JSON, oversized bodies, huge n / max_tokens, prompt token bombs). It prints
the requests sent, the answers by status, latency percentiles and the server's resident
memory before and after. tests/test_load.py runs a shorter version of `run_load` in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

PROMPTS = ["the quick", "hello", "lazy dog. hel", "0123", "fox"]


def hostile_bodies(rng: random.Random) -> list[bytes | dict]:
    """Requests that must be refused with a 4xx, never answered with a 5xx."""
    return [
        {"prompt": "a", "temperature": -1},
        {"prompt": "a", "temperature": "hot"},
        {"prompt": "a", "max_tokens": 10**9},
        {"prompt": "a", "n": 10**9},
        {"prompt": ["x"] * 10_000},
        {"prompt": "a" * 100_000},  # a token bomb
        {"prompt": "a", "stop": ["a"] * 100},
        {"prompt": "a", "unknown_field": 1},
        {"prompt": None},
        {"messages": "not a list"},
        {"prompt": [rng.randint(-10, 10**9) for _ in range(8)]},
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,  # deeply nested
        b'{"prompt": "' + b"x" * (3 << 20) + b'"}',  # over the body limit
        b"\xff\xfe\x00garbage",
        b"",
    ]


async def one_request(http: httpx.AsyncClient, rng: random.Random, model: str,
                      expected: dict[str, str], counts: Counter, latencies: list[float]) -> None:
    kind = rng.random()
    start = time.perf_counter()
    route = "/v1/completions"
    if kind < 0.35:  # invalid
        body = rng.choice(hostile_bodies(rng))
        if isinstance(body, bytes):
            response = await http.post(route, content=body, headers={"content-type": "application/json"})
        else:
            response = await http.post(rng.choice([route, "/v1/chat/completions"]),
                                       json={"model": model, **body})
        counts[response.status_code] += 1
        return
    prompt = rng.choice(PROMPTS)
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    if kind < 0.55:  # streaming, sometimes abandoned after the first chunk
        abandon = rng.random() < 0.3
        text = ""
        async with http.stream("POST", route, json={**body, "stream": True}) as response:
            counts[response.status_code] += 1
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if abandon:
                        counts["abandoned"] += 1
                        return
        if text != expected[prompt]:
            counts["wrong text"] += 1
    elif kind < 0.7:  # chat
        response = await http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
        counts[response.status_code] += 1
    else:
        response = await http.post(route, json=body)
        counts[response.status_code] += 1
        if response.status_code == 200 and response.json()["choices"][0]["text"] != expected[prompt]:
            counts["wrong text"] += 1
    latencies.append(time.perf_counter() - start)


async def run_load(url: str, model: str, expected: dict[str, str], requests: int,
                   concurrency: int, seed: int = 0) -> tuple[Counter, list[float]]:
    """Send `requests` random requests, `concurrency` at a time; the answers by status."""
    counts: Counter = Counter()
    latencies: list[float] = []
    rng = random.Random(seed)
    queue = list(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            await one_request(http, rng, model, expected, counts, latencies)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return counts, latencies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a tiny random model)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import free_port, make_model_dir, offline

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model_dir(Path(tmp) / "tiny")
        expected = {p: offline(model_dir, p, 12) for p in PROMPTS}
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "gptkit", "serve", "--model", str(model_dir),
                                   "--port", str(port), "--device", "cpu", "--max-queue", "256"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            asyncio.run(run_load(url, model_dir.name, expected, 64, args.concurrency, 1))  # warm up
            before = rss_mb(server.pid)
            start = time.perf_counter()
            counts, latencies = asyncio.run(run_load(url, model_dir.name, expected, args.requests,
                                                     args.concurrency))
            seconds = time.perf_counter() - start
            after = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    latencies.sort()
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str))
    print(f"{args.requests} requests at concurrency {args.concurrency} in {seconds:.1f}s")
    print(f"answers: {by_status}")
    print(f"5xx: {sum(v for k, v in counts.items() if isinstance(k, int) and k >= 500)}, "
          f"wrong greedy texts: {counts['wrong text']}")
    if latencies:
        print(f"latency of valid requests: p50 {latencies[len(latencies) // 2]:.2f}s, "
              f"p99 {latencies[int(len(latencies) * 0.99)]:.2f}s")
    print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB)")


if __name__ == "__main__":
    main()
