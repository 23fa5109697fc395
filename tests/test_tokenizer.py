"""Tokenizer: golden GPT-2 ids, tiktoken and tokenizers parity, round trips, HF files."""

import json
import shutil
from pathlib import Path

import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from gptkit.errors import GptkitError
from gptkit.tokenizer import (
    EOT,
    GPT2_PATTERN,
    Tokenizer,
    _tiktoken_encoding,
    bytes_to_unicode,
    read_text_chunks,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GPT2_DIR = DATA / "gpt2-tokenizer"
SAMPLE_CHARS = 200_000
ROUND_TRIP = [
    "",
    "Hello world",
    "中文文本，还有标点。",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "  runs   of    spaces  ",
    "\n\n\nnewlines\n\n",
    "\ttabs\t\tand\r\nCRLF\r\n",
    "it's we'll they're I'M",
    "mixed 123 numbers 4.5e6 and symbols @#$%^&*()",
    "\x00\x01 control \x7f chars \u00a0 nbsp \u2028 line sep",
]


def _samples() -> dict[str, str]:
    """The first SAMPLE_CHARS characters of every text file in data/."""
    files = sorted(DATA.glob("*/*.txt")) + sorted(DATA.glob("*/*.jsonl"))
    return {f.name: f.read_text(encoding="utf-8")[:SAMPLE_CHARS] for f in files}


SAMPLES = _samples()


def _reference_gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's gpt2 Encoding, rebuilt from OpenAI's encoder.json (byte-decoded)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    byte_of = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    encoder = json.loads((GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in t): i for t, i in encoder.items() if t != EOT}
    return tiktoken.Encoding(
        "gpt2-ref", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_pretrained(GPT2_DIR)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(texts=list(SAMPLES.values()), vocab_size=4096)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return Tokenizer.train(texts=["hello world\n", "abc ABC 中"], kind="char")


@pytest.fixture(params=["gpt2", "trained"])
def bpe(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def test_gpt2_golden_ids(gpt2: Tokenizer) -> None:
    assert gpt2.kind == "bpe" and gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(EOT) == [50256]
    assert gpt2.encode(f"Hi{EOT}there") == [17250, 50256, 8117]
    assert (gpt2.eos_token, gpt2.eos_token_id, gpt2.pad_token_id) == (EOT, 50256, 50256)


def test_gpt2_ids_equal_reference_tiktoken(gpt2: Tokenizer) -> None:
    reference = _reference_gpt2_encoding()
    for name, text in SAMPLES.items():
        assert gpt2.encode(text) == reference.encode(text, allowed_special="all"), name


def test_fast_engine_equals_tokenizers_engine(bpe: Tokenizer, tmp_path: Path) -> None:
    assert bpe.uses_tiktoken
    bpe.save_pretrained(tmp_path)
    reference = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = list(SAMPLES.values()) + ROUND_TRIP
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert bpe.encode_batch(texts) == expected
    assert [bpe.encode(t) for t in texts] == expected


def test_tiktoken_engine_only_for_tokens_of_the_byte_alphabet() -> None:
    vocab = {c: b for b, c in bytes_to_unicode().items()}  # id = the byte
    eot = {"content": EOT, "id": 257, "lstrip": False, "rstrip": False, "single_word": False}
    spec = {"model": {"type": "BPE", "vocab": {**vocab, "ĠĠ": 256}, "merges": ["Ġ Ġ"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [eot]}
    encoding = _tiktoken_encoding(spec, EOT)
    assert encoding.encode("a   b") == [97, 256, 32, 98]  # "Ġ" stands for a space byte
    spec["model"].update(vocab={**vocab, "中文": 256}, merges=["中 文"])  # not byte-level
    assert _tiktoken_encoding(spec, EOT) is None


def test_trained_bpe_layout(trained: Tokenizer) -> None:
    assert trained.vocab_size == 4096
    assert trained.eos_token_id == 4095
    assert [trained.encode(chr(b)) for b in range(65, 70)] == [[65], [66], [67], [68], [69]]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
def test_bpe_round_trip_any_text(gpt2: Tokenizer, trained: Tokenizer, text: str) -> None:
    for tok in (gpt2, trained):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("encode", ["encode", "encode_numpy"])
def test_unpaired_surrogate_is_refused(gpt2: Tokenizer, char: Tokenizer, encode: str) -> None:
    for tok in (gpt2, char):
        with pytest.raises(GptkitError, match="unpaired surrogate '\\\\ud800' at position 1"):
            getattr(tok, encode)("a\ud800b")


def test_data_samples_round_trip(bpe: Tokenizer) -> None:
    for name, text in SAMPLES.items():
        assert bpe.decode(bpe.encode(text)) == text, name


def test_char_tokenizer(char: Tokenizer) -> None:
    chars = sorted(set("hello world\nabc ABC 中"))
    assert char.kind == "char" and not char.uses_tiktoken
    assert char.vocab_size == len(chars) + 2
    assert char.encode("".join(chars)) == list(range(len(chars)))
    assert char.eos_token_id == len(chars) and char.unk_token_id == len(chars) + 1
    assert char.encode(f"ab{EOT}") == [chars.index("a"), chars.index("b"), char.eos_token_id]
    assert char.encode("hé!") == [chars.index("h"), char.unk_token_id, char.unk_token_id]
    assert char.count_unknown("hé! wow") == 2
    assert char.decode(char.encode("hello\nworld")) == "hello\nworld"
    assert char.decode(char.encode(f"ab{EOT}"), skip_special_tokens=True) == "ab"


def test_char_vocab_keeps_most_frequent() -> None:
    tok = Tokenizer.train(texts=["aaaabbbc"], vocab_size=4, kind="char")
    assert tok.encode("abc") == [0, 1, 3]  # a, b, <unk>; then <|endoftext|> is 2


@pytest.mark.parametrize("name", ["gpt2", "trained", "char"])
def test_save_reload_and_autotokenizer_parity(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    tok.model_max_length = 256
    tok.save_pretrained(tmp_path)
    tok.model_max_length = None
    reloaded = Tokenizer.from_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.hash == tok.hash and reloaded.kind == tok.kind
    assert reloaded.model_max_length == 256 and hf.model_max_length == 256
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    texts = ROUND_TRIP + [f"one{EOT}two", SAMPLES["input.txt"][:5000]]
    if name == "char":
        texts = ["hello world", "abc\n中", "unseen ☃ chars", f"ab{EOT}c"]
    for text in texts:
        ids = tok.encode(text)
        assert reloaded.encode(text) == ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids)


def test_vocab_and_merges_files_give_the_same_tokenizer(gpt2: Tokenizer, tmp_path: Path) -> None:
    shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    assert Tokenizer.from_pretrained(tmp_path).hash == gpt2.hash


def test_encode_tensor_decode_tensor_and_batch(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("Hello world", return_tensors="pt")
    assert ids.dtype == torch.int64 and ids.shape == (1, 2)
    assert gpt2.decode(ids[0]) == "Hello world"
    assert gpt2.batch_decode(torch.tensor([[15496], [995]])) == ["Hello", " world"]
    with pytest.raises(GptkitError, match="1-D"):
        gpt2.decode(ids)
    with pytest.raises(GptkitError, match="outside the vocabulary"):
        gpt2.decode([50257])


def test_call_pads_on_the_left(gpt2: Tokenizer) -> None:
    batch = gpt2(["Hello world", "Hello"])
    assert batch["input_ids"].tolist() == [[15496, 995], [50256, 15496]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert gpt2("Hello", return_tensors=None) == {"input_ids": [[15496]], "attention_mask": [[1]]}


def test_read_text_chunks_cut_where_tokens_do_not_change(gpt2: Tokenizer, tmp_path: Path) -> None:
    text = (
        SAMPLES["input.txt"][:30_000] + "中文，没有空格。" * 400 + SAMPLES["moby_dick.txt"][:30_000]
    )
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(read_text_chunks(path, chunk_bytes=1000))
    assert len(chunks) > 50
    assert "".join(c for c, _ in chunks) == text
    assert sum(n for _, n in chunks) == path.stat().st_size
    assert [i for c, _ in chunks for i in gpt2.encode(c)] == gpt2.encode(text)


@pytest.mark.parametrize("chunk_bytes", [1, 5, 64])
def test_read_text_chunks_replaces_invalid_bytes_after_valid_pieces(
    tmp_path: Path, chunk_bytes: int
) -> None:
    """Pieces decode strictly until the first invalid byte (a character may straddle two
    pieces), then every invalid byte becomes U+FFFD, also in later pieces."""
    valid = "naïve “quotes” 中文 ok\n".encode() * 4
    path = tmp_path / "mixed.txt"
    path.write_bytes(valid + b"bad \xff\xfe end " + valid + b"\xe4 tail \xc3")
    with pytest.warns(UserWarning, match=r"mixed.txt: 4 bytes that are not valid UTF-8"):
        text = "".join(c for c, _ in read_text_chunks(path, chunk_bytes=chunk_bytes))
    clean = valid.decode()
    assert text == clean + "bad \ufffd\ufffd end " + clean + "\ufffd tail \ufffd"


def test_train_from_files_warns_about_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 ol\xff\xfe\n" * 3)
    with pytest.warns(UserWarning, match=r"bad.txt: 9 bytes that are not valid UTF-8"):
        tok = Tokenizer.train([path], vocab_size=300)
    assert tok.decode(tok.encode("caf\ufffd")) == "caf\ufffd"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"texts": ["x"], "vocab_size": 256}, "vocab_size 256 is too small"),
        ({"texts": ["x"], "kind": "wordpiece"}, "unknown tokenizer kind 'wordpiece'"),
        ({}, "no training text"),
        ({"texts": [""]}, "training text is empty"),
        ({"files": ["/nonexistent/corpus.txt"]}, "/nonexistent/corpus.txt does not exist"),
    ],
)
def test_train_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(GptkitError, match=message):
        Tokenizer.train(**kwargs)


def test_train_empty_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptkitError, match="empty.txt is empty"):
        Tokenizer.train([tmp_path / "empty.txt"])


def test_from_pretrained_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    with pytest.raises(GptkitError, match=f"{tmp_path} holds no tokenizer; expected"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptkitError, match="is not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptkitError, match="Could not find 'no-such/tokenizer'.*tokenizer.json"):
        Tokenizer.from_pretrained("no-such/tokenizer")


def test_prompts_start_with_the_bos_the_tokenizer_file_asks_for(trained: Tokenizer,
                                                                tmp_path: Path) -> None:
    """A tokenizer.json whose post-processor puts <s> before a text (Llama's and Gemma's
    add_bos_token): a prompt to continue starts with it, as transformers' tokenizer(text)
    gives, once even when the text (a rendered chat template) already starts with it;
    `encode` stays the bare text's ids, and gptkit's own tokenizers add nothing."""
    from gptkit import GPT, GPTConfig
    from gptkit.generate import generate, stream_generate

    assert trained.encode_prompt("hello world") == trained.encode("hello world")
    trained.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    bos = trained.eos_token_id  # <|endoftext|> plays the bos of this test
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": EOT, "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {EOT: {"id": EOT, "ids": [bos], "tokens": [EOT]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    text = "the quick brown fox"
    assert tokenizer.encode_prompt(text) == [bos, *tokenizer.encode(text)]
    assert tokenizer.encode_prompt(text) == AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    assert tokenizer.encode_prompt(EOT + text) == tokenizer.encode(EOT + text) == [
        bos, *tokenizer.encode(text)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2,
                          n_embd=32)).eval()
    ids = torch.tensor([tokenizer.encode_prompt(text)])
    expected = generate(model, ids, max_new_tokens=6, do_sample=False, eos_token_id=[])
    streamed = "".join(stream_generate(model, tokenizer, text, max_new_tokens=6, do_sample=False,
                                       eos_token_id=[]))
    assert streamed == tokenizer.decode(expected[0, ids.size(1):].tolist())
