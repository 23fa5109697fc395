"""Training on several prepared directories in fixed proportions, reproducibly and resumably."""

import subprocess
import sys
from pathlib import Path

import pytest
from resume_helpers import straight_and_resumed

from gptkit.corpus import prepare_shards
from gptkit.errors import GptkitError
from gptkit.mixture import MixtureBatches, parse_mixture
from gptkit.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SHAKESPEARE = (DATA / "shakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000]
MOBY = (DATA / "prose" / "moby_dick.txt").read_text(encoding="utf-8")[:60_000]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mix")
    Tokenizer.train(texts=[SHAKESPEARE[:30_000]], vocab_size=400).save_pretrained(root / "tok")
    for name, text in (("plays", SHAKESPEARE), ("novel", MOBY)):
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        prepare_shards([root / f"{name}.txt"], root / "tok", root / name, shard_tokens=5000,
                       val_fraction=0, workers=1, progress=False)
    return f"plays={root / 'plays'}:0.7,novel={root / 'novel'}:0.3"


def test_proportions_hold_and_resume_is_exact(sources: str) -> None:
    mixture = MixtureBatches(parse_mixture(sources), 16, 4, seed=1)
    for step in range(1, 101):
        mixture.next_batch()
        assert abs(mixture.taken[0] - 0.7 * step) <= 1 and abs(mixture.taken[1] - 0.3 * step) <= 1
    assert mixture.state_dict()["tokens_by_source"] == {"tokens_plays": 70 * 64,
                                                        "tokens_novel": 30 * 64}
    resumed = MixtureBatches(parse_mixture(sources), 16, 4, seed=99)
    resumed.load_state_dict(mixture.state_dict())
    for _ in range(10):
        assert resumed.next_batch()[0].equal(mixture.next_batch()[0])
    again = MixtureBatches(parse_mixture(sources), 16, 4, seed=1)
    first = MixtureBatches(parse_mixture(sources), 16, 4, seed=1)
    assert all(again.next_batch()[0].equal(first.next_batch()[0]) for _ in range(5))


def test_train_logs_tokens_per_source_and_resumes_exactly(sources: str, tmp_path: Path) -> None:
    straight, resumed = straight_and_resumed(
        tmp_path, 5, data=sources, preset="tiny", n_layer=1, n_head=2, n_embd=32, block_size=32,
        batch_size=4, eval_interval=0, log_interval=1, device="cpu")
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert (straight[-1]["tokens_plays"], straight[-1]["tokens_novel"]) == (4 * 128, 1 * 128)


def test_cli_takes_repeated_data_and_refuses_a_bad_entry(sources: str, tmp_path: Path) -> None:
    args = [f"--data={entry}" for entry in sources.split(",")]
    run = subprocess.run([sys.executable, "-m", "gptkit", "train", *args, "--out",
                          str(tmp_path / "run"), "--preset", "tiny", "--n-layer", "1",
                          "--n-head", "2", "--n-embd", "32", "--block-size", "16",
                          "--batch-size", "2", "--max-steps", "2", "--eval-interval", "0",
                          "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with pytest.raises(GptkitError, match=r"--data web=x is not NAME=DIR:WEIGHT"):
        parse_mixture("web=x")
    with pytest.raises(GptkitError, match="names a source twice"):
        parse_mixture("a=x:1,a=y:1")
