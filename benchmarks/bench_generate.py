"""Greedy decoding speed: gptkit's `generate` against transformers' GPT2LMHeadModel (sdpa).

Both models hold the same random fp32 weights and run in the same process on 2 threads,
so their ratio is meaningful even on a shared, noisy machine (absolute numbers drift
~10%). Each case reports time to first token (prefill + one token) and decode tokens/s
after it, next to the bound that the machine's measured read bandwidth puts on decoding:
every step reads all the weights once, whatever the batch size.

    python benchmarks/bench_generate.py          # ~2-3 minutes
    python benchmarks/bench_generate.py --quick  # fewer tokens and repeats, ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptkit.checkpoint import to_hf_state_dict
from gptkit.config import GPTConfig
from gptkit.generate import generate
from gptkit.model import GPT

PROMPT_LEN = 16


@dataclass
class Case:
    name: str
    preset: str
    batch: int


CASES = [Case("gpt2 124M, batch 1", "gpt2", 1), Case("small, batch 1", "small", 1),
         Case("small, batch 8", "small", 8)]


def read_bandwidth(gigabytes: float) -> float:
    """Bytes/s that summing a large fp32 tensor reaches (best of 5): the decode ceiling."""
    x = torch.ones(int(gigabytes * (1 << 30)) // 4)
    x.sum()  # fault the pages in before timing
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class StepClock:
    """Timestamps of each new token, as a gptkit streamer or a transformers streamer."""

    def __init__(self, skip_first_put: bool = False) -> None:
        self.times: list[float] = []
        self.skip = skip_first_put  # transformers first puts the prompt

    def __call__(self, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def put(self, tokens: torch.Tensor) -> None:
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_once(run: Callable[[StepClock], torch.Tensor], new_tokens: int, batch: int,
             clock: StepClock) -> tuple[float, float, torch.Tensor]:
    """(time to first token in s, decode tokens/s over all rows after it, output ids)."""
    start = time.perf_counter()
    out = run(clock)
    assert len(clock.times) == new_tokens, (len(clock.times), new_tokens)
    first = clock.times[0] - start
    decode = batch * (new_tokens - 1) / (clock.times[-1] - clock.times[0])
    return first, decode, out


def bench_case(case: Case, new_tokens: int, repeats: int, bandwidth: float) -> list[str]:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPTConfig.from_preset(case.preset, vocab_size=50257)
    ours = GPT(config).eval()
    hf_config = GPT2Config(**config.to_hf_dict())  # no eos: both generate every token
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)  # lm_head is tied to wte
    ids = torch.randint(0, config.vocab_size, (case.batch, PROMPT_LEN))

    def run_ours(clock: StepClock) -> torch.Tensor:
        return generate(ours, ids, max_new_tokens=new_tokens, eos_token_id=None, streamer=clock)

    def run_hf(clock: StepClock) -> torch.Tensor:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, streamer=clock)

    runs: dict[str, list[tuple[float, float, torch.Tensor]]] = {"gptkit": [], "transformers": []}
    impls = (("gptkit", run_ours), ("transformers", run_hf))
    for repeat in range(repeats + 1):  # interleaved, so that load changes hit both alike
        for label, run in impls:
            result = run_once(run, new_tokens, case.batch, StepClock(label == "transformers"))
            if repeat:  # the first round is a warm-up
                runs[label].append(result)
    results = {label: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs),
                       rs[0][2]) for label, rs in runs.items()}
    same = results["gptkit"][2].tolist() == results["transformers"][2].tolist()
    weight_bytes = (ours.num_params() - ours.transformer.wpe.weight.numel()) * 4
    bound = bandwidth / weight_bytes * case.batch  # tokens/s if decoding only read weights
    rows = []
    for label, (first, decode, _) in results.items():
        ratio = decode / results["transformers"][1]
        rows.append(f"{case.name:<20} {label:<13} {first * 1e3:>8.1f} {decode:>10.1f} "
                    f"{ratio:>6.2f}x {bound:>9.1f} {decode / bound:>7.0%}")
    if not same:
        rows.append(f"{case.name:<20} WARNING: the two models chose different tokens")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    args = parser.parse_args()
    torch.set_num_threads(2)
    new_tokens, repeats = (32, 1) if args.quick else (128, 3)
    bandwidth = read_bandwidth(0.25 if args.quick else 1.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, greedy, "
          f"prompt {PROMPT_LEN} tokens, {new_tokens} new tokens, median of {repeats}")
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum of a large fp32 tensor)\n")
    print(f"{'case':<20} {'impl':<13} {'TTFT ms':>8} {'decode t/s':>10} {'vs HF':>7} "
          f"{'bound t/s':>9} {'of bound':>8}")
    for case in CASES:
        for row in bench_case(case, new_tokens, repeats, bandwidth):
            print(row, flush=True)


if __name__ == "__main__":
    main()
