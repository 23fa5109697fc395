"""Property-based tests: the tokenizer on arbitrary Unicode, the JSONL readers on arbitrary bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptkit import GptkitError, Tokenizer
from gptkit.data import prepare


@pytest.fixture(scope="module")
def gpt2(repo_data) -> Tokenizer:
    return Tokenizer.from_pretrained(repo_data / "gpt2-tokenizer")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))  # all of Unicode, unpaired surrogates included
def test_any_unicode_round_trips_or_is_refused_clearly(gpt2, text):
    """The rule: text that UTF-8 can hold round-trips exactly; an unpaired surrogate (which
    no UTF-8 file can contain) is refused with one sentence naming its position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        with pytest.raises(GptkitError, match=f"unpaired surrogate .* at position {exc.start}"):
            gpt2.encode(text)
        return
    assert gpt2.decode(gpt2.encode(text)) == text


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE: `prepare` reads and writes it once per example, and the
    reader under test does not depend on the vocabulary's size."""
    directory = tmp_path_factory.mktemp("tok")
    Tokenizer.train(texts=["a small corpus of plain words, and some more words"] * 20,
                    vocab_size=300).save_pretrained(directory)
    return directory


JSONISH = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b'{"text": "a"}', b'{"text": 1}', b"[]", b"{", b'"s"', b"\xff\xfe",
                              b'{"other": "x"}', b"", b"null", b'{"text": "\\ud800"}']),
             max_size=6).map(b"\n".join),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=JSONISH)
def test_jsonl_reader_never_crashes_on_arbitrary_bytes(tokenizer_dir, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        path.write_bytes(content)
        try:
            meta = prepare([path], tokenizer_dir, Path(tmp) / "out", progress=False)
        except GptkitError as exc:
            assert "\n" not in str(exc)
            return
        assert meta["documents"] >= 1
