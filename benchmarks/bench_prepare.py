"""Data preparation speed: `gptkit prepare` against tiktoken, Hugging Face tokenizers and
llm.c's fineweb.py recipe.

    python benchmarks/bench_prepare.py --corpus moby_dick.txt [--megabytes 50]
    python benchmarks/bench_prepare.py --mixed DIR [--generate-gb 1.0] [--workers N]

`--mixed DIR` measures sharded preparation (`gptkit prepare --shard-tokens`) of a mixed
corpus (parquet, jsonl.zst and txt: generated into DIR from the repository's texts with
--generate-gb, or any corpus already there) with the GPT-2 vocabulary, in one run next to
llm.c's `fineweb.py` recipe on the same files: tiktoken's `encode_ordinary` per document
in a `multiprocessing` pool (`imap`, chunksize 16) writing uint16 shards. Both read the
documents with the same reader and use the same number of worker processes; gptkit's run
is the real command in a subprocess, whose peak memory (main process plus workers, shared
pages counted once) is sampled from /proc.

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


def generate_mixed(root: Path, gigabytes: float) -> None:
    """About `gigabytes` of documents cut from the repository's texts (Shakespeare, Moby
    Dick, SciTLDR, XQuAD), numbered so that no two are equal: half parquet (FineWeb-like
    row groups of 1,000 documents), 30% jsonl.zst, 20% text files of ~4 MB."""
    import json
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paragraphs = []
    for path in ("shakespeare/input.txt", "prose/moby_dick.txt"):
        paragraphs += (REPO / "data" / path).read_text(encoding="utf-8").split("\n\n")
    for path, key in (("summarization/scitldr.test.excerpt.jsonl", "document"),
                      ("qa/xquad_en.test.jsonl", "context")):
        for line in (REPO / "data" / path).read_text(encoding="utf-8").splitlines():
            paragraphs.append(str(json.loads(line).get(key, "")))
    paragraphs = [p for p in paragraphs if p.strip()]
    rng = random.Random(0)
    number = 0

    def documents(nbytes: float) -> list[str]:
        nonlocal number
        out, size = [], 0
        while size < nbytes:
            start = rng.randrange(len(paragraphs))
            doc = f"Document {number}.\n\n" + "\n\n".join(paragraphs[start:start + rng.randint(1, 12)])
            number += 1
            out.append(doc)
            size += len(doc.encode())
        return out

    root.mkdir(parents=True, exist_ok=True)
    total = gigabytes * 1e9
    for n in range(max(1, int(total * 0.5 / 1e8))):  # ~100 MB parquet shards
        docs = documents(1e8)
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}),
                       root / f"web_{n:03d}.parquet", row_group_size=1000)
    for n in range(max(1, int(total * 0.3 / 1e8))):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in documents(1e8))
        (root / f"code_{n:03d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress(lines.encode()))
    books = root / "books"
    books.mkdir(exist_ok=True)
    for n in range(max(1, int(total * 0.2 / 4e6))):
        (books / f"book_{n:04d}.txt").write_text("\n\n".join(documents(4e6)), encoding="utf-8")


_llmc_encoding = None


def _llmc_tokenize(text: str):
    """fineweb.py's tokenize(): end-of-text first, then encode_ordinary, as uint16."""
    import numpy as np

    tokens = [_llmc_encoding.eot_token]
    tokens.extend(_llmc_encoding.encode_ordinary(text))
    return np.array(tokens).astype(np.uint16)


def llmc_recipe(files: list[Path], out: Path, workers: int, shard_size: int = 10**8) -> int:
    """llm.c's fineweb.py loop: pool.imap(tokenize, docs, chunksize=16) into uint16 shards."""
    import multiprocessing

    import numpy as np

    from gptkit.sources import iter_documents

    global _llmc_encoding
    _llmc_encoding = Tokenizer.from_pretrained(REPO / "data" / "gpt2-tokenizer")._fast
    out.mkdir(parents=True, exist_ok=True)
    def documents():  # whole documents: a text file's pieces joined
        pieces = []
        for text, _, ends in iter_documents(files):
            pieces.append(text)
            if ends:
                yield "".join(pieces)
                pieces = []

    docs = documents()
    buffer = np.empty(shard_size, dtype=np.uint16)
    count = index = total = 0
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for tokens in pool.imap(_llmc_tokenize, docs, chunksize=16):
            total += len(tokens)
            while len(tokens):
                take = min(len(tokens), shard_size - count)
                buffer[count:count + take] = tokens[:take]
                count += take
                tokens = tokens[take:]
                if count == shard_size:
                    buffer.tofile(out / f"shard_{index:06d}.bin")
                    index, count = index + 1, 0
    buffer[:count].tofile(out / f"shard_{index:06d}.bin")
    return total


def run_sampling_memory(command: list[str]) -> tuple[float, int]:
    """Seconds a command takes and its peak memory with its children's: the sum of their
    proportional set sizes (PSS), so pages the forked workers share count once."""
    import subprocess

    def tree_pss(pid: int) -> int:
        total = 0
        for task in Path("/proc").iterdir():
            try:
                stat = (task / "stat").read_text().split()
                if task.name != str(pid) and stat[3] != str(pid):
                    continue
                for line in (task / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, IndexError, ValueError):
                continue
        return total

    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed with status {proc.returncode}")
    return time.perf_counter() - start, peak


def compare_mixed(args: argparse.Namespace) -> None:
    from gptkit.sources import find_inputs

    if args.generate_gb:
        generate_mixed(args.mixed, args.generate_gb)
    files = find_inputs([args.mixed])
    workers = args.workers or len(os.sched_getaffinity(0))
    text_bytes = 0  # the UTF-8 size of the documents, the same for both engines
    from gptkit.sources import iter_documents
    for text, _, _ in iter_documents(files):
        text_bytes += len(text.encode())
    megabytes = text_bytes / 1e6
    print(f"corpus: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:,.0f} MB "
          f"on disk, {megabytes:,.0f} MB of text; {workers} worker processes\n")
    with tempfile.TemporaryDirectory(dir=args.mixed.parent) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        llmc_tokens = llmc_recipe(files, tmp / "llmc", workers)
        llmc_s = time.perf_counter() - start
        shutil.rmtree(tmp / "llmc")
        ours_s, peak = run_sampling_memory([
            sys.executable, "-m", "gptkit", "prepare", str(args.mixed), "--tokenizer",
            str(REPO / "data" / "gpt2-tokenizer"), "--out", str(tmp / "ours"),
            "--shard-tokens", str(10**8), "--workers", str(workers)])
        from gptkit.data import load_meta
        meta = load_meta(tmp / "ours")
        ours_tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"{'engine':44} {'seconds':>8} {'MB/s':>7} {'MB/s/worker':>12} {'tokens':>14}")
    for name, seconds, tokens in (("llm.c fineweb.py recipe (tiktoken, mp pool)", llmc_s, llmc_tokens),
                                  ("gptkit prepare --shard-tokens 1e8", ours_s, ours_tokens)):
        print(f"{name:44} {seconds:8.1f} {megabytes / seconds:7.1f} "
              f"{megabytes / seconds / workers:12.2f} {tokens:14,}")
    print(f"\ngptkit prepare peak memory (PSS of the main process + workers): "
          f"{peak / 2**20:,.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=MOBY_DICK,
                        help="the whole of Moby Dick as UTF-8 text (data/README.md names its source)")
    parser.add_argument("--mixed", type=Path, help="a folder of corpus files: compare sharded "
                        "preparation with llm.c's fineweb.py recipe on it")
    parser.add_argument("--generate-gb", type=float, default=0,
                        help="first generate a mixed corpus of this many GB into --mixed")
    parser.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    args = parser.parse_args()
    if args.mixed:
        compare_mixed(args)
        return
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
