"""Greedy decoding speed: gptkit's `generate` (fp32, bf16, int8, compiled) against
transformers' GPT2LMHeadModel (sdpa, fp32).

All models hold the same random weights and run in the same process on 2 threads,
interleaved repeat by repeat, so their ratios are meaningful even on a shared, noisy
machine (absolute numbers drift ~10%, more under load). Each row reports time to first
token (prefill + one token), decode tokens/s after it, the ratio to transformers, and
the fraction of the bound that the read bandwidth puts on decoding: every step streams
the weights the row's layout holds (fp32, bf16 or int8) once, whatever the batch size.
"of bound" pairs each round's decode speed with the bandwidth measured just before that
round; "of best" sets the median speed against the highest bandwidth of the case. Peak
memory is measured apart, one fresh process per row: the peak RSS of building the model
and generating, above the RSS after imports.

    python benchmarks/bench_generate.py            # ~5 minutes
    python benchmarks/bench_generate.py --quick    # fewer tokens and repeats
    python benchmarks/bench_generate.py --compile  # add compiled rows (slow first compile)
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gptkit.checkpoint import to_hf_state_dict
from gptkit.config import GPTConfig
from gptkit.generate import generate
from gptkit.inference import optimize_for_inference
from gptkit.kernels.hugepages import move_to_huge_pages
from gptkit.model import GPT

PROMPT_LEN = 16
HF = "transformers"
# impl name -> optimize_for_inference arguments (None: transformers)
IMPLS: dict[str, dict | None] = {
    HF: None,
    "gptkit eager": {},  # the model as loaded, no fast layout
    "gptkit fp32": {"dtype": torch.float32},
    "gptkit bf16": {"dtype": torch.bfloat16},
    "gptkit int8": {"quantize": "int8"},
}
COMPILED = {"gptkit fp32+compile": {"dtype": torch.float32, "compile": True},
            "gptkit bf16+compile": {"dtype": torch.bfloat16, "compile": True},
            "gptkit int8+compile": {"quantize": "int8", "compile": True}}
CUDA_IMPLS: dict[str, dict | None] = {
    HF: None,
    "gptkit fp32": {"dtype": torch.float32},
    "gptkit bf16": {"dtype": torch.bfloat16},
    "gptkit fp32+graphs": {"dtype": torch.float32, "compile": True},
    "gptkit bf16+graphs": {"dtype": torch.bfloat16, "compile": True},
}


@dataclass
class Case:
    name: str
    preset: str
    batch: int


CASES = [Case("gpt2 124M, batch 1", "gpt2", 1), Case("small, batch 1", "small", 1),
         Case("small, batch 8", "small", 8)]
CUDA_CASES = [Case("gpt2 124M, batch 1", "gpt2", 1), Case("gpt2 124M, batch 64", "gpt2", 64)]


def read_bandwidth(gigabytes: float, device: str) -> float:
    """Bytes/s of the fastest full read of a large fp32 tensor (a sum or a dot product,
    best of 5 each, in 4 KiB pages and, on CPU, in the 2 MiB pages gptkit's weights use):
    the decode ceiling."""
    holder = nn.Module()
    holder.register_buffer("x", torch.ones(int(gigabytes * (1 << 30)) // 4, device=device))
    tensors = [holder.x]
    if device == "cpu" and move_to_huge_pages(holder):
        tensors.append(holder.x)
    best = float("inf")
    for x in tensors:
        x.sum().item()  # fault the pages in before timing
        reads = (lambda x=x: x.sum().item(), lambda x=x: torch.dot(x, x).item())
        best = min(best, *(_timed(read) for read in reads for _ in range(5)))
    return tensors[0].numel() * 4 / best


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


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: all weights but the embeddings, which are looked up by
    row (plus the tied head, which reads the token embedding once); oneDNN's packed
    weights are attributes, not buffers, and counted too."""
    skip = {"transformer.wpe.weight", "transformer.wte.weight"}
    tensors = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())
               if name not in skip and ".kv_cache." not in name}
    counted = {id(t) for t in tensors.values()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    total += sum(t.numel() * t.element_size() for m in model.modules()
                 if isinstance(t := getattr(m, "packed", None), torch.Tensor) and id(t) not in counted)
    tied = not any(n.startswith("lm_head") for n in tensors)
    wte = model.transformer.wte.weight
    return total + (wte.numel() * wte.element_size() if tied else 0)


def build(case: Case, impl: str, settings: dict | None, ours: GPT) -> torch.nn.Module:
    """The model `impl` runs: transformers' with our weights, or ours optimized."""
    if settings is None:
        from transformers import AutoModelForCausalLM, GPT2Config

        hf_config = GPT2Config(**ours.config.to_hf_dict())  # no eos: every token generated
        hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").eval()
        hf.load_state_dict(to_hf_state_dict(ours), strict=False)  # lm_head is tied to wte
        return hf.to(ours.transformer.wte.weight.device)
    if not settings:
        return ours
    return optimize_for_inference(copy.deepcopy(ours), **settings)


def runner(model: torch.nn.Module, hf: bool, ids: torch.Tensor, new_tokens: int
           ) -> Callable[[StepClock], torch.Tensor]:
    if hf:
        return lambda clock: model.generate(ids, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=new_tokens, do_sample=False,
                                            pad_token_id=0, streamer=clock)
    return lambda clock: generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None,
                                  streamer=clock)


def run_once(run: Callable[[StepClock], torch.Tensor], new_tokens: int, batch: int,
             clock: StepClock) -> tuple[float, float, torch.Tensor]:
    """(time to first token in s, decode tokens/s over all rows after it, output ids)."""
    start = time.perf_counter()
    out = run(clock)
    assert len(clock.times) == new_tokens, (len(clock.times), new_tokens)
    first = clock.times[0] - start
    decode = batch * (new_tokens - 1) / (clock.times[-1] - clock.times[0])
    return first, decode, out


def case_inputs(case: Case, device: str = "cpu") -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset(case.preset, vocab_size=50257)).eval().to(device)
    ids = torch.randint(0, ours.config.vocab_size, (case.batch, PROMPT_LEN), device=device)
    return ours, ids


def bench_case(case: Case, impls: dict[str, dict | None], new_tokens: int, repeats: int,
               gigabytes: float, device: str) -> tuple[list[dict], float]:
    """Rows for `case`, and the highest read bandwidth seen while running it.

    Rounds are interleaved (every implementation once per round), so that load changes
    hit all alike, and each round first re-measures the read bandwidth: the machine's
    bandwidth swings by up to 2x between minutes, so each decode speed is set against the
    bound measured seconds before it ("of bound": the median over rounds), and against
    the highest bandwidth of the whole case ("of best bound")."""
    ours, ids = case_inputs(case, device)
    models = {impl: build(case, impl, s, ours) for impl, s in impls.items()}
    runs = {impl: runner(m, impls[impl] is None, ids, new_tokens) for impl, m in models.items()}
    results: dict[str, list[tuple[float, float, torch.Tensor]]] = {impl: [] for impl in impls}
    bandwidths = []
    for repeat in range(repeats + 1):  # the first round is a warm-up (and the compile)
        if repeat:
            bandwidths.append(read_bandwidth(gigabytes, device))
        for impl, run in runs.items():
            result = run_once(run, new_tokens, case.batch, StepClock(impls[impl] is None))
            if repeat:
                results[impl].append(result)
    reference = results[HF][0][2].tolist()
    hf_decode = statistics.median(r[1] for r in results[HF])
    rows = []
    for impl, rs in results.items():
        decode = statistics.median(r[1] for r in rs)
        per_token = streamed_bytes(models[impl]) / case.batch
        paired = [r[1] * per_token / bw for r, bw in zip(rs, bandwidths, strict=True)]
        rows.append(dict(case=case.name, impl=impl, ttft_ms=statistics.median(r[0] for r in rs)
                         * 1e3, decode=decode, vs_hf=decode / hf_decode,
                         bound=max(bandwidths) / per_token, of_bound=statistics.median(paired),
                         of_best_bound=decode * per_token / max(bandwidths),
                         same_tokens=rs[0][2].tolist() == reference))
    return rows, max(bandwidths)


def peak_memory_mb(case: Case, impl: str, settings: dict | None) -> float:
    """Peak RSS above the post-import RSS of building `impl` and generating 8 tokens, in MB,
    in a fresh process (the peak of a process only ever rises)."""
    code = (f"import sys; sys.path.insert(0, {sys.path[0]!r}); import bench_generate as b; "
            f"b.memory_child({case.preset!r}, {case.batch}, {impl!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(preset: str, batch: int, impl: str) -> None:
    torch.set_num_threads(2)
    if impl == HF:
        import transformers  # noqa: F401  (its import is not the model's memory)
    case = Case(preset, preset, batch)
    settings = {**IMPLS, **COMPILED}[impl]
    before = _rss_mb()
    ours, ids = case_inputs(case)
    model = build(case, impl, settings, ours)
    del ours
    runner(model, settings is None, ids, 8)(StepClock(settings is None))
    print(_peak_rss_mb() - before)  # VmHWM: never below the current RSS


def _processor(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def _peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM). Not ru_maxrss: a child keeps the
    high-water mark of the parent it was forked from, which here holds every model."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: GPT-2 at batch 1 and 64, bf16 and CUDA graphs, no memory")
    args = parser.parse_args()
    torch.set_num_threads(2)
    new_tokens, repeats = (32, 1) if args.quick else (128, 3)
    cuda = args.device == "cuda"
    impls = CUDA_IMPLS if cuda else {**IMPLS, **(COMPILED if args.compile else {})}
    gigabytes = 0.25 if args.quick else 1.0
    bandwidth = read_bandwidth(gigabytes, args.device)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, greedy, "
          f"prompt {PROMPT_LEN} tokens, {new_tokens} new tokens, median of {repeats}, "
          f"load average {load}")
    print(f"{_processor(args.device)}; read bandwidth {bandwidth / 1e9:.1f} GB/s at the start "
          "(fastest full read of a large fp32 tensor; re-measured before each round)\n")
    print(f"{'case':<20} {'impl':<20} {'TTFT ms':>8} {'decode t/s':>10} {'vs HF':>7} "
          f"{'bound t/s':>9} {'of bound':>8} {'of best':>8} {'peak MB':>8}")
    all_rows = []
    for case in CUDA_CASES if cuda else CASES:
        rows, case_bandwidth = bench_case(case, impls, new_tokens, repeats, gigabytes,
                                          args.device)
        bandwidth = max(bandwidth, case_bandwidth)
        for row in rows:
            row["peak_mb"] = (float("nan") if args.no_memory or cuda
                              else peak_memory_mb(case, row["impl"], impls[row["impl"]]))
            all_rows.append(row)
            print(f"{row['case']:<20} {row['impl']:<20} {row['ttft_ms']:>8.1f} "
                  f"{row['decode']:>10.1f} {row['vs_hf']:>6.2f}x {row['bound']:>9.1f} "
                  f"{row['of_bound']:>8.0%} {row['of_best_bound']:>8.0%} {row['peak_mb']:>8.0f}"
                  + ("" if row["same_tokens"] else "  (tokens differ from transformers)"),
                  flush=True)
    print(f"\nhighest read bandwidth seen: {bandwidth / 1e9:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
