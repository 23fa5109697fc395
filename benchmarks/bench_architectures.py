"""Speed of each architecture family next to GPT-2 and next to transformers running it.

    python benchmarks/bench_architectures.py [--quick] [--compile] [--threads 1]

Training: tokens/s of one AdamW step (forward with the fused head + loss, backward,
clipping, the optimizer) for gpt2, llama, qwen3 and nanochat at the same width and depth,
eager and (with --compile) under `torch.compile`, and the same family's transformers
model (`*ForCausalLM`, sdpa attention) doing the same step on the same weights. Ratios
are to gptkit's GPT-2 in the same mode, and to transformers.
Decode: greedy tokens/s at batch 1 (a 16-token prompt, then --new tokens) of gptkit's
fast fp32 layout (`optimize_for_inference`; with --compile also its compiled step) next
to transformers' `generate` on the same weights.

Random weights and tokens. Time is the process's CPU time (`time.process_time`), so with
one thread (the default) a neighbour's load on a shared machine, which stretches wall
time by 2-10x here, hardly moves the figures; every variant also runs in interleaved
rounds and keeps its best. `--wall` times wall-clock seconds instead (for --threads > 1).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from gptkit.config import GPTConfig, TrainConfig
from gptkit.generate import generate
from gptkit.inference import optimize_for_inference
from gptkit.model import GPT
from gptkit.optim import make_optimizer
from gptkit.runtime import tune_allocator

ARCHS = ("gpt2", "llama", "qwen3", "nanochat")
SHAPES = {
    # the reference run of docs/architectures.md (nanoGPT's shakespeare_char): 4 x 128, block 64, batch 12
    "tiny": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12),
    # the `small` preset with the demo's 4,096-token BPE vocabulary
    "small": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=4096), 4),
}
DECODE_SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50257)


CLOCK = time.process_time


def best_rate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each variant returns a rate per call; keep each one's best over interleaved rounds."""
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, run in variants.items():
            best[name] = max(best[name], run())
    return best


def model_and_dir(arch: str, shape: dict[str, int], root: Path) -> tuple[GPT, Path]:
    """A random model of `arch` (weights spread so nanochat's zero projections do work) and
    its saved directory, which the transformers peer loads."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, **shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, 0.02)
    directory = root / arch
    model.save_pretrained(directory)
    return model, directory


def hf_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")


def train_rate(forward: Callable[..., torch.Tensor], model: torch.nn.Module,
               x: torch.Tensor, steps: int, hf: bool = False) -> Callable[[], float]:
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True) if hf else
                 make_optimizer(model, TrainConfig(), torch.device("cpu")))

    def step() -> None:
        loss = forward(x, labels=x).loss if hf else forward(x, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (and the compile)
        step()

    def run() -> float:
        start = CLOCK()
        for _ in range(steps):
            step()
        return x.numel() * steps / (CLOCK() - start)

    return run


def decode_rate(model: torch.nn.Module, new: int, hf: bool = False) -> Callable[[], float]:
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def once() -> None:
        with torch.inference_mode():
            if hf:
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            else:
                generate(model, prompt, max_new_tokens=new, eos_token_id=[])

    once()  # warm-up (and the compile)

    def run() -> float:
        start = CLOCK()
        once()
        return new / (CLOCK() - start)

    return run


def training_table(args: argparse.Namespace, root: Path) -> None:
    for shape_name in args.shapes:
        shape, batch = SHAPES[shape_name]
        x = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]))
        steps = 1 if args.quick else (4 if shape_name == "tiny" else 2)
        variants: dict[str, Callable[[], float]] = {}
        for arch in ARCHS:
            model, directory = model_and_dir(arch, shape, root / shape_name)
            model.train()
            variants[f"{arch} eager"] = train_rate(model, model, x, steps)
            if args.compile:
                compiled = copy.deepcopy(model)
                variants[f"{arch} compile"] = train_rate(torch.compile(compiled), compiled, x, steps)
            hf = hf_model(directory).train()
            variants[f"{arch} transformers"] = train_rate(hf, hf, x, steps, hf=True)
            print(f"  ({shape_name}: {arch} ready)", flush=True)
        best = best_rate(variants, args.rounds)
        print(f"\ntraining tokens/s, {shape_name} shape ({shape['n_layer']} x {shape['n_embd']}, "
              f"block {shape['block_size']}, vocab {shape['vocab_size']}, batch {batch}), fp32")
        print_table(best, ["eager", *(["compile"] if args.compile else [])], width=12,
                    digits=0, compared=["eager"])


def decode_table(args: argparse.Namespace, root: Path) -> None:
    variants: dict[str, Callable[[], float]] = {}
    for arch in ARCHS:
        model, directory = model_and_dir(arch, DECODE_SHAPE, root / "decode")
        model.eval()
        variants[f"{arch} fast"] = decode_rate(optimize_for_inference(copy.deepcopy(model)), args.new)
        if args.compile:
            compiled = optimize_for_inference(copy.deepcopy(model), compile=True)
            variants[f"{arch} compiled"] = decode_rate(compiled, args.new)
        variants[f"{arch} transformers"] = decode_rate(hf_model(directory).eval(), args.new, hf=True)
        print(f"  (decode: {arch} ready)", flush=True)
    best = best_rate(variants, args.rounds)
    shape = DECODE_SHAPE
    print(f"\ngreedy decode tokens/s, batch 1 ({shape['n_layer']} x {shape['n_embd']}, vocab "
          f"{shape['vocab_size']}), fp32, {args.new} new tokens after 16")
    modes = ["fast", *(["compiled"] if args.compile else [])]
    print_table(best, modes, width=16, digits=1, label="gptkit ",
                compared=modes)


def print_table(best: dict[str, float], modes: list[str], width: int, digits: int,
                compared: list[str], label: str = "") -> None:
    """One row per family: each mode's rate and its ratio to GPT-2's, transformers' rate,
    and the ratio to it of the best gptkit rate among the `compared` modes."""
    head = f"{'arch':9}" + "".join(f"{label + m:>{width}} {'vs gpt2':>8}" for m in modes) + \
        f"{'transformers':>14} {'ratio':>7}"
    print(head + "\n" + "-" * len(head))
    for arch in ARCHS:
        cells = "".join(f"{best[f'{arch} {m}']:{width},.{digits}f} "
                        f"{best[f'{arch} {m}'] / best[f'gpt2 {m}']:7.2f}x" for m in modes)
        peer = best[f"{arch} transformers"]
        print(f"{arch:9}{cells}{peer:14,.{digits}f} {max(best[f'{arch} {m}'] for m in compared) / peer:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second "
                             "thread mostly waits for the first)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds, not CPU time")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per decode run")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--skip", choices=["training", "decode"], help="leave one table out")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(args.threads)
    tune_allocator()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{'wall-clock' if args.wall else 'CPU'} time")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "training":
            training_table(args, Path(tmp))
        if args.skip != "decode":
            decode_table(args, Path(tmp))


if __name__ == "__main__":
    main()
