"""Corpus to token files, and token files to training batches.

`prepare` turns a corpus (text, JSONL, parquet or Arrow files: see `gptkit.sources`) into a
data directory:

    train.bin, val.bin   raw little-endian token ids (uint16, or uint32 for big vocabularies)
    meta.json            {"format": "gptkit-tokens", "version": 1, "tokenizer_hash", ...}
    tokenizer/           the tokenizer, so the directory describes itself

Documents end with the end-of-text token. Every (1/val_fraction)-th document goes to
validation (document i when floor((i+1)*f) > floor(i*f)), which spreads validation over the
whole corpus; with too few documents for that, the last val_fraction of the token stream
is validation instead (as nanoGPT splits tinyshakespeare). The corpus is read and encoded
in bounded memory.

`TokenBatches` draws random windows for training, reproducibly and resumably;
`iter_eval_batches` gives fixed windows so validation losses compare across runs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from gptkit import shards
from gptkit.errors import GptkitError, read_json
from gptkit.sources import find_inputs, iter_documents
from gptkit.tokenizer import Tokenizer, decode_utf8

if TYPE_CHECKING:
    import torch

FORMAT = "gptkit-tokens"
VERSION = 1
SPLITS = ("train", "val")
# A group of pieces of at least _GROUP_CHARS characters is one encoding job: big enough
# that thread hand-offs cost nothing, small enough that the last jobs leave no core idle
# for long at the end of a corpus.
_GROUP_CHARS = 1 << 17


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of a JSONL file, `where` naming the file and
    line for error messages; invalid UTF-8 or JSON is one sentence naming the line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line, bad = decode_utf8(raw)
            where = f"{path} line {n}"
            if bad:
                raise GptkitError(f"{where} is not valid UTF-8 ({bad} bad bytes).")
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise GptkitError(f"{where} is not valid JSON ({exc.msg}).") from None


def corpus_texts(inputs: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """The corpus as `prepare` reads it, for `Tokenizer.train(texts=...)`."""
    for text, _, _ in iter_documents(find_inputs(inputs), field):
        if text:
            yield text


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def prepare(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    field: str = "text",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode a corpus into `out_dir` (train.bin, val.bin, meta.json, tokenizer/); return
    the meta dict. `workers` is the number of encoding threads (default: all cores); each
    encodes ~128K-character groups with `Tokenizer.encode_numpy`. For corpora beyond one
    file, `gptkit.corpus.prepare_shards` writes shards in parallel processes instead."""
    if not 0 <= val_fraction < 1:
        raise GptkitError(f"val_fraction {val_fraction} is outside [0, 1).")
    if workers is not None and workers < 1:
        raise GptkitError(f"workers {workers} must be at least 1.")
    files = find_inputs(inputs)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {split: out / f"{split}.bin.tmp" for split in SPLITS}
    try:
        with open(tmp["train"], "wb") as train_f, open(tmp["val"], "wb") as val_f:
            sinks = {"train": train_f, "val": val_f}
            counts, documents, unknown = _encode_corpus(
                files, field, tokenizer, dtype, val_fraction, sinks, workers, progress
            )
        if documents == 0:
            raise GptkitError(
                f"the corpus ({len(files)} files) contains no text; expected non-empty documents."
            )
        if counts["val"] == 0 and val_fraction > 0:
            counts = _split_tail(tmp, dtype, counts["train"], val_fraction)
        if unknown:
            warnings.warn(
                f"{unknown} characters were not in the vocabulary and were encoded as <unk>.",
                stacklevel=2,
            )
        tokenizer.save_pretrained(out / "tokenizer")
        for split in SPLITS:
            os.replace(tmp[split], out / f"{split}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eos_token_id": tokenizer.eos_token_id,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": documents,
        "sources": [str(p.resolve()) for p in files],
    }
    meta_tmp = out / "meta.json.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(meta_tmp, out / "meta.json")
    return meta


def _encode_corpus(
    files: list[Path],
    field: str,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    val_fraction: float,
    sinks: dict[str, Any],
    workers: int | None,
    progress: bool,
) -> tuple[dict[str, int], int, int]:
    """Stream documents through the tokenizer into the split files; return the token count
    per split, the number of documents and the number of <unk> tokens."""
    counts = {split: 0 for split in SPLITS}
    documents = 0
    unknown = 0

    def write(encoded: list[np.ndarray], group_ends: list[bool]) -> None:
        nonlocal documents, unknown
        for ids, end in zip(encoded, group_ends, strict=True):
            # Document i is validation when floor((i+1)*f) > floor(i*f): every 1/f-th one.
            is_val = math.floor((documents + 1) * val_fraction) > math.floor(
                documents * val_fraction
            )
            arr = ids.astype(dtype)
            if end:
                arr = np.append(arr, np.asarray(tokenizer.eos_token_id, dtype=dtype))
                documents += 1
            if tokenizer.unk_token_id is not None:
                unknown += int(np.count_nonzero(arr == tokenizer.unk_token_id))
            split = "val" if is_val else "train"
            sinks[split].write(arr)  # the buffer itself, no bytes copy
            counts[split] += len(arr)

    def encode_group(texts: list[str]) -> list[np.ndarray]:
        return [tokenizer.encode_numpy(text) for text in texts]

    # Pieces of ~256K characters are encoded by `workers` threads (the encoders release the
    # GIL) while this thread reads on; results are written in corpus order.
    workers = workers or os.cpu_count() or 1
    in_flight: deque[tuple[Future, list[bool]]] = deque()
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    total = sum(p.stat().st_size for p in files)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:

        def submit() -> None:
            in_flight.append((pool.submit(encode_group, list(texts)), list(ends)))
            texts.clear()
            ends.clear()
            while len(in_flight) > 2 * workers:  # bound memory: write the oldest
                future, group_ends = in_flight.popleft()
                write(future.result(), group_ends)

        for text, nbytes, end in iter_documents(files, field):
            bar.update(nbytes)
            if not text and not end:
                continue
            texts.append(text)
            ends.append(end)
            chars += len(text)
            if chars >= _GROUP_CHARS:
                submit()
                chars = 0
        submit()
        while in_flight:
            future, group_ends = in_flight.popleft()
            write(future.result(), group_ends)
    return counts, documents, unknown


def _split_tail(
    tmp: dict[str, Path], dtype: np.dtype, total: int, val_fraction: float
) -> dict[str, int]:
    """Move the last val_fraction of the train tokens to val, chunk by chunk."""
    n_train = int(total * (1 - val_fraction))
    chunk = 1 << 24
    with open(tmp["train"], "r+b") as src, open(tmp["val"], "wb") as dst:
        src.seek(n_train * dtype.itemsize)
        while block := src.read(chunk):
            dst.write(block)
        src.truncate(n_train * dtype.itemsize)
    return {"train": n_train, "val": total - n_train}


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a data directory made by `prepare`, or the sum of a sharded
    directory's manifests (`gptkit.shards.combined_meta`)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file() and shards.manifest_paths(data_dir):
        return shards.combined_meta(data_dir)
    if not path.is_file():
        raise GptkitError(
            f"{data_dir} is not a gptkit data directory (no meta.json); create one with "
            "`gptkit prepare`."
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GptkitError(f"{path} is not a gptkit-tokens meta.json.")
    if meta.get("version") != VERSION:
        raise GptkitError(
            f"{path} has format version {meta.get('version')}; this gptkit reads version {VERSION}."
        )
    return meta


def describe(data_dir: str | Path) -> dict[str, Any]:
    """What a prepared directory holds, for `gptkit info`: tokens, documents, shards,
    sources and tokenizer, from its small files only."""
    meta = load_meta(data_dir)
    files = [p for p in Path(data_dir).iterdir() if p.is_file()]
    layout = meta.get("shards")
    return {"path": str(data_dir), "kind": "data",
            **{key: meta.get(key, 0) for key in ("train_tokens", "val_tokens", "documents",
                                                 "duplicates", "vocab_size", "dtype",
                                                 "tokenizer_hash")},
            "shards": None if layout is None else {s: len(layout[s]) for s in SPLITS},
            "sources": meta["sources"], "bytes": sum(p.stat().st_size for p in files)}


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray | shards.ShardedTokens:
    """The token ids of one split, memory-mapped (read-only), so any size loads instantly;
    a sharded directory's shards read as one array."""
    if split not in SPLITS:
        raise GptkitError(f"unknown split {split!r}; expected one of {SPLITS}.")
    meta = load_meta(data_dir)
    if "shards" in meta:
        return shards.load_split(data_dir, split)
    dtype = np.dtype(meta["dtype"])
    path = Path(data_dir) / f"{split}.bin"
    expected = meta[f"{split}_tokens"]
    size = path.stat().st_size if path.is_file() else -1
    if size != expected * dtype.itemsize:
        raise GptkitError(
            f"{path} should hold {expected} {dtype.name} tokens but has {max(size, 0)} bytes; "
            "run `gptkit prepare` again."
        )
    if expected == 0:  # numpy cannot memory-map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_length(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise GptkitError(
            f"the {split} split has {len(tokens)} tokens; a block size of {block_size} needs "
            f"at least {block_size + 1}."
        )


class TokenBatches:
    """Random contiguous windows (x, y = x shifted by one), as nanoGPT draws them, but
    reproducible from a seed and resumable from `state_dict`.

    Every step draws batch_size * world_size offsets from one generator seeded with
    `seed` (the same on all ranks) and rank r takes slice r: ranks use disjoint slices,
    and together they see exactly what one process with a world_size times larger batch
    would.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
        *,
        split: str = "train",
    ) -> None:
        import torch

        _check_length(tokens, block_size, split)
        if not 0 <= rank < world_size:
            raise GptkitError(f"rank {rank} is outside [0, world_size={world_size}).")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._window = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next (x, y), each int64 of shape (batch_size, block_size), on `device`."""
        import torch

        offsets = torch.randint(
            len(self.tokens) - self.block_size,
            (self.batch_size * self.world_size,),
            generator=self._generator,
        )
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        # One gather of (B, T+1) ids; x and y are views of it.
        rows = torch.from_numpy(self.tokens[mine.numpy()[:, None] + self._window].astype(np.int64))
        self.step += 1
        x, y = rows[:, :-1], rows[:, 1:]
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        """Generator state and step; safe for `torch.load(weights_only=True)`."""
        return {"generator": self._generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved batches stopped."""
        self._generator.set_state(state["generator"])
        self.step = int(state["step"])


def iter_eval_batches(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    split: str = "val",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows starting at token 0 and spread evenly over the split
    (all of them, or max_batches * batch_size), so validation losses compare across runs."""
    import torch

    _check_length(tokens, block_size, split)
    if max_batches is not None and max_batches < 1:
        raise GptkitError(f"max_batches {max_batches} must be at least 1.")
    available = (len(tokens) - 1) // block_size
    wanted = available if max_batches is None else min(available, max_batches * batch_size)
    stride = available // wanted * block_size
    window = np.arange(block_size + 1)
    for start in range(0, wanted, batch_size):
        count = min(batch_size, wanted - start)
        offsets = (np.arange(start, start + count) * stride)[:, None] + window
        rows = torch.from_numpy(tokens[offsets].astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]


class Prefetcher:
    """Prepares the next batches in a background thread so the step never waits on data.

    Used on CUDA, where the copy to the device is asynchronous and the CPU is otherwise
    idle while the GPU computes. Resuming stays exact: `state_dict` is the wrapped
    source's state from before the first batch not yet handed out.
    """

    def __init__(self, source: Any, depth: int = 2) -> None:
        import queue
        import threading

        self.source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._next_state = source.state_dict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.source.next_batch()
            except Exception as exc:  # hand the error to the training thread
                self._queue.put((exc, None))
                return
            # the source's state right after this batch, read in this thread: consistent
            self._queue.put((batch, self.source.state_dict()))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, state_after = self._queue.get()
        if isinstance(batch, Exception):
            raise batch
        self._next_state = state_after
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._next_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise RuntimeError("load state into the source before wrapping it in a Prefetcher")

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except Exception:
                self._thread.join(timeout=0.01)
