"""Corpora beyond one file: tokenize in parallel processes into fixed-size shards, resumably.

    gptkit prepare DATA/*.parquet web.jsonl.zst books/ --tokenizer TOK --out DIR \\
        --shard-tokens 100000000 [--workers N] [--dedup] [--resume] [--shard-index i --num-shards n]

Documents are read in order (`gptkit.sources`), encoded by `workers` processes and
written in corpus order, so the shards do not depend on the number of workers. A
document's split comes from a hash of its text, so validation is the same documents
however the corpus is sharded or split across machines; `--dedup` drops a document whose
normalised text (whitespace runs collapsed) hashes like an earlier one's. Each shard is written to a hidden temporary file and
renamed when complete; after each shard a state file records where the token streams
stand (the unfinished shard of the other split is appended to a hidden file), so
`--resume` after Ctrl-C or SIGKILL re-reads without encoding up to the document being
written at the last shard and writes the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptkit import shards
from gptkit.data import token_dtype
from gptkit.errors import GptkitError, read_json
from gptkit.sources import file_documents, find_inputs
from gptkit.tokenizer import Tokenizer

SPLITS = ("train", "val")
# Characters per encoding job sent to a worker: large enough that the hand-off costs
# nothing next to the encoding, small enough to keep every worker busy to the end.
_JOB_CHARS = 1 << 20


def split_key(text: str) -> int:
    """64-bit hash of a document's exact text, which chooses its split: one cheap pass,
    so the split costs nothing next to encoding."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def document_key(text: str) -> int:
    """64-bit hash of a document's normalised text (whitespace runs collapsed, ends
    stripped): its identity for --dedup."""
    return _digest([text.split()])


def _digest(word_lists: Iterable[list[str]]) -> int:
    digest = hashlib.blake2b(digest_size=8)
    first = True
    for words in word_lists:
        if words:
            digest.update((("" if first else " ") + " ".join(words)).encode("utf-8", "replace"))
            first = False
    return int.from_bytes(digest.digest(), "little")


def is_validation(key: int, val_fraction: float) -> bool:
    """A document is validation when its hash falls in the lowest val_fraction."""
    return key < val_fraction * 2.0**64


def _text_file_keys(path: Path, dedup: bool) -> tuple[int, int | None]:
    """`split_key` and (with --dedup) `document_key` of a text file, read ahead in large
    blocks: the file is one document, encoded in pieces after its split is known."""
    exact = hashlib.blake2b(digest_size=8)

    def blocks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while raw := f.read(1 << 22):
                exact.update(raw)
                yield raw

    if not dedup:
        for _ in blocks():
            pass
        return int.from_bytes(exact.digest(), "little"), None
    normalised = _digest(_word_lists(blocks()))
    return int.from_bytes(exact.digest(), "little"), normalised


def _word_lists(blocks: Iterator[bytes]) -> Iterator[list[str]]:
    """The words of UTF-8 text given in blocks, a word cut at a block's end kept whole."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    carry = ""
    for raw in blocks:
        text = carry + decoder.decode(raw)
        words = text.split()
        carry = words.pop() if words and not text[-1].isspace() else ""
        yield words
    yield (carry + decoder.decode(b"", final=True)).split()


@dataclass
class _Doc:
    """A piece of a document: its input, the document's ordinal, whether it ends it, and
    its split and dedup keys when known before encoding (text files; a record's are
    computed by a worker)."""

    source: int
    ordinal: int
    ends: bool
    keys: tuple[int, int | None] | None


@dataclass
class _Writer:
    """One split's token stream cut into shards of `size` tokens, each renamed into place
    when complete. The first `skip` tokens (already written) are dropped. `save_partial`
    appends the unfinished shard's new tokens to a hidden file, so that a resumed run need
    not encode them again."""

    out: Path
    split: str
    tag: tuple[int, int]
    size: int
    dtype: np.dtype
    records: list[dict[str, Any]] = field(default_factory=list)
    skip: int = 0

    def __post_init__(self) -> None:
        self.buffer = np.empty(self.size, dtype=self.dtype)
        self.fill = 0
        self.saved = 0  # tokens of the buffer in the partial file
        self.inputs: set[int] = set()

    def _partial_path(self) -> Path:
        return self.out / f".{shards.shard_name(self.split, *self.tag, len(self.records))}.partial"

    def save_partial(self) -> dict[str, Any]:
        """Append the buffer's unsaved tokens to the partial file; what the state records."""
        if self.fill > self.saved:
            with open(self._partial_path(), "ab") as f:
                f.write(self.buffer[self.saved:self.fill].tobytes())
                f.flush()
                os.fsync(f.fileno())
            self.saved = self.fill
        return {"tokens": self.fill, "inputs": sorted(self.inputs)}

    def restore_partial(self, saved: dict[str, Any]) -> None:
        """Refill the buffer from the partial file, as far as the state recorded it."""
        self.fill = self.saved = saved["tokens"]
        self.inputs = set(saved["inputs"])
        if self.fill:
            path = self._partial_path()
            self.buffer[:self.fill] = np.fromfile(path, dtype=self.dtype, count=self.fill)
            os.truncate(path, self.fill * self.dtype.itemsize)  # drop an unrecorded append

    def write(self, ids: np.ndarray, source: int) -> bool:
        """Append ids; True when a shard was committed."""
        if self.skip:
            dropped = min(self.skip, len(ids))
            ids, self.skip = ids[dropped:], self.skip - dropped
        committed = False
        while len(ids):
            take = min(len(ids), self.size - self.fill)
            self.buffer[self.fill:self.fill + take] = ids[:take]
            self.fill += take
            self.inputs.add(source)
            ids = ids[take:]
            if self.fill == self.size:
                self.flush()
                committed = True
        return committed

    def flush(self) -> None:
        """Write the buffer as the next shard: temporary file, then an atomic rename."""
        if not self.fill:
            return
        name = shards.shard_name(self.split, *self.tag, len(self.records))
        tmp = self.out / f".{name}.tmp"
        data = self.buffer[:self.fill].tobytes()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / name)
        self._partial_path().unlink(missing_ok=True)
        self.records.append({"file": name, "tokens": self.fill,
                             "sha256": hashlib.sha256(data).hexdigest(),
                             "inputs": sorted(self.inputs)})
        self.fill = self.saved = 0
        self.inputs = set()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_pretrained(tokenizer_dir)


def _encode_job(texts: list[str], keyed: list[bool], dedup: bool, dtype: str
                ) -> list[tuple[np.ndarray, tuple[int, int | None] | None]]:
    assert _worker_tokenizer is not None
    return _encode(_worker_tokenizer, texts, keyed, dedup, dtype)


def _encode(tokenizer: Tokenizer, texts: list[str], keyed: list[bool], dedup: bool,
            dtype: str) -> list[tuple[np.ndarray, tuple[int, int | None] | None]]:
    """Ids of each text, and its keys where the reader did not know them."""
    return [(tokenizer.encode_numpy(text).astype(dtype),
             None if known else (split_key(text), document_key(text) if dedup else None))
            for text, known in zip(texts, keyed, strict=True)]


def part_of(files: list[Path], index: int, count: int) -> list[tuple[int, Path]]:
    """Part `index` of `count`: every count-th input from the index-th, with its position
    in the whole list, so n machines given the same inputs prepare disjoint parts."""
    return [(i, p) for i, p in enumerate(files) if i % count == index]


def _part_from_env(index: int | None, count: int | None) -> tuple[int, int]:
    """--shard-index/--num-shards, or torchrun's RANK/WORLD_SIZE when they are not given."""
    if count is None:
        count = int(os.environ.get("WORLD_SIZE", "1"))
        index = int(os.environ.get("RANK", "0")) if index is None else index
    index = 0 if index is None else index
    if count < 1 or not 0 <= index < count:
        raise GptkitError(f"--shard-index {index} is outside [0, --num-shards={count}).")
    return index, count


def prepare_shards(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    shard_tokens: int,
    val_fraction: float = 0.1,
    field: str = "text",
    workers: int | None = None,
    resume: bool = False,
    dedup: bool = False,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode a corpus into shards of `shard_tokens` tokens in `out_dir`; return the
    manifest. `workers` encoding processes (default: all cores); `shard_index` of
    `num_shards` prepares one machine's part (default: torchrun's RANK of WORLD_SIZE)."""
    if shard_tokens < 1:
        raise GptkitError(f"--shard-tokens {shard_tokens} must be at least 1.")
    if not 0 <= val_fraction < 1:
        raise GptkitError(f"val_fraction {val_fraction} is outside [0, 1).")
    if workers is not None and workers < 1:
        raise GptkitError(f"workers {workers} must be at least 1.")
    index, count = _part_from_env(shard_index, num_shards)
    files = find_inputs(inputs)
    mine = part_of(files, index, count)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"tokenizer_hash": tokenizer.hash, "shard_tokens": shard_tokens,
                "val_fraction": val_fraction, "field": field, "dedup": dedup,
                "part": {"index": index, "count": count},
                "inputs": [str(p.resolve()) for p in files]}
    state_path = out / f".prepare{shards.part_tag(index, count)}.state.json"
    manifest_path = out / shards.manifest_name(index, count)
    state = _check_out_dir(out, tokenizer_dir, settings, state_path, manifest_path, resume)
    if state is None and manifest_path.is_file():
        return read_json(manifest_path)  # --resume of a finished part: nothing left to do
    _save_tokenizer(tokenizer, out)
    run = _Run(out, tokenizer, settings, mine, state, state_path, workers or os.cpu_count() or 1)
    run.encode(progress)
    manifest = run.manifest()
    if manifest["documents"] == 0 and not (count > 1 and not mine):
        raise GptkitError(
            f"the corpus ({len(mine)} files) contains no text; expected non-empty documents."
        )
    if val_fraction > 0 and manifest["val_tokens"] == 0 and manifest["documents"]:
        warnings.warn(f"none of the {manifest['documents']} documents fell into validation "
                      f"(--val-fraction {val_fraction} picks documents by hash); training "
                      "will skip evaluation.", stacklevel=2)
    shards.write_json(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    return manifest


def _check_out_dir(out: Path, tokenizer_dir: str | Path, settings: dict[str, Any],
                   state_path: Path, manifest_path: Path, resume: bool
                   ) -> dict[str, Any] | None:
    """The saved state to resume from ({}: start afresh; None: the part is finished),
    after refusing to mix tokenizers, settings or runs in one directory."""
    new = settings["tokenizer_hash"]
    for path in [*shards.manifest_paths(out), state_path]:
        if path.is_file() and (old := read_json(path)["tokenizer_hash"]) != new:
            raise GptkitError(
                f"{out} holds shards tokenized with another tokenizer ({old[:12]}, not "
                f"{new[:12]} from {tokenizer_dir}); prepare into a new --out or use the "
                "same tokenizer."
            )
    if manifest_path.is_file():
        if resume:
            return None
        raise GptkitError(f"{out} already holds prepared shards ({manifest_path.name}); "
                          "choose a new --out.")
    if not state_path.is_file():
        if resume:
            raise GptkitError(f"{out} holds no interrupted prepare to resume; run without "
                              "--resume.")
        return {}
    if not resume:
        raise GptkitError(f"{out} holds an interrupted prepare; pass --resume to continue "
                          "it or choose a new --out.")
    state = read_json(state_path)
    for key, value in settings.items():
        if state["settings"][key] != value:
            raise GptkitError(f"--resume needs the same {key} as the interrupted prepare in "
                              f"{out}; give the same inputs and options.")
    return state


def _save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer beside the shards; written once, atomically (parts may race)."""
    if (out / "tokenizer").is_dir():
        return
    tmp = out / f".tokenizer.{os.getpid()}.tmp"
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out / "tokenizer")
    except OSError:  # another part got there first with the same tokenizer
        import shutil

        shutil.rmtree(tmp)


class _Run:
    """One prepare run of one part: reads, encodes in a pool, writes, checkpoints."""

    def __init__(self, out: Path, tokenizer: Tokenizer, settings: dict[str, Any],
                 mine: list[tuple[int, Path]], state: dict[str, Any], state_path: Path,
                 workers: int) -> None:
        self.out, self.tokenizer, self.settings = out, tokenizer, settings
        self.mine, self.state_path, self.workers = mine, state_path, workers
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.eos = np.asarray([tokenizer.eos_token_id], dtype=self.dtype)
        tag = (settings["part"]["index"], settings["part"]["count"])
        self.writers = {s: _Writer(out, s, tag, settings["shard_tokens"], self.dtype)
                        for s in SPLITS}
        self.counts = {s: 0 for s in SPLITS}
        self.stats = {"documents": 0, "duplicates": 0,
                      "inputs": {str(i): {"documents": 0, "duplicates": 0, "train_tokens": 0,
                                          "val_tokens": 0} for i, _ in mine}}
        self.restart = 0
        self.seen: set[int] = set()
        self.current: dict[str, Any] = {}  # the document being written
        for stale in out.glob(f".*{shards.part_tag(*tag)}_*.bin.tmp"):  # a killed run's
            stale.unlink()
        if state:
            self._restore(state)
        else:  # a run stopped before its first shard resumes from the start
            self._save_state(0, dict(self.counts), copy.deepcopy(self.stats))

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from the document being written at the last checkpoint."""
        start = state["snapshot"]
        for split in SPLITS:
            writer = self.writers[split]
            writer.records = state["shards"][split]
            writer.restore_partial(state["partial"][split])
            written = sum(r["tokens"] for r in writer.records) + writer.fill
            writer.skip = written - start["counts"][split]
        self.restart = start["ordinal"]
        self.counts = dict(start["counts"])
        self.stats = copy.deepcopy(start["stats"])

    # ---- reading ---------------------------------------------------------------------

    def _documents(self, bar: tqdm) -> Iterator[tuple[str, _Doc]]:
        """Every piece to encode, in corpus order. Documents before the restart point are
        not encoded, only remembered for --dedup."""
        dedup = self.settings["dedup"]
        ordinal = 0
        for source, path in self.mine:
            is_text = path.name.endswith((".txt", ".md"))
            needed = is_text and (ordinal >= self.restart or dedup)
            keys = _text_file_keys(path, dedup) if needed else None
            for text, nbytes, ends in file_documents(path, self.settings["field"]):
                bar.update(nbytes)
                if not text and not ends:
                    continue
                if ordinal < self.restart:  # already in committed shards
                    if ends and dedup:
                        self.seen.add(keys[1] if keys else document_key(text))
                    ordinal += ends
                    continue
                yield text, _Doc(source, ordinal, ends, keys)
                ordinal += ends

    # ---- writing ---------------------------------------------------------------------

    def _start_document(self, doc: _Doc, keys: tuple[int, int | None]) -> None:
        """A document's fate, decided in corpus order: dropped as a duplicate, or its split."""
        key, normalised = keys
        drop = self.settings["dedup"] and normalised in self.seen
        if self.settings["dedup"]:
            self.seen.add(normalised)
        if drop:
            self.stats["duplicates"] += 1
            self.stats["inputs"][str(doc.source)]["duplicates"] += 1
        split = "val" if is_validation(key, self.settings["val_fraction"]) else "train"
        self.current = {"ordinal": doc.ordinal, "split": split, "drop": drop,
                        "counts": dict(self.counts)}

    def _write(self, ids: np.ndarray, keys: tuple[int, int | None] | None, doc: _Doc) -> None:
        if self.current.get("ordinal") != doc.ordinal:
            self._start_document(doc, doc.keys or keys)
        if self.current["drop"]:
            return
        split = self.current["split"]
        if doc.ends:
            ids = np.concatenate([ids, self.eos])
        stats = self.stats["inputs"][str(doc.source)]
        stats[f"{split}_tokens"] += len(ids)
        self.counts[split] += len(ids)
        if self.writers[split].write(ids, doc.source):
            self._checkpoint(doc, split)
        if doc.ends:
            stats["documents"] += 1
            self.stats["documents"] += 1

    def _checkpoint(self, doc: _Doc, split: str) -> None:
        """Record, atomically, the committed shards, the other split's unfinished shard
        (all of it precedes this document) and where this document started."""
        started = self.current["counts"]
        stats = copy.deepcopy(self.stats)
        stats["inputs"][str(doc.source)][f"{split}_tokens"] -= self.counts[split] - started[split]
        self._save_state(doc.ordinal, started, stats, other=split)

    def _save_state(self, ordinal: int, counts: dict[str, int], stats: dict[str, Any],
                    other: str | None = None) -> None:
        # the committing split's unfinished shard holds only this document: re-encoded
        partial = {s: {"tokens": 0, "inputs": []} if s == other else
                   self.writers[s].save_partial() for s in SPLITS}
        shards.write_json(self.state_path, {
            "tokenizer_hash": self.settings["tokenizer_hash"], "settings": self.settings,
            "shards": {s: self.writers[s].records for s in SPLITS}, "partial": partial,
            "snapshot": {"ordinal": ordinal, "counts": counts, "stats": stats}})

    def encode(self, progress: bool) -> None:
        """Read, encode (in `workers` processes) and write the part, in corpus order."""
        total = sum(p.stat().st_size for _, p in self.mine)
        started = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare",
                  disable=not progress) as bar:
            jobs = self._jobs(bar)
            if self.workers == 1:
                for texts, docs in jobs:
                    keyed = [d.keys is not None for d in docs]
                    encoded = _encode(self.tokenizer, texts, keyed, self.settings["dedup"],
                                      self.dtype.name)
                    self._write_job(encoded, docs, bar, started)
            else:
                self._encode_in_pool(jobs, bar, started)
        for writer in self.writers.values():
            writer.flush()

    def _jobs(self, bar: tqdm) -> Iterator[tuple[list[str], list[_Doc]]]:
        texts: list[str] = []
        docs: list[_Doc] = []
        chars = 0
        for text, doc in self._documents(bar):
            texts.append(text)
            docs.append(doc)
            chars += len(text)
            if chars >= _JOB_CHARS:
                yield texts, docs
                texts, docs, chars = [], [], 0
        if texts:
            yield texts, docs

    def _encode_in_pool(self, jobs: Iterator[tuple[list[str], list[_Doc]]], bar: tqdm,
                        started: float) -> None:
        # fork: workers start at once with the modules already imported
        context = multiprocessing.get_context("fork")
        in_flight: deque[tuple[Any, list[_Doc]]] = deque()
        with context.Pool(self.workers, _init_worker,
                          (str(self.out / "tokenizer"),)) as pool:
            for texts, docs in jobs:
                keyed = [d.keys is not None for d in docs]
                job = (texts, keyed, self.settings["dedup"], self.dtype.name)
                in_flight.append((pool.apply_async(_encode_job, job), docs))
                while len(in_flight) > 2 * self.workers:  # bounded memory: write the oldest
                    result, older = in_flight.popleft()
                    self._write_job(result.get(), older, bar, started)
            while in_flight:
                result, older = in_flight.popleft()
                self._write_job(result.get(), older, bar, started)

    def _write_job(self, encoded: list[tuple[np.ndarray, tuple[int, int | None] | None]],
                   docs: list[_Doc], bar: tqdm, started: float) -> None:
        for (ids, keys), doc in zip(encoded, docs, strict=True):
            self._write(ids, keys, doc)
        elapsed = max(time.perf_counter() - started, 1e-9)
        tokens = sum(self.counts.values())
        bar.set_postfix_str(f"{self.stats['documents'] / elapsed:,.0f} docs/s, "
                            f"{tokens:,} tokens", refresh=False)

    def manifest(self) -> dict[str, Any]:
        """The part's manifest: settings, shards with hashes, per-input counts."""
        inputs = [{"path": str(path.resolve()), "bytes": path.stat().st_size,
                   **self.stats["inputs"][str(source)]} for source, path in self.mine]
        return {"format": shards.FORMAT, "version": shards.VERSION,
                "tokenizer_hash": self.tokenizer.hash, "vocab_size": self.tokenizer.vocab_size,
                "dtype": self.dtype.name, "eos_token_id": self.tokenizer.eos_token_id,
                "shard_tokens": self.settings["shard_tokens"],
                "val_fraction": self.settings["val_fraction"], "field": self.settings["field"],
                "dedup": self.settings["dedup"], "part": self.settings["part"],
                "documents": self.stats["documents"], "duplicates": self.stats["duplicates"],
                "train_tokens": self.counts["train"], "val_tokens": self.counts["val"],
                "inputs": inputs,
                "shards": {s: self.writers[s].records for s in SPLITS}}
