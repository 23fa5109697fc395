"""`gptkit plot` and `plot_runs`: real PNGs from metrics.jsonl, tolerant of runs in progress."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gptkit.errors import GptkitError
from gptkit.plot import benchmark_keys, plot_runs, split_metrics

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


def write_run(run_dir: Path, steps: int = 20, scale: float = 1.0, partial: bool = False) -> Path:
    """A metrics.jsonl as training writes it: train lines, eval lines every 5 steps."""
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "tokens": 0, "val_loss": 4.2 * scale, "val_perplexity": 66.7}]
    for step in range(1, steps + 1):
        tokens = step * 768
        lines.append({"step": step, "tokens": tokens, "loss": scale * 4.0 / step ** 0.3,
                      "lr": 1e-3 * min(1.0, step / 5), "tokens_per_s": 5000.0 + step})
        if step % 5 == 0:
            lines.append({"step": step, "tokens": tokens, "val_loss": scale * 4.1 / step ** 0.3})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial:
        text += '{"step": 21, "tokens": 161'  # the line a running trainer is writing
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def has_colour(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(image.astype(int) - rgb).sum(-1) < 30).sum() > 50)


def test_read_metrics_skips_a_partial_line(tmp_path):
    train, evals = split_metrics(write_run(tmp_path / "run", partial=True))
    assert len(train) == 20 and len(evals) == 5
    assert evals[0]["val_loss"] == pytest.approx(4.2)


def test_plot_of_two_runs_overlays_both_in_their_colours(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", scale=1.3, partial=True)
    out = plot_runs([a, b], tmp_path / "cmp.png")
    image = pixels(out)
    assert image.shape == (480, 720, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank
    assert has_colour(image, C0) and has_colour(image, C1)
    single = pixels(plot_runs([a], tmp_path / "one.png"))
    assert has_colour(single, C0) and not has_colour(single, C1)


def test_log_x_changes_the_plot(tmp_path):
    run = write_run(tmp_path / "run")
    linear = pixels(plot_runs([run], tmp_path / "lin.png"))
    log = pixels(plot_runs([run], tmp_path / "log.png", log_x=True))
    assert linear.shape == log.shape and (linear != log).any()


def test_empty_metrics_plot_without_error_and_redraw_is_cheap(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert plot_runs([run], run / "loss.png").stat().st_size > 1000
    write_run(tmp_path / "full", steps=200)
    plot_runs([tmp_path / "full"], tmp_path / "warm.png")
    start = time.process_time()  # CPU time: other processes on the machine do not count
    plot_runs([tmp_path / "full"], tmp_path / "full" / "loss.png")
    assert time.process_time() - start < 1.0
    assert not list(tmp_path.glob("full/.*.tmp"))  # written atomically, nothing left behind


def test_not_a_run_directory(tmp_path):
    with pytest.raises(GptkitError, match="not a training run directory"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_cli_plot(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", scale=0.8)
    out = tmp_path / "plots" / "runs.png"
    result = subprocess.run([sys.executable, "-m", "gptkit", "plot", str(a), str(b), "--out",
                             str(out), "--log-x"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and pixels(out).shape == (480, 720, 3)
    bad = subprocess.run([sys.executable, "-m", "gptkit", "plot", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_a_demo_folder_plots_the_run_inside_it(tmp_path):
    # `gptkit demo --out runs/demo` keeps its run in runs/demo/model beside corpus/ and data/
    write_run(tmp_path / "demo" / "model")
    (tmp_path / "demo" / "corpus").mkdir()
    out = plot_runs([tmp_path / "demo"], tmp_path / "demo.png")
    assert has_colour(pixels(out), C0)


def test_benchmark_scores_get_their_own_panel(tmp_path):
    run = write_run(tmp_path / "run")
    plain = pixels(plot_runs([run], tmp_path / "plain.png"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    scored = []
    for line in lines:
        record = json.loads(line)
        if "val_loss" in record:  # what --eval-benchmark hellaswag,core adds to an eval
            record |= {"benchmark/hellaswag/acc": 0.25 + record["step"] / 400,
                       "benchmark/hellaswag/acc_norm": 0.26 + record["step"] / 300,
                       "benchmark/hellaswag/acc_norm_stderr": 0.01,
                       "benchmark/core": record["step"] / 1000}
        scored.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(scored) + "\n")
    assert benchmark_keys(split_metrics(run)[1]) == {"core": "benchmark/core",
                                                     "hellaswag": "benchmark/hellaswag/acc_norm"}
    image = pixels(plot_runs([run], tmp_path / "scored.png"))
    assert plain.shape == (480, 720, 3) and image.shape == (640, 720, 3)  # a third row
    band = image[250:400]  # the scores panel, between the loss and the lr/speed panels
    assert has_colour(band, C0)
