"""A sharded data directory: its file names, manifests, and its tokens as one array.

`gptkit.corpus.prepare_shards` writes, per split, `train_000000.bin`, `train_000001.bin`,
... of a fixed token count (raw little-endian ids, as `train.bin`), `tokenizer/` and a
manifest (`manifest.json`, or `manifest-00003-of-00008.json` for part 3 of 8 when several
machines prepare disjoint parts into one folder). `ShardedTokens` reads every shard of a
split, in manifest order, as one memory-mapped token stream: training draws windows from
it exactly as from one file, and memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import GptkitError, read_json

FORMAT = "gptkit-shards"
VERSION = 1
_MANIFEST = re.compile(r"manifest(-\d{5}-of-\d{5})?\.json")


def part_tag(index: int, count: int) -> str:
    """'' for a single-part directory, else '-00003-of-00008' (part 3 of 8)."""
    return "" if count == 1 else f"-{index:05d}-of-{count:05d}"


def manifest_name(index: int, count: int) -> str:
    return f"manifest{part_tag(index, count)}.json"


def shard_name(split: str, index: int, count: int, number: int) -> str:
    """`train_000012.bin`, or `train-00003-of-00008_000012.bin` for one part of several."""
    return f"{split}{part_tag(index, count)}_{number:06d}.bin"


def manifest_paths(data_dir: str | Path) -> list[Path]:
    """The manifests of a sharded directory, parts in order ([] if it is not sharded)."""
    directory = Path(data_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _MANIFEST.fullmatch(p.name))


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_manifests(data_dir: str | Path) -> list[dict[str, Any]]:
    """Every part's manifest, checked to describe one tokenization and every part present."""
    paths = manifest_paths(data_dir)
    manifests = [read_json(p) for p in paths]
    for path, manifest in zip(paths, manifests, strict=True):
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GptkitError(f"{path} is not a gptkit-shards manifest.")
        if manifest.get("version") != VERSION:
            raise GptkitError(f"{path} has format version {manifest.get('version')}; this "
                              f"gptkit reads version {VERSION}.")
        for key in ("tokenizer_hash", "dtype"):
            if manifest[key] != manifests[0][key]:
                raise GptkitError(f"{path} has a different {key} than {paths[0]}; the parts "
                                  "of one directory must be prepared with one tokenizer.")
    count = manifests[0]["part"]["count"] if manifests else 0
    if len(manifests) != count:
        present = sorted(m["part"]["index"] for m in manifests)
        raise GptkitError(f"{data_dir} holds parts {present} of {count}; prepare the missing "
                          "parts (--shard-index) before training on it.")
    return manifests


def combined_meta(data_dir: str | Path) -> dict[str, Any]:
    """What `data.load_meta` gives for one file, summed over every part's manifest."""
    manifests = load_manifests(data_dir)
    first = manifests[0]
    meta = {key: first[key] for key in ("tokenizer_hash", "vocab_size", "dtype", "eos_token_id")}
    for key in ("train_tokens", "val_tokens", "documents", "duplicates"):
        meta[key] = sum(m[key] for m in manifests)
    meta["shards"] = {split: [s for m in manifests for s in m["shards"][split]]
                      for split in ("train", "val")}
    meta["sources"] = [i["path"] for m in manifests for i in m["inputs"]]
    return meta


class ShardedTokens:
    """The shards of one split as one read-only token array: `len()` and integer-array
    indexing (the windows `TokenBatches` and `iter_eval_batches` gather), each shard
    memory-mapped on first use."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths = paths
        self.dtype = np.dtype(dtype)
        # starts[k] is the stream position of shard k's first token
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r")
        return self._maps[k]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        flat = np.asarray(index, dtype=np.int64).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index outside [0, {len(self)})")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(shard):  # one gather per shard the windows touch
            where = shard == k
            out[where] = self._shard(int(k))[flat[where] - self.starts[k]]
        return out.reshape(np.shape(index))

    def tolist(self) -> list[int]:
        return self[np.arange(len(self))].tolist()


def load_split(data_dir: str | Path, split: str) -> ShardedTokens:
    """The tokens of one split of a sharded directory, every shard's size checked."""
    meta = combined_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    paths, counts = [], []
    for shard in meta["shards"][split]:
        path = Path(data_dir) / shard["file"]
        size = path.stat().st_size if path.is_file() else -1
        if size != shard["tokens"] * dtype.itemsize:
            raise GptkitError(f"{path} should hold {shard['tokens']} {dtype.name} tokens but "
                              f"has {max(size, 0)} bytes; run `gptkit prepare` again.")
        paths.append(path)
        counts.append(shard["tokens"])
    return ShardedTokens(paths, counts, dtype)
