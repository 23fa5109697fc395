"""Shared fixtures: the repository's data/ folder, small prepared datasets, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def repo_data() -> Path:
    """The small real data vendored in the repository (see data/README.md)."""
    return REPO_DATA


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, repo_data) -> Path:
    """A prepared char-level data directory: the first 200 kB of tiny Shakespeare."""
    from gptkit.data import prepare
    from gptkit.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("char")
    text = (repo_data / "shakespeare" / "input.txt").read_text()[:200_000]
    (root / "input.txt").write_text(text)
    Tokenizer.train([root / "input.txt"], kind="char").save_pretrained(root / "tok")
    prepare([root / "input.txt"], root / "tok", root / "data", progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread's hand-offs cost more than it computes (and far more on
    a machine shared with other jobs). Modules opt in with `usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
