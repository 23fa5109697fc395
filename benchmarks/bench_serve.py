"""Serving throughput and latency: `gptkit serve` against transformers' own server.

For each model (a random `small`-shape GPT-2, 6 x 384, once with GPT-2's 50,257-token
vocabulary and once with an 8,192-token BPE trained on Python's bundled docs), saved once
and served from the same directory by:

- `gptkit serve --max-batch-size 32` (continuous batching),
- `transformers serve DIR --continuous-batching` (transformers' paged continuous batching),
- `transformers serve DIR` (one request at a time),

clients keep 1, 8 and 32 greedy `/v1/completions` requests of 64 new tokens in flight.
The table gives generated tokens/s (from `usage`), p50/p99 request latency, time to first
token of streamed requests, and gptkit's ratio to the better peer; `gptkit generate`'s own
speed on the same model, one request at a time without a server, is the bound for
concurrency 1. Servers run one at a
time, in the same process environment, so the ratios are measured on equal terms.

    python benchmarks/bench_serve.py            # ~15 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --quick    # fewer requests, 8k vocabulary only
    python benchmarks/bench_serve.py --vocabulary gpt2 --only gptkit   # one model, one server
    python benchmarks/bench_serve.py --real     # SmolLM2-135M against llama.cpp's server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
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
REPO = Path(__file__).resolve().parents[1]


def make_model(directory: Path, vocabulary: str) -> None:
    """A random `small` GPT-2 saved by transformers, with gptkit's tokenizer files."""
    import pydoc_data.topics

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkit.tokenizer import Tokenizer

    if vocabulary == "gpt2":
        tokenizer = Tokenizer.from_pretrained(REPO / "data" / "gpt2-tokenizer")
    else:
        tokenizer = Tokenizer.train(texts=list(pydoc_data.topics.topics.values()), vocab_size=8192)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=256, n_embd=384, n_layer=6,
                        n_head=6, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"{url}/v1/models", timeout=5).raise_for_status()
            return process
        except (httpx.TransportError, httpx.HTTPStatusError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"{command[0]} did not start; see {log}") from None
            time.sleep(0.5)


def real_servers(model: Path, gguf: Path) -> dict[str, list[str]]:
    """gptkit and llama.cpp's OpenAI server (llama-cpp-python, built for this CPU) on the
    same real model, fp32 / f32."""
    return {"gptkit": [sys.executable, "-m", "gptkit", "serve", "--model", str(model),
                       "--max-batch-size", "32", "--max-queue", "1024", "--device", "cpu"],
            "llama.cpp server": [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "4096",
                                 "--host", "127.0.0.1"]}


def servers(model: Path) -> dict[str, list[str]]:
    """The command line of each server (the port appended later)."""
    transformers = shutil.which("transformers")
    found = {"gptkit": [sys.executable, "-m", "gptkit", "serve", "--model", str(model),
                        "--max-batch-size", "32", "--max-queue", "1024", "--device", "cpu"]}
    if transformers is None:
        print("transformers' CLI is not installed: only gptkit is measured", file=sys.stderr)
        return found
    peer = [transformers, "serve", str(model), "--device", "cpu", "--host", "127.0.0.1",
            "--log-level", "warning"]
    found["transformers CB"] = [*peer, "--continuous-batching"]
    found["transformers"] = peer
    return found


async def load(url: str, model: str, concurrency: int, requests: int, prompts: list[str],
               stream: bool) -> tuple[float, list[float], list[float], int]:
    """Keep `concurrency` requests in flight until `requests` are done: seconds, latencies,
    times to first token (streamed only), generated tokens."""
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS,
                "temperature": 0}
        async with gate:
            start = time.perf_counter()
            if not stream:
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                first = None
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                if first is not None:
                    first_tokens.append(first)
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as http:
        await one(http, 0)  # warm up
        latencies.clear()
        first_tokens.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(http, i) for i in range(requests)))
    return time.perf_counter() - start, latencies, first_tokens, tokens


def generate_speed(model: Path, prompts: list[str], runs: int = 6) -> float:
    """Tokens/s of `gptkit generate`'s engine in this process, one greedy request of
    MAX_TOKENS at a time (prefill included, as in a server's latency): the bound a
    server at concurrency 1 can approach."""
    import torch

    from gptkit.generate import generate
    from gptkit.inference import load_for_inference

    gpt, tokenizer = load_for_inference(model, "cpu", fast=True, compile=None)  # as the CLI
    speeds = []
    with torch.inference_mode():
        for i in range(runs + 1):
            ids = tokenizer.encode(prompts[i], return_tensors="pt")
            start = time.perf_counter()
            generate(gpt, ids, max_new_tokens=MAX_TOKENS, eos_token_id=[])
            speeds.append(MAX_TOKENS / (time.perf_counter() - start))
    return statistics.median(speeds[1:])  # the first run warms up


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests; 8k vocabulary only")
    parser.add_argument("--only", help="measure only this server (gptkit, 'transformers CB', transformers)")
    parser.add_argument("--vocabulary", choices=("gpt2", "8k"), help="measure only this model")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M against llama.cpp's server instead (see bench_real.py)")
    args = parser.parse_args()
    import pydoc_data.topics

    words = " ".join(pydoc_data.topics.topics.values()).split()
    prompts = [" ".join(words[i * 50:i * 50 + PROMPT_WORDS]) for i in range(64)]
    vocabularies = (("SmolLM2",) if args.real else (args.vocabulary,) if args.vocabulary
                    else ("8k",) if args.quick else ("gpt2", "8k"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocabulary in vocabularies:
            if args.real:
                sys.path.insert(0, str(REPO / "benchmarks"))
                from bench_real import fetch_model

                model, files = fetch_model()
                commands = real_servers(model, files["f32"])
            else:
                model = Path(tmp) / f"small-{vocabulary}"
                make_model(model, vocabulary)
                commands = servers(model)
            results: dict[tuple[str, int], tuple[float, float, float, float]] = {}
            for name, command in commands.items():
                if args.only and name != args.only:
                    continue
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                process = start([*command, "--port", str(port)], url, Path(tmp) / f"{name}.log")
                try:
                    for concurrency in CONCURRENCY:
                        requests = concurrency * (2 if args.quick else 4) if concurrency > 1 else 6
                        seconds, latencies, _, tokens = asyncio.run(
                            load(url, str(model), concurrency, requests, prompts, stream=False))
                        _, _, firsts, _ = asyncio.run(
                            load(url, str(model), concurrency, max(concurrency, 4), prompts,
                                 stream=True))
                        results[(name, concurrency)] = (
                            tokens / seconds, percentile(latencies, 50), percentile(latencies, 99),
                            statistics.median(firsts) if firsts else float("nan"))
                        print(f"{vocabulary} {name:>16} c={concurrency:<3} {requests} requests "
                              f"{tokens} tokens in {seconds:.1f}s", file=sys.stderr)
                finally:
                    process.terminate()
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
            if not args.only or args.only == "gptkit":
                results[("gptkit generate, no server", 1)] = (
                    generate_speed(model, prompts), float("nan"), float("nan"), float("nan"))
            rows.append((vocabulary, results))
    shape = "SmolLM2-135M, fp32 / f32" if args.real else "small shape (6 x 384)"
    print(f"\n{shape} on CPU, greedy, {MAX_TOKENS} new tokens per request, "
          f"prompts of ~{PROMPT_WORDS} words\n")
    print("| vocabulary | concurrency | server | tokens/s | p50 (s) | p99 (s) | TTFT p50 (s) "
          "| gptkit / best peer |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for vocabulary, results in rows:
        for concurrency in CONCURRENCY:
            peers = [results[k][0] for k in results
                     if k[1] == concurrency and not k[0].startswith("gptkit")]
            for (name, level), (tps, p50, p99, ttft) in results.items():
                if level != concurrency:
                    continue
                ratio = (f"{tps / max(peers):.2f}x" if name == "gptkit" and peers else "")
                print(f"| {vocabulary} | {concurrency} | {name} | {tps:,.0f} | {p50:.2f} | "
                      f"{p99:.2f} | {ttft:.2f} | {ratio} |")
        alone, served = results.get(("gptkit generate, no server", 1)), results.get(("gptkit", 1))
        if alone and served:
            print(f"\n{vocabulary}: gptkit serve at concurrency 1 runs at {served[0] / alone[0]:.0%} "
                  "of `gptkit generate`'s speed on the same model.")


if __name__ == "__main__":
    main()
