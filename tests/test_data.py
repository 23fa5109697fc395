"""Data preparation (splits, formats, errors) and training/eval batches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit import data, sources
from gptkit.data import (
    TokenBatches,
    corpus_texts,
    iter_eval_batches,
    load_meta,
    load_tokens,
    prepare,
    token_dtype,
)
from gptkit.errors import GptkitError
from gptkit.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SHAKESPEARE = (DATA / "shakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train(texts=[SHAKESPEARE], vocab_size=512).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


def _read(out: Path, split: str) -> list[int]:
    return load_tokens(out, split).tolist()


def test_single_document_is_split_at_90_percent(
    tok_dir: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_text(SHAKESPEARE, encoding="utf-8")
    meta = prepare([tmp_path / "input.txt"], tok_dir, tmp_path / "out", progress=False)
    ids = tok.encode(SHAKESPEARE) + [tok.eos_token_id]
    n_train = int(len(ids) * 0.9)
    assert _read(tmp_path / "out", "train") == ids[:n_train]
    assert _read(tmp_path / "out", "val") == ids[n_train:]
    assert meta == load_meta(tmp_path / "out")
    assert meta == {
        "format": "gptkit-tokens",
        "version": 1,
        "tokenizer_hash": tok.hash,
        "vocab_size": 512,
        "dtype": "uint16",
        "eos_token_id": 511,
        "train_tokens": n_train,
        "val_tokens": len(ids) - n_train,
        "documents": 1,
        "sources": [str((tmp_path / "input.txt").resolve())],
    }
    assert Tokenizer.from_pretrained(tmp_path / "out" / "tokenizer").hash == tok.hash


def test_documents_are_separated_by_eos_and_every_tenth_is_validation(
    tok_dir: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = [f"Document number {i}.\nIt has two lines." for i in range(20)]
    for i, doc in enumerate(docs):
        folder = corpus / "sub" if i >= 10 else corpus
        (folder / f"{i:02d}.{'md' if i % 2 else 'txt'}").write_text(doc, encoding="utf-8")
    (corpus / "ignored.csv").write_text("not a document")
    (corpus / "blank.txt").write_text("")  # sorted after 00-09: empty, so not a document
    meta = prepare([corpus], tok_dir, tmp_path / "out", progress=False)
    encoded = [tok.encode(d) + [tok.eos_token_id] for d in docs]
    assert meta["documents"] == 20
    assert _read(tmp_path / "out", "val") == encoded[9] + encoded[19]
    train = [i for i in range(20) if i not in (9, 19)]
    assert _read(tmp_path / "out", "train") == [t for i in train for t in encoded[i]]


def test_jsonl_field_and_blank_lines(tok_dir: Path, tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": f"text {i}", "id": i}) for i in range(3)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n", encoding="utf-8")
    meta = prepare(
        [path], tok_dir, tmp_path / "out", field="body", val_fraction=0.0, progress=False
    )
    expected = [t for i in range(3) for t in tok.encode(f"text {i}") + [tok.eos_token_id]]
    assert _read(tmp_path / "out", "train") == expected
    assert meta["documents"] == 3 and meta["val_tokens"] == 0
    assert list(corpus_texts([path], field="body")) == ["text 0", "text 1", "text 2"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "bad.jsonl line 2 is not valid JSON"),
        ("[1, 2]", "bad.jsonl line 2 is a JSON list; expected an object with a 'text' field"),
        ('{"body": "x"}', "bad.jsonl line 2 has no field 'text' \\(it has body\\)"),
        ('{"text": 3}', "bad.jsonl line 2: field 'text' is a int; expected a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(
    tok_dir: Path, tmp_path: Path, line: str, message: str
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(GptkitError, match=message):
        prepare([tmp_path / "bad.jsonl"], tok_dir, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_uint32_for_large_vocabularies(tmp_path: Path) -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    alphabet = "".join(chr(c) for c in range(0x20000, 0x20000 + 66_000))
    Tokenizer.train(texts=[alphabet], kind="char", vocab_size=70_000).save_pretrained(
        tmp_path / "tok"
    )
    (tmp_path / "doc.txt").write_text(alphabet[-3:], encoding="utf-8")
    meta = prepare(
        [tmp_path / "doc.txt"], tmp_path / "tok", tmp_path / "out", val_fraction=0.0, progress=False
    )
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 66_002
    assert load_tokens(tmp_path / "out", "train").dtype == np.uint32
    assert _read(tmp_path / "out", "train") == [65_997, 65_998, 65_999, 66_000]


def test_many_pieces_encode_like_the_whole_file(
    tok_dir: Path, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file read in many pieces, encoded by two threads out of order, gives the ids of
    the whole text in corpus order."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)
    monkeypatch.setattr(data, "_GROUP_CHARS", 2048)
    (tmp_path / "input.txt").write_text(SHAKESPEARE, encoding="utf-8")
    prepare([tmp_path / "input.txt"], tok_dir, tmp_path / "out", workers=2, progress=False)
    ids = _read(tmp_path / "out", "train") + _read(tmp_path / "out", "val")
    assert ids == tok.encode(SHAKESPEARE) + [tok.eos_token_id]


def test_prepare_is_deterministic(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(SHAKESPEARE[:20_000], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "hi"}\n' * 30, encoding="utf-8")
    for out in ("one", "two"):
        prepare(
            [tmp_path / "a.txt", tmp_path / "b.jsonl"],
            tok_dir,
            tmp_path / out,
            workers=1 if out == "one" else 2,
            progress=False,
        )
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_invalid_utf8_is_replaced_with_a_warning(
    tok_dir: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_bytes(b"ab\xff\xfecd")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\xc3"}\n')
    with pytest.warns(UserWarning) as caught:
        prepare([tmp_path], tok_dir, tmp_path / "out", val_fraction=0.0, progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert "a.txt: 2 bytes that are not valid UTF-8" in messages[0]
    assert "b.jsonl: 1 bytes that are not valid UTF-8" in messages[1]
    eos = tok.eos_token_id
    assert _read(tmp_path / "out", "train") == (
        tok.encode("ab\ufffd\ufffdcd") + [eos] + tok.encode("x\ufffd") + [eos]
    )


def test_char_tokenizer_reports_unknown_characters(tmp_path: Path) -> None:
    Tokenizer.train(texts=["abc"], kind="char").save_pretrained(tmp_path / "tok")
    (tmp_path / "doc.txt").write_text("abcxyz", encoding="utf-8")
    with pytest.warns(UserWarning, match="3 characters were not in the vocabulary"):
        prepare([tmp_path / "doc.txt"], tmp_path / "tok", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("make_inputs", "kwargs", "message"),
    [
        (lambda d: [], {}, "no corpus given"),
        (lambda d: [d / "missing"], {}, "corpus path .*missing does not exist"),
        (lambda d: [d / "emptydir"], {}, "emptydir contains no .txt, .md, .jsonl"),
        (lambda d: [d / "x.csv"], {}, "x.csv is not a .txt, .md, .jsonl"),
        (lambda d: [d / "blank.txt"], {}, "the corpus \\(1 files\\) contains no text"),
        (lambda d: [d / "ok.txt"], {"val_fraction": 1.0}, "val_fraction 1.0 is outside"),
        (lambda d: [d / "ok.txt"], {"val_fraction": -0.1}, "val_fraction -0.1 is outside"),
        (lambda d: [d / "ok.txt"], {"workers": 0}, "workers 0 must be at least 1"),
    ],
)
def test_prepare_errors(tok_dir: Path, tmp_path: Path, make_inputs, kwargs, message) -> None:
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(GptkitError, match=message):
        prepare(make_inputs(tmp_path), tok_dir, tmp_path / "out", progress=False, **kwargs)


def test_load_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match="is not a gptkit data directory .*gptkit prepare"):
        load_meta(tmp_path)
    (tmp_path / "doc.txt").write_text(SHAKESPEARE[:2000], encoding="utf-8")
    prepare([tmp_path / "doc.txt"], tok_dir, tmp_path / "out", progress=False)
    with pytest.raises(GptkitError, match="unknown split 'test'"):
        load_tokens(tmp_path / "out", "test")
    with open(tmp_path / "out" / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(GptkitError, match="val.bin should hold"):
        load_tokens(tmp_path / "out", "val")


TOKENS = np.arange(1000, dtype=np.uint16)


def test_batches_are_shifted_windows() -> None:
    x, y = TokenBatches(TOKENS, block_size=8, batch_size=4, seed=0).next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 8) == y.shape
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.int64))


def test_batches_resume_exactly(tmp_path: Path) -> None:
    batches = TokenBatches(TOKENS, block_size=8, batch_size=4, seed=1)
    for _ in range(3):
        batches.next_batch()
    torch.save(batches.state_dict(), tmp_path / "state.pt")
    expected = [batches.next_batch() for _ in range(3)]
    resumed = TokenBatches(TOKENS, block_size=8, batch_size=4, seed=999)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.step == 3
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_take_disjoint_slices_of_one_draw() -> None:
    single = TokenBatches(TOKENS, block_size=8, batch_size=6, seed=3)
    ranks = [TokenBatches(TOKENS, 8, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
        assert not torch.equal(parts[0], parts[1])


def test_batches_need_enough_tokens() -> None:
    with pytest.raises(GptkitError, match="the val split has 8 tokens; a block size of 8 needs"):
        TokenBatches(TOKENS[:8], block_size=8, batch_size=2, seed=0, split="val")
    TokenBatches(TOKENS[:9], block_size=8, batch_size=2, seed=0).next_batch()


def test_eval_batches_are_fixed_and_non_overlapping() -> None:
    tokens = np.arange(101, dtype=np.uint16)  # 10 windows of 10 (+1 for the targets)
    all_x = torch.cat([x for x, _ in iter_eval_batches(tokens, 10, 4)])
    assert all_x[:, 0].tolist() == list(range(0, 100, 10))
    limited = list(iter_eval_batches(tokens, 10, 2, max_batches=2))
    assert [x[:, 0].tolist() for x, _ in limited] == [[0, 20], [40, 60]]
    assert torch.equal(limited[0][1], limited[0][0] + 1)


def test_prefetcher_gives_the_same_batches_and_resumes_exactly() -> None:
    from gptkit.data import Prefetcher

    tokens = np.arange(5000, dtype=np.uint16)
    plain = TokenBatches(tokens, block_size=16, batch_size=4, seed=3)
    expected = [plain.next_batch()[0] for _ in range(8)]
    fetched = Prefetcher(TokenBatches(tokens, block_size=16, batch_size=4, seed=3))
    got = [fetched.next_batch()[0] for _ in range(5)]
    state = fetched.state_dict()  # taken while the thread has already prepared more
    fetched.close()
    resumed = TokenBatches(tokens, block_size=16, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    got += [resumed.next_batch()[0] for _ in range(3)]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
