"""Training-step throughput: gptkit against Hugging Face transformers, in one run.

    python benchmarks/bench_train.py [--quick] [--compile] [--track-steps 200]

Random weights and random tokens, AdamW, `torch.set_num_threads(2)` by default. For each
shape it times gptkit's training step (the same loss, optimizer and autocast that
`gptkit train` uses) in fp32 and with bf16 autocast, and `transformers.GPT2LMHeadModel`
(sdpa attention) in fp32, then prints tokens/s, the ratio to transformers and the
fraction of the fp32 matmul peak measured in the same run. nanoGPT cannot be installed
beside gptkit; its tokens/s for the same shapes, measured separately on the same machine
type, are printed for reference (docs/performance.md).
With `--track-steps N` it also trains the `small` shape on tiny Shakespeare in fp32 and
bf16 from the same seed and reports how far the bf16 loss curve strays.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gptkit.config import GPTConfig, TrainConfig
from gptkit.model import GPT
from gptkit.runtime import autocast, tune_allocator
from gptkit.train import make_optimizer

SHAPES = {
    # name: (config, batch size, nanoGPT's tokens/s, measured separately on the same machine type)
    "small": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50257), 8, 650),
    "tiny": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12, 20200),
}


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_token(cfg: dict[str, int]) -> float:
    """6 N for the matmuls of forward+backward, plus attention's 12 L T C (PaLM appendix B)."""
    C, L, T, V = cfg["n_embd"], cfg["n_layer"], cfg["block_size"], cfg["vocab_size"]
    n_matmul = L * 12 * C * C + V * C
    return 6 * n_matmul + 12 * L * T * C


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def gptkit_step(cfg: dict[str, int], batch: int, dtype: torch.dtype, compile: bool):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"]))

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            loss = forward(x, targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def transformers_step(cfg: dict[str, int], batch: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)
    config._attn_implementation = "sdpa"
    hf = GPT2LMHeadModel(config)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    x = torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"]))

    def step() -> None:
        hf(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def track_bf16(steps: int) -> None:
    """Same seed, same data: does the bf16-autocast loss curve follow fp32's?"""
    import tempfile

    from gptkit.data import prepare
    from gptkit.tokenizer import Tokenizer
    from gptkit.train import train

    text = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "input.txt"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Tokenizer.train([text], vocab_size=2048).save_pretrained(tmp / "tok")
        prepare([text], tmp / "tok", tmp / "data", progress=False)
        finals = {}
        for dtype in ("float32", "bfloat16"):
            cfg = TrainConfig(data=str(tmp / "data"), out=str(tmp / dtype), preset="small",
                              batch_size=8, max_steps=steps, eval_interval=steps, eval_steps=20,
                              warmup_steps=20, lr=1e-3, min_lr=1e-4, device="cpu", dtype=dtype,
                              save_interval=0)
            result = train(cfg, progress=False)
            finals[dtype] = (result.train_loss, result.val_loss, result.seconds)
        (l32, v32, s32), (l16, v16, s16) = finals["float32"], finals["bfloat16"]
        print(f"\nloss after {steps} steps (small shape, tiny Shakespeare, BPE 2048):")
        print(f"  fp32: train {l32:.4f}  val {v32:.4f}  ({s32:.0f}s)")
        print(f"  bf16: train {l16:.4f}  val {v16:.4f}  ({s16:.0f}s)  "
              f"val differs by {abs(v16 - v32) / v32:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--track-steps", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    peak32, peak16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"machine: fp32 matmul {peak32:.0f} GFLOP/s, bf16 matmul {peak16:.0f} GFLOP/s, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    steps, warmup = (3, 2) if args.quick else (10, 3)
    header = f"{'shape':6} {'implementation':28} {'tokens/s':>10} {'vs transformers':>16} {'% fp32 peak':>12}"
    print(header)
    print("-" * len(header))
    for name, (cfg, batch, nanogpt) in SHAPES.items():
        tokens = batch * cfg["block_size"]
        n = steps * (4 if name == "tiny" else 1)
        variants = {"transformers fp32": transformers_step(cfg, batch),
                    "gptkit fp32": gptkit_step(cfg, batch, torch.float32, False),
                    "gptkit bf16 autocast": gptkit_step(cfg, batch, torch.bfloat16, False)}
        if args.compile:
            variants["gptkit fp32 + compile"] = gptkit_step(cfg, batch, torch.float32, True)
            variants["gptkit bf16 + compile"] = gptkit_step(cfg, batch, torch.bfloat16, True)
        # interleaved rounds, best of each: neighbours' load on a shared machine hits all alike
        best = dict.fromkeys(variants, 0.0)
        for _ in range(args.rounds):
            for label, step in variants.items():
                best[label] = max(best[label], tokens / time_steps(step, n, warmup))
        hf_tps = best["transformers fp32"]
        rows = [*best.items(), ("nanoGPT (reference figure)", float(nanogpt))]
        for label, tps in rows:
            peak_fraction = tps * flops_per_token(cfg) / (peak32 * 1e9)
            print(f"{name:6} {label:28} {tps:10,.0f} {tps / hf_tps:15.2f}x {peak_fraction:11.0%}")
    if args.track_steps:
        track_bf16(args.track_steps)


if __name__ == "__main__":
    main()
