"""GGUF export figures for docs/export.md: export time and file sizes, and decoding speed
of llama.cpp against `gptkit generate` on the same model.

    python benchmarks/bench_export.py [--skip-speed] [--tokens 128] [--repeats 3]

1. GPT-2 124M-shaped random weights with GPT-2's vocabulary (data/gpt2-tokenizer): the
   seconds `export_gguf` takes per dtype (reading, converting, hashing the source and
   writing, torch already imported), the CPU seconds of this process, and the file sizes.
2. A `small`-preset model (6 layers, 384 wide) with an 8,192-token BPE, random weights:
   greedy tokens per second after a 16-token prompt. llama.cpp runs through
   tests/llamacpp/llamacpp.mjs (node-llama-cpp 3.21.1, CPU, installed by the tests into
   .cache/llamacpp or $GPTKIT_LLAMACPP_DIR), timing the decode after a warm-up. gptkit
   runs the real `gptkit generate --greedy` command twice, with --max-new-tokens 8 and
   8 + N, and divides N by the difference of the wall times, so start-up and loading
   cancel out (OMP_NUM_THREADS sets torch's threads). Both run with 1 and with 2 threads:
   on a busy machine a second spinning thread can cost more than it gives. Each figure is
   the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPT = REPO / "tests" / "llamacpp" / "llamacpp.mjs"
PROMPT = "The meaning of a word is its use in the language, and"


def random_model_dir(directory: Path, preset: str, tokenizer) -> int:
    """A model of `preset` with seeded random weights and `tokenizer`, saved in `directory`;
    returns its number of parameters."""
    import torch

    from gptkit import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=tokenizer.vocab_size,
                                      eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.num_params()


def export_figures(root: Path) -> None:
    from gptkit import Tokenizer
    from gptkit.export.gguf import export_gguf

    model_dir = root / "gpt2-124m"
    random_model_dir(model_dir, "gpt2", Tokenizer.from_pretrained(REPO / "data" / "gpt2-tokenizer"))
    source = (model_dir / "model.safetensors").stat().st_size
    print(f"GPT-2 124M-shaped, random weights: model.safetensors {source / 1e6:.1f} MB")
    sizes = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        out = root / f"gpt2-124m-{dtype}.gguf"
        seconds, cpu = [], []
        for _ in range(3):
            start = time.process_time()
            seconds.append(export_gguf(model_dir, out, dtype=dtype, force=True,
                                       progress=False).seconds)
            cpu.append(time.process_time() - start)
        sizes[dtype] = out.stat().st_size
        print(f"  {dtype:5s} export {statistics.median(seconds):5.2f} s (runs: "
              f"{', '.join(f'{s:.2f}' for s in seconds)}; CPU {statistics.median(cpu):.2f} s)"
              f"  file {sizes[dtype] / 1e6:7.1f} MB  {sizes[dtype] / sizes['f32']:.3f} of f32")


def speed_figures(root: Path, tokens: int, repeats: int) -> None:

    from gptkit import Tokenizer
    from gptkit.export.gguf import export_gguf

    llamacpp = Path(os.environ.get("GPTKIT_LLAMACPP_DIR") or REPO / ".cache" / "llamacpp")
    if not (llamacpp / "node_modules" / "node-llama-cpp").is_dir():
        sys.exit(f"node-llama-cpp is not installed in {llamacpp}; run "
                 "`python -m pytest tests/test_export_gguf.py` once (it installs it) or set "
                 "GPTKIT_LLAMACPP_DIR.")
    text = (REPO / "data" / "shakespeare" / "input.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer.train(texts=[text], vocab_size=8192)
    model_dir = root / "small"
    parameters = random_model_dir(model_dir, "small", tokenizer)
    prompt = tokenizer.encode(PROMPT)
    print(f"\n`small` preset ({parameters / 1e6:.1f}M "
          f"parameters, vocab {tokenizer.vocab_size}), {len(prompt)}-token prompt, {tokens} "
          f"greedy tokens, load average {os.getloadavg()[0]:.1f}")

    jobs = []
    for dtype in ("f32", "f16", "q8_0"):
        path = root / f"small-{dtype}.gguf"
        export_gguf(model_dir, path, dtype=dtype, force=True, progress=False)
        for threads in (1, 2):
            jobs += [{"path": str(path), "context": 256, "threads": threads,
                      "bench": {"prompt": prompt, "tokens": tokens}, "label": (dtype, threads)}
                     for _ in range(repeats)]
    (root / "jobs.json").write_text(json.dumps({"models": jobs}))
    result = subprocess.run(["node", str(NODE_SCRIPT), str(root / "jobs.json")],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "GPTKIT_LLAMACPP_DIR": str(llamacpp)})
    runs: dict[tuple[str, int], list[float]] = {}
    for job, out in zip(jobs, json.loads(result.stdout)["models"], strict=True):
        runs.setdefault(tuple(job["label"]), []).append(out["bench"]["tokens_per_s"])
    for (dtype, threads), values in runs.items():
        print(f"  llama.cpp {dtype:5s} {threads} thread{'s' if threads > 1 else ' '}  "
              f"{statistics.median(values):7.1f} tokens/s  (runs: "
              f"{', '.join(f'{v:.0f}' for v in values)})")

    # (not --compile: its 10-30 s first compile varies by more than 128 tokens take, so the
    # difference of two runs does not measure its decoding; docs/performance.md does)
    for label, flags in (("fp32", []), ("bfloat16", ["--dtype", "bfloat16"]),
                         ("int8", ["--quantize", "int8"])):
        for threads in (1, 2):
            values = []
            for _ in range(repeats):
                short = _generate_seconds(model_dir, 8, flags, threads)
                long = _generate_seconds(model_dir, 8 + tokens, flags, threads)
                values.append(tokens / (long - short))
            print(f"  gptkit generate {label:15s} {threads} thread{'s' if threads > 1 else ' '} "
                  f"{statistics.median(values):7.1f} tokens/s  "
                  f"(runs: {', '.join(f'{v:.0f}' for v in values)})")


def _generate_seconds(model_dir: Path, max_new_tokens: int, flags: list[str],
                      threads: int) -> float:
    """Wall seconds of one `gptkit generate` with torch limited to `threads` threads."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptkit", "generate", "--model", str(model_dir),
                    PROMPT, "--greedy", "--max-new-tokens", str(max_new_tokens),
                    "--device", "cpu", *flags],
                   check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-speed", action="store_true", help="export figures only")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_figures(Path(tmp))
        if not args.skip_speed:
            speed_figures(Path(tmp), args.tokens, args.repeats)


if __name__ == "__main__":
    main()
