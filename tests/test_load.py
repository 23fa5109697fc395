"""A shorter run of benchmarks/bench_load.py: random valid and hostile requests at once."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from serve_helpers import live_server, make_model_dir, offline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_load import PROMPTS, rss_mb, run_load  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("load") / "tiny")


def test_mixed_load_gets_no_5xx_and_correct_answers(model_dir):
    expected = {p: offline(model_dir, p, 12) for p in PROMPTS}
    with live_server(model_dir, max_batch_size=8, max_queue=128) as url:
        asyncio.run(run_load(url, "tiny", expected, 40, 16, seed=1))  # warm up
        before = rss_mb(os.getpid())
        counts, _ = asyncio.run(run_load(url, "tiny", expected, 300, 16))
        after = rss_mb(os.getpid())
    assert not [k for k in counts if isinstance(k, int) and k >= 500], counts
    assert counts["wrong text"] == 0, counts
    assert counts[200] > 100 and sum(v for k, v in counts.items() if k in (400, 404, 413, 422)) > 50
    assert counts["abandoned"] > 0  # clients that leave mid-stream are part of the mix
    assert after - before < 200, f"memory grew from {before:.0f} to {after:.0f} MB"
