"""Corpora as they come (parquet, Arrow, compressed JSONL, text) into resumable shards."""

import gzip
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from resume_helpers import straight_and_resumed

from gptkit.corpus import is_validation, prepare_shards, split_key
from gptkit.data import TokenBatches, load_meta, load_tokens
from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
TEXT = (DATA / "shakespeare" / "input.txt").read_text(encoding="utf-8")[:120_000]
# one document per speech, and one long one (read in pieces) from Moby Dick
DOCS = [d for d in TEXT.split("\n\n") if d.strip()] + [
    (DATA / "prose" / "moby_dick.txt").read_text(encoding="utf-8")[:60_000]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train(texts=[TEXT[:40_000]], vocab_size=512).save_pretrained(path)
    return path


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()


def write_inputs(folder: Path, docs: list[str]) -> dict[str, list[Path]]:
    """The same documents in every format `prepare` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = folder / "texts"
    texts.mkdir()
    for i, doc in enumerate(docs):
        (texts / f"doc_{i:05d}.txt").write_text(doc, encoding="utf-8")
    raw = _jsonl(docs)
    (folder / "c.jsonl").write_bytes(raw)
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (folder / "c.jsonl.xz").write_bytes(lzma.compress(raw))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, folder / "c.parquet", row_group_size=100)
    hf = folder / "hf_dataset"  # as datasets' save_to_disk writes it: IPC stream files
    hf.mkdir()
    for n, part in enumerate((table.slice(0, 300), table.slice(300))):
        with pa.OSFile(str(hf / f"data-{n:05d}-of-00002.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
    (hf / "state.json").write_text("{}")
    return {"text folder": [texts], "jsonl": [folder / "c.jsonl"],
            "jsonl.gz": [folder / "c.jsonl.gz"], "jsonl.zst": [folder / "c.jsonl.zst"],
            "jsonl.xz": [folder / "c.jsonl.xz"], "parquet": [folder / "c.parquet"],
            "datasets folder": [hf]}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def expected_stream(tok: Tokenizer, docs: list[str], split: str, val_fraction: float = 0.1
                    ) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        if is_validation(split_key(doc), val_fraction) == (split == "val"):
            ids += tok.encode(doc) + [tok.eos_token_id]
    return ids


def test_every_format_gives_the_tokens_of_plain_text(tok_dir: Path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", DOCS)
    tok = Tokenizer.from_pretrained(tok_dir)
    reference = None
    for name, paths in inputs.items():
        out = tmp_path / name.replace(" ", "_")
        meta = prepare_shards(paths, tok_dir, out, shard_tokens=4000, workers=1, progress=False)
        assert meta["documents"] == len(DOCS), name
        got = shard_bytes(out)
        if reference is None:
            reference = got
            for split in ("train", "val"):
                assert load_tokens(out, split).tolist() == expected_stream(tok, DOCS, split)
        assert got == reference, f"{name} differs from the plain-text shards"


def test_shards_do_not_depend_on_workers_or_shard_size(tok_dir: Path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", DOCS)["jsonl.zst"]
    one = prepare_shards(inputs, tok_dir, tmp_path / "one", shard_tokens=10**9, workers=1,
                         progress=False)
    many = prepare_shards(inputs, tok_dir, tmp_path / "many", shard_tokens=3000, workers=2,
                          progress=False)
    for split in ("train", "val"):
        assert load_tokens(tmp_path / "one", split).tolist() == \
            load_tokens(tmp_path / "many", split).tolist()
    assert len(one["shards"]["train"]) == 1
    sizes = [s["tokens"] for s in many["shards"]["train"]]
    assert sizes[:-1] == [3000] * (len(sizes) - 1) and 0 < sizes[-1] <= 3000
    import hashlib
    for shard in many["shards"]["train"]:
        data = (tmp_path / "many" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not list((tmp_path / "many").glob(".*"))  # no temporary or state file left


def test_training_reads_shards_as_one_file_and_resumes_exactly(tok_dir: Path,
                                                               tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", DOCS)["parquet"]
    prepare_shards(inputs, tok_dir, tmp_path / "d", shard_tokens=700, workers=1, progress=False)
    sharded = load_tokens(tmp_path / "d", "train")
    whole = np.asarray(sharded.tolist(), dtype=np.uint16)
    assert load_meta(tmp_path / "d")["train_tokens"] == len(whole)
    a = TokenBatches(sharded, 64, 8, seed=3)
    b = TokenBatches(whole, 64, 8, seed=3)
    for _ in range(5):  # windows of 65 tokens cross 700-token shards often
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)
    resumed = TokenBatches(load_tokens(tmp_path / "d", "train"), 64, 8, seed=0)
    resumed.load_state_dict(a.state_dict())
    assert resumed.next_batch()[0].equal(a.next_batch()[0])


def _prepare_cmd(inputs: list[Path], tok_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptkit", "prepare", *map(str, inputs), "--tokenizer",
            str(tok_dir), "--out", str(out), "--shard-tokens", "1500", "--workers", "2",
            "--dedup", *extra]


def test_resume_after_sigkill_gives_identical_shards(tok_dir: Path, tmp_path: Path) -> None:
    # long enough to be killed in the middle: numbered copies of the documents in gzip'd
    # JSONL, text files of ten documents each, and 50 exact repeats for --dedup to drop
    records = [f"{k}. {d}" for k in range(12) for d in DOCS]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(records)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        _jsonl(records[:50])))
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(0, len(DOCS) - 10, 10):
        (texts / f"{i:05d}.md").write_text("\n\n".join(DOCS[i:i + 10]), encoding="utf-8")
    paths = [tmp_path / "a.jsonl.gz", texts, tmp_path / "b.jsonl.zst"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run(_prepare_cmd(paths, tok_dir, tmp_path / "whole"), check=True, env=env,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_prepare_cmd(paths, tok_dir, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob("train_*.bin"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too, as a lost machine loses them
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run ended before it could be killed"
    with pytest.raises(GptkitError, match="interrupted prepare; pass --resume"):
        prepare_shards(paths, tok_dir, out, shard_tokens=1500, dedup=True, progress=False)
    subprocess.run(_prepare_cmd(paths, tok_dir, out, "--resume"), check=True, env=env,
                   capture_output=True)
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == whole
    assert whole["duplicates"] == 50


def test_dedup_counts_exact_duplicates(tok_dir: Path, tmp_path: Path) -> None:
    docs = DOCS[:50] + [d.replace(" ", "  ") + "\n" for d in DOCS[:20]]  # same once normalised
    paths = write_inputs(tmp_path / "in", docs)["jsonl"]
    meta = prepare_shards(paths, tok_dir, tmp_path / "d", shard_tokens=2000, dedup=True,
                          workers=1, progress=False)
    assert (meta["documents"], meta["duplicates"]) == (50, 20)
    assert meta["inputs"][0]["duplicates"] == 20


def test_parts_prepared_apart_read_as_the_whole(tok_dir: Path, tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "in", DOCS)["text folder"]
    prepare_shards(paths, tok_dir, tmp_path / "one", shard_tokens=3000, workers=1,
                   progress=False)
    out = tmp_path / "shared"
    for index in range(3):  # three machines, one shared folder
        prepare_shards(paths, tok_dir, out, shard_tokens=3000, workers=1, shard_index=index,
                       num_shards=3, progress=False)
        if index == 0:
            with pytest.raises(GptkitError, match=r"holds parts \[0\] of 3; prepare the missing"):
                load_meta(out)
    eos = Tokenizer.from_pretrained(tok_dir).eos_token_id

    def documents(directory: Path, split: str) -> list[bytes]:
        ids = np.asarray(load_tokens(directory, split).tolist())
        return sorted(doc.tobytes() for doc in np.split(ids, np.flatnonzero(ids == eos) + 1))

    for split in ("train", "val"):
        assert documents(out, split) == documents(tmp_path / "one", split)
    assert load_meta(out)["documents"] == len(DOCS)


def test_bad_inputs_are_one_sentence(tok_dir: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["a b c"], "url": ["x"]}), tmp_path / "nofield.parquet")
    with pytest.raises(GptkitError, match=r"nofield.parquet has no column 'text' \(it has "
                                          r"content, url\); choose the text column with --field"):
        prepare_shards([tmp_path / "nofield.parquet"], tok_dir, tmp_path / "a",
                       shard_tokens=100, progress=False)
    (tmp_path / "empty.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    with pytest.raises(GptkitError, match=r"corpus \(1 files\) contains no text"):
        prepare_shards([tmp_path / "empty.jsonl.zst"], tok_dir, tmp_path / "b",
                       shard_tokens=100, progress=False)


def test_corrupt_gzip_keeps_the_documents_before_it(tok_dir: Path, tmp_path: Path) -> None:
    good = gzip.compress(_jsonl(DOCS[:40]))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match=r"cut.jsonl.gz is damaged near compressed byte "
                                         r"[\d,]+ .*kept the \d+ documents before it"):
        meta = prepare_shards([tmp_path / "cut.jsonl.gz"], tok_dir, tmp_path / "d",
                              shard_tokens=10**6, workers=1, progress=False, val_fraction=0)
    kept = meta["documents"]
    assert 0 < kept < 40
    tok = Tokenizer.from_pretrained(tok_dir)
    assert load_tokens(tmp_path / "d", "train").tolist() == expected_stream(
        tok, DOCS[:kept], "train", 0)


def test_another_tokenizer_is_refused(tok_dir: Path, tmp_path: Path) -> None:
    paths = write_inputs(tmp_path / "in", DOCS[:30])["jsonl"]
    prepare_shards(paths, tok_dir, tmp_path / "d", shard_tokens=500, num_shards=2,
                   shard_index=0, progress=False)
    other = tmp_path / "other_tok"
    Tokenizer.train(texts=[TEXT[:20_000]], vocab_size=300).save_pretrained(other)
    with pytest.raises(GptkitError, match=r"holds shards tokenized with another tokenizer"):
        prepare_shards(paths, other, tmp_path / "d", shard_tokens=500, num_shards=2,
                       shard_index=1, progress=False)


def test_cli_prepares_shards_and_training_resumes_exactly_on_them(tok_dir: Path,
                                                                   tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in", DOCS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    run = subprocess.run([sys.executable, "-m", "gptkit", "prepare", *map(str, inputs["parquet"]),
                          str(inputs["jsonl.xz"][0]), "--tokenizer", str(tok_dir), "--out",
                          str(tmp_path / "d"), "--shard-tokens", "900"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert re.search(r"in \d+ shards to", run.stdout), run.stdout
    straight, resumed = straight_and_resumed(
        tmp_path, 4, data=str(tmp_path / "d"), preset="tiny", n_layer=1, n_head=2, n_embd=32,
        block_size=32, batch_size=4, eval_steps=1, eval_interval=0, log_interval=1, device="cpu")
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
    info = subprocess.run([sys.executable, "-m", "gptkit", "info", str(tmp_path / "d")],
                          env=env, capture_output=True, text=True)
    meta = load_meta(tmp_path / "d")
    assert f"(prepared data, {len(meta['shards']['train'])} train and " in info.stdout
    assert f"documents:      {2 * len(DOCS):,}" in info.stdout and "c.parquet" in info.stdout
    bad = subprocess.run([sys.executable, "-m", "gptkit", "prepare", str(inputs["jsonl"][0]),
                          "--tokenizer", str(tok_dir), "--out", str(tmp_path / "e"), "--dedup"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--dedup applies to sharded output; add --shard-tokens N." in bad.stderr


def test_torchrun_rank_and_world_size_choose_the_part(tok_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_inputs(tmp_path / "in", DOCS[:40])["text folder"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    meta = prepare_shards(paths, tok_dir, tmp_path / "d", shard_tokens=10**6, workers=1,
                          progress=False)
    assert meta["part"] == {"index": 1, "count": 2} and meta["documents"] == 20
    assert (tmp_path / "d" / "manifest-00001-of-00002.json").is_file()
    with pytest.raises(GptkitError, match=r"--shard-index 2 is outside \[0, --num-shards=2\)"):
        prepare_shards(paths, tok_dir, tmp_path / "e", shard_tokens=10, shard_index=2,
                       num_shards=2, progress=False)


def test_ctrl_c_then_resume_encodes_only_what_is_left(tok_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gptkit import corpus

    paths = write_inputs(tmp_path / "in", DOCS)["jsonl.gz"]
    settings = dict(shard_tokens=2500, workers=1, progress=False, val_fraction=0.2)
    prepare_shards(paths, tok_dir, tmp_path / "whole", **settings)
    flush, calls = corpus._Writer.flush, []

    def interrupted_flush(self: corpus._Writer) -> None:  # Ctrl-C after 12 shards
        if len(calls) == 12:
            raise KeyboardInterrupt
        calls.append(self.split)
        flush(self)

    monkeypatch.setattr(corpus._Writer, "flush", interrupted_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(paths, tok_dir, tmp_path / "out", **settings)
    assert "val" in calls and list((tmp_path / "out").glob(".val_*.partial"))
    monkeypatch.setattr(corpus._Writer, "flush", flush)
    encode, encoded = corpus._encode, []
    monkeypatch.setattr(corpus, "_encode", lambda tok, texts, *a: encoded.extend(texts) or
                        encode(tok, texts, *a))
    prepare_shards(paths, tok_dir, tmp_path / "out", resume=True, **settings)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")
    assert 0 < len(encoded) < len(DOCS) - 400  # the resumed run encoded only the rest
    assert not list((tmp_path / "out").glob(".*"))
