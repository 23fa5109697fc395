"""Data preparation speed: `gptkit prepare` against tiktoken and Hugging Face tokenizers.

    python benchmarks/bench_prepare.py --corpus moby_dick.txt [--megabytes 50]

The corpus is the whole of Moby Dick, a text file given with --corpus (the repository's
data/ holds only an excerpt; data/README.md names the source of the whole book), repeated to the requested size. Each engine encodes the same text with the same vocabulary
in the same run: first a byte-level BPE of 8192 tokens trained on the text, then the
original GPT-2 vocabulary (data/gpt2-tokenizer).
`gptkit prepare` is measured end to end (reading, encoding, writing train.bin/val.bin)
and reported per core it used, next to tiktoken encoding the text as one string on one
core, and tiktoken's own parallel API (`encode_ordinary_batch` over 1 MiB pieces) on as
many cores as gptkit uses. The machine's speed drifts from minute to minute, so gptkit
and tiktoken run in interleaved rounds and each reports its best; Hugging Face
tokenizers, 10x slower, runs once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gptkit.data import prepare
from gptkit.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
# the whole book, where a ../shared/data folder beside the repository holds it; --corpus overrides it
MOBY_DICK = REPO.parent / "shared" / "data" / "prose" / "moby_dick.txt"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=MOBY_DICK,
                        help="the whole of Moby Dick as UTF-8 text (data/README.md names its source)")
    args = parser.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"bench_prepare.py needs the whole of Moby Dick as a text file; {args.corpus} "
                 "does not exist. Pass it with --corpus (data/README.md names its source).")
    base = args.corpus.read_text(encoding="utf-8")
    text = base * max(1, int(args.megabytes * 1e6 / len(base.encode())))
    megabytes = len(text.encode()) / 1e6
    cores = len(os.sched_getaffinity(0))
    print(f"corpus: {megabytes:.1f} MB (moby_dick.txt repeated), {cores} cores\n")
    header = f"{'vocabulary':22} {'engine':34} {'MB/s':>7} {'MB/s per core':>14} {'vs tiktoken':>12} {'vs tiktoken batch':>16}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        corpus.write_text(text, encoding="utf-8")
        pieces = [text[i:i + (1 << 20)] for i in range(0, len(text), 1 << 20)]
        trained = Tokenizer.train(texts=[base], vocab_size=8192)
        trained.save_pretrained(tmp / "trained")
        vocabularies = (("trained BPE 8192", tmp / "trained"),
                        ("GPT-2 (50257)", REPO / "data" / "gpt2-tokenizer"))
        tokenizers = {label: Tokenizer.from_pretrained(d) for label, d in vocabularies}
        best: dict[tuple[str, str], float] = {}

        def measure(key: tuple[str, str], fn) -> object:
            seconds, result = timed(fn)
            best[key] = max(best.get(key, 0.0), megabytes / seconds)
            return result

        for n in range(args.rounds):
            for label, tok_dir in vocabularies:
                out = tmp / f"data{n}"  # a new directory, as a user prepares into
                measure((label, "ours"), lambda d=tok_dir, o=out: prepare([corpus], d, o,
                                                                          progress=False))
                shutil.rmtree(out)
                encoding = tokenizers[label]._fast  # the engine gptkit uses; None if ids differ
                if encoding is not None:
                    measure((label, "tiktoken"), lambda enc=encoding: enc.encode_ordinary(text))
                    measure((label, "tiktoken batch"), lambda enc=encoding: enc.encode_ordinary_batch(
                        pieces, num_threads=cores))
        for label, _ in vocabularies:
            tokenizer = tokenizers[label]
            hf_ids = measure((label, "hf"), lambda t=tokenizer: t._backend.encode(text).ids)
            if tokenizer._fast is not None:
                assert hf_ids == tokenizer._fast.encode_ordinary(text), "tiktoken and tokenizers disagree"
            del hf_ids
            rows = [("tiktoken, one string, 1 core", best.get((label, "tiktoken")), 1),
                    (f"tiktoken batch, {cores} threads", best.get((label, "tiktoken batch")), cores),
                    ("HF tokenizers, one string", best[(label, "hf")], 1),
                    ("gptkit prepare (read+encode+write)", best[(label, "ours")], cores)]
            reference = rows[0][1] or rows[2][1]  # per core; HF when tiktoken cannot run
            batch = rows[1][1] / cores if rows[1][1] else reference
            for engine, rate, used in rows:
                if rate is not None:
                    print(f"{label:22} {engine:34} {rate:7.1f} {rate / used:14.1f} "
                          f"{(rate / used) / reference:11.2f}x {(rate / used) / batch:15.2f}x")


if __name__ == "__main__":
    main()
