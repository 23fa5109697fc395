"""Shared fixtures: real data from ../shared/data, small prepared datasets, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shared_data) -> Path:
    """A prepared char-level data directory: the first 200 kB of tiny Shakespeare."""
    from gptkit.data import prepare
    from gptkit.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("char")
    text = (shared_data / "shakespeare" / "input.txt").read_text()[:200_000]
    (root / "input.txt").write_text(text)
    Tokenizer.train([root / "input.txt"], kind="char").save_pretrained(root / "tok")
    prepare([root / "input.txt"], root / "tok", root / "data", progress=False)
    return root / "data"
