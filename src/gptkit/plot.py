"""Loss curves of training runs as a PNG, from their `metrics.jsonl`.

    gptkit plot runs/a runs/b --out compare.png      # several runs overlaid
    plot_runs([run_dir], run_dir / "loss.png")       # what `LivePlot` redraws at each eval

Panels: train and val loss against tokens seen (the fair x-axis when runs differ in
batch size), benchmark scores where the run logged them (`--eval-benchmark`), learning
rate, and tokens/s. Matplotlib is imported lazily and drawn
through its non-interactive Agg canvas without pyplot, so plotting works on servers
and from a training loop without global figure state. Reading is forgiving: a line
still being written, or an empty file at the start of a run, gives a partial plot
rather than an error, so a training loop can redraw at every eval.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError
from gptkit.runlog import METRICS_NAME, read_metrics, run_or_model_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 80  # small files (tens of kB), quick to draw
PLOT_NAME = "loss.png"
MARKERS = "osD^vP"  # one per benchmark on the scores panel


def split_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a run, each with a token count to plot against."""
    train, evals = [], []
    for record in read_metrics(run_dir / METRICS_NAME):
        if not isinstance(record.get("tokens"), (int, float)):
            continue
        if "val_loss" in record:
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    return train, evals


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise GptkitError("Plots need matplotlib, a gptkit dependency missing here; install it "
                          "with `pip install matplotlib`.") from None

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out: Path) -> Path:
    """Write a PNG atomically, so a viewer never opens a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    figure.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, out)
    return out


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs,
                                                                            strict=True)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [x for x, _ in points], [y for _, y in points]


def benchmark_keys(records: list[dict[str, Any]]) -> dict[str, str]:
    """The metrics.jsonl key drawn for each benchmark the records hold: `benchmark/core`,
    else a set's acc_norm where it has one (what lm-eval reports), else its acc."""
    chosen: dict[str, str] = {}
    for key in sorted({k for record in records for k in record if k.startswith("benchmark/")}):
        _, name, *metric = key.split("/")
        if not metric or metric[0] == "acc_norm" or (metric[0] == "acc" and name not in chosen):
            chosen[name] = key
    return chosen


def plot_runs(run_dirs: list[Path], out: Path, log_x: bool = False) -> Path:
    """Draw loss, benchmark scores (where logged), learning rate and tokens/s of `run_dirs`
    against tokens into `out` (PNG).

    Raises GptkitError only for a path that is not a run directory (no metrics.jsonl);
    empty or partly written metrics give a partial plot.
    """
    run_dirs, out = [run_or_model_dir(Path(d)) for d in run_dirs], Path(out)
    if not run_dirs:
        raise GptkitError("gptkit plot needs at least one run directory.")
    for d in run_dirs:
        if not (d / METRICS_NAME).is_file():
            raise GptkitError(f"{d} is not a training run directory: it has no {METRICS_NAME}.")
    runs = [(d, label, *split_metrics(d)) for d, label in zip(run_dirs, run_labels(run_dirs),
                                                               strict=True)]
    scored = any(benchmark_keys(evals) for *_, evals in runs)
    figure = new_figure(9, 8 if scored else 6)
    # fixed margins: a layout engine would draw the figure twice per save
    grid = figure.add_gridspec(3 if scored else 2, 2,
                               height_ratios=(3, 2, 2) if scored else (3, 2), left=0.09,
                               right=0.98, top=0.95, bottom=0.07 if scored else 0.09,
                               hspace=0.35, wspace=0.25)
    loss_ax = figure.add_subplot(grid[0, :])
    bench_ax = figure.add_subplot(grid[1, :], sharex=loss_ax) if scored else None
    lr_ax = figure.add_subplot(grid[-1, 0], sharex=loss_ax)
    speed_ax = figure.add_subplot(grid[-1, 1], sharex=loss_ax)
    anything = False
    for index, (_, label, train, evals) in enumerate(runs):
        color = f"C{index % 10}"
        anything = anything or bool(train or evals)
        loss_ax.plot(*_series(train, "loss"), color=color, alpha=0.8, label=f"{label} train")
        loss_ax.plot(*_series(evals, "val_loss"), color=color, linestyle="--", marker="o",
                     markersize=3, label=f"{label} val")
        lr_ax.plot(*_series(train, "lr"), color=color)
        speed_ax.plot(*_series(train, "tokens_per_s"), color=color)
        if bench_ax is not None:
            for number, key in enumerate(benchmark_keys(evals).values()):
                bench_ax.plot(*_series(evals, key), color=color, marker=MARKERS[number % 6],
                              markersize=4,
                              label=f"{label} {key.removeprefix('benchmark/').replace('/', ' ')}")
    if not anything:
        loss_ax.text(0.5, 0.5, "no metrics yet", transform=loss_ax.transAxes, ha="center",
                     va="center", color="gray")
    loss_ax.set(ylabel="loss", title="loss vs tokens seen")
    loss_ax.legend(fontsize="small", loc="upper right")
    lr_ax.set(xlabel="tokens", ylabel="learning rate")
    speed_ax.set(xlabel="tokens", ylabel="tokens / s")
    if bench_ax is not None:
        bench_ax.set(ylabel="score", title="benchmarks (CORE, or acc_norm / acc)")
        bench_ax.legend(fontsize="small", loc="best")
    for ax in (loss_ax, bench_ax, lr_ax, speed_ax):
        if ax is not None:
            ax.grid(alpha=0.3)
    if log_x and anything:
        loss_ax.set_xscale("log", nonpositive="mask")  # the step-0 eval sits at 0 tokens
    return save_figure(figure, out)


class LivePlot:
    """A training-run sink that redraws run_dir/loss.png at every evaluation, so a user can
    watch the run; a plotting problem never stops training."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.enabled = True

    def log(self, step: int, scalars: dict[str, float], is_eval: bool) -> None:
        if not (is_eval and self.enabled):
            return
        try:
            plot_runs([self.run_dir], self.run_dir / PLOT_NAME)
        except Exception as exc:  # matplotlib missing or failing: keep training
            warnings.warn(f"could not draw {PLOT_NAME}: {exc}", stacklevel=2)
            self.enabled = False

    def close(self) -> None:
        pass
