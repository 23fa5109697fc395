"""One-GPU check of the CUDA path: GPT-2 124M training MFU (bf16 + compile through
gptkit's own training loop) and decode tokens/s against transformers, in one run.

    PYTHONPATH=src python benchmarks/gpu_check.py [--steps 40] [--batch-size 32]

MFU counts 6 N + 12 L T C FLOPs per token (forward and backward, attention included)
against the H200's 989 TFLOP/s dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptkit.config import GPTConfig, TrainConfig
from gptkit.data import TokenBatches
from gptkit.generate import generate
from gptkit.model import GPT
from gptkit.train import run_loop

PEAK_BF16 = 989e12


def train_mfu(steps: int, batch_size: int) -> None:
    config = GPTConfig.from_preset("gpt2")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 8_000_000, dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, preset="gpt2", batch_size=batch_size, max_steps=steps,
                          eval_interval=0, save_interval=0, dtype="bf16", compile=True,
                          device="cuda", log_interval=5, warmup_steps=5)
        torch.manual_seed(0)
        model = GPT(config)
        batches = TokenBatches(tokens, config.block_size, batch_size, seed=0, device="cuda")
        start = time.perf_counter()
        run_loop(model, cfg, batches, None, Path(tmp), progress=False)
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][2:]  # skip compile windows
    tps = float(np.median(rates))
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    flops = 6 * n + 12 * config.n_layer * config.block_size * config.n_embd
    print(f"train gpt2 124M, bf16 autocast + compile, batch {batch_size}x1024: "
          f"{tps:,.0f} tokens/s, MFU {tps * flops / PEAK_BF16:.1%} (run {wall:.0f}s incl. compile)")
    print(f"  flash attention enabled: {torch.backends.cuda.flash_sdp_enabled()}, "
          f"losses {[round(x['loss'], 3) for x in lines if 'loss' in x]}")


def decode(batch: int, new_tokens: int = 128) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset("gpt2")).to("cuda", torch.bfloat16).eval()
    hf_config = GPT2Config()
    hf_config._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hf_config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 50257, (batch, 16), device="cuda")
    rows = []
    for name, run in (
        ("gptkit", lambda: generate(ours, ids, max_new_tokens=new_tokens, eos_token_id=[])),
        ("transformers", lambda: theirs.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                                  min_new_tokens=new_tokens,
                                                  attention_mask=torch.ones_like(ids))),
    ):
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        rows.append((name, batch * new_tokens / (time.perf_counter() - start)))
    ratio = rows[0][1] / rows[1][1]
    print(f"decode gpt2 124M bf16 batch {batch}: " + ", ".join(f"{n} {t:,.0f} tokens/s" for n, t in rows)
          + f" ({ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    torch.backends.cuda.matmul.allow_tf32 = True
    decode(1)
    decode(64)
    train_mfu(args.steps, args.batch_size)


if __name__ == "__main__":
    main()
