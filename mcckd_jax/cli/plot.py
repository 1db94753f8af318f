"""mcckd-plot RUN_DIR [RUN_DIR...] [--out PNG]: training curves and eval accuracy in one PNG.

    mcckd-plot runs/demo/mcckd                          # writes runs/demo/mcckd/metrics.png
    mcckd-plot runs/demo/mcckd runs/demo/alpha0         # both runs overlaid

Reads RUN_DIR/metrics.jsonl (one JSON object per logged step, written by
`mcckd_jax.train.metrics`: `step`, `loss`, `ce`, `kl`, ...) and, when present,
RUN_DIR/eval/metrics.jsonl (mcckd-eval: `step`, `dataset`, `accuracy` per evaluated checkpoint)
and RUN_DIR/dev_eval/metrics.jsonl (the same, measured during training). Draws the loss, one
panel per loss term that `mcckd_jax.losses.TERMS` gives a panel (cross-entropy, consistency
KL), and accuracy per checkpoint, one line per eval data set; two panels a row. A bad line ends
the run with one line on stderr naming the file, the line and the field, exit status 2, and no
PNG written.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import numbers
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mcckd_jax.files import write_atomically
from mcckd_jax.losses import TERMS


def _loss_formula() -> str:
    """The loss as its terms' symbols and weights, e.g. "CE + alpha * KL"."""
    return " + ".join(term.symbol if term.weight == 1 else f"{term.weight} * {term.symbol}"
                      for term in TERMS if term.weight is not None)


# (metrics.jsonl field, panel title, y-axis label); the losses are natural-log units (nats).
TRAIN_PANELS = (("loss", "loss", f"{_loss_formula()} (nats)"),
                *((term.name, *term.panel) for term in TERMS if term.panel))
PANEL_INCHES = (5.0, 3.75)  # one of the two panels of a row
DPI = 100  # with PANEL_INCHES and two rows: a 1000 x 750 PNG

Curve = tuple[list[int], list[float]]  # steps, values


class MetricsError(ValueError):
    """A bad metrics line; `str(error)` is one line: file, line, field and what was expected."""

    def __init__(self, path: os.PathLike | str, line: int | None, field: str | None,
                 message: str):
        where = [str(path)] + ([f"line {line}"] if line is not None else []) + (
            [f"field '{field}'"] if field is not None else [])
        super().__init__(f"{', '.join(where)}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_jsonl(path: pathlib.Path, required: Mapping[str, str],
               numeric: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line, checked field by field.

    Args:
      required: field -> "step" (a non-negative integer), "number" or "string"; must be present.
      numeric: fields that must be numbers when present (NaN and infinity are allowed: a
        diverged step is worth seeing).
    """
    if not path.is_file():
        raise MetricsError(path, None, None, "no such file")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetricsError(path, number, None, f"malformed JSON at column "
                                   f"{error.colno}: {error.msg}") from None
            if not isinstance(row, dict):
                raise MetricsError(path, number, None,
                                   f"expected a JSON object, got {type(row).__name__}")
            for field, kind in required.items():
                if field not in row:
                    raise MetricsError(path, number, field, "missing")
                _check(path, number, field, row[field], kind)
            for field in numeric:
                if field in row:
                    _check(path, number, field, row[field], "number")
            rows.append((number, row))
    if not rows:
        raise MetricsError(path, None, None, "no records")
    return rows


def _check(path, line: int, field: str, value: Any, kind: str) -> None:
    if kind == "step":
        ok, expected = isinstance(value, int) and not isinstance(value, bool) and value >= 0, \
            "a non-negative integer"
    elif kind == "number":
        ok, expected = _is_number(value), "a number"
    else:
        ok, expected = isinstance(value, str) and bool(value), "a non-empty string"
    if not ok:
        raise MetricsError(path, line, field, f"expected {expected}, got {value!r}")


def _curve(points: Mapping[int, float]) -> Curve:
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def train_curves(path: pathlib.Path) -> dict[str, Curve]:
    """Per panel metric, its values by step. A resumed run logs some steps twice; the later
    record wins, as it belongs to the run that continued."""
    fields = [field for field, _, _ in TRAIN_PANELS]
    points: dict[str, dict[int, float]] = {field: {} for field in fields}
    for _, row in read_jsonl(path, {"step": "step"}, fields):
        for field in fields:
            if field in row:
                points[field][row["step"]] = float(row[field])
    return {field: _curve(values) for field, values in points.items()}


def eval_curves(path: pathlib.Path) -> dict[str, Curve]:
    """Accuracy by checkpoint step, per eval data set (the later record wins on repeats)."""
    points: dict[str, dict[int, float]] = {}
    for _, row in read_jsonl(path, {"step": "step", "dataset": "string", "accuracy": "number"},
                             ()):
        points.setdefault(row["dataset"], {})[row["step"]] = float(row["accuracy"])
    return {dataset: _curve(values) for dataset, values in sorted(points.items())}


def _draw_train(axes, title: str, ylabel: str, curves: Mapping[str, Curve]) -> None:
    """One line per run (labelled when there are several)."""
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    drawn = {label: curve for label, curve in curves.items() if curve[0]}
    if not drawn:
        axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        return
    finite = []
    for label, (steps, values) in drawn.items():
        axes.plot(steps, values, linewidth=1.2, label=label)
        finite += [v for v in values if math.isfinite(v)]
    # Losses fall over orders of magnitude; a log axis keeps the late progress visible.
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()


def _draw_eval(axes, curves: Mapping[str, Curve]) -> None:
    axes.set_title("eval accuracy")
    axes.set_xlabel("step")
    axes.set_ylabel("accuracy (greedy, share of questions)")
    if not curves:
        axes.text(0.5, 0.5, "no eval metrics", ha="center", va="center",
                  transform=axes.transAxes)
        return
    for dataset, (steps, values) in curves.items():
        axes.plot(steps, values, marker="o", linewidth=1.2, label=dataset)
    top = max(v for _, values in curves.values() for v in values)
    axes.set_ylim(0, 1.0 if top <= 1.0 else 100.0)  # fractions, or percentages
    axes.grid(alpha=0.3)
    axes.legend()


def figure(train: Mapping[str, Mapping[str, Curve]], evals: Mapping[str, Curve], title: str):
    """The matplotlib Figure: TRAIN_PANELS, then eval accuracy.

    Args:
      train: run label -> metric -> curve.
      evals: line label -> accuracy curve.
    """
    from matplotlib.figure import Figure  # Slow import; a Figure needs no pyplot state.

    rows = -(-(len(TRAIN_PANELS) + 1) // 2)
    drawing = Figure(figsize=(2 * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI,
                     layout="constrained")
    grid = drawing.subplots(rows, 2, squeeze=False).ravel()
    for axes, (field, panel, ylabel) in zip(grid, TRAIN_PANELS):
        _draw_train(axes, panel, ylabel, {run: curves[field] for run, curves in train.items()})
    _draw_eval(grid[len(TRAIN_PANELS)], evals)
    for axes in grid[len(TRAIN_PANELS) + 1:]:
        axes.remove()
    drawing.suptitle(title)
    return drawing


def plot(train: Mapping[str, Mapping[str, Curve]], evals: Mapping[str, Curve],
         out: pathlib.Path, title: str) -> None:
    """Writes the PNG (`figure`) to `out` through a temporary file and a rename."""
    png = io.BytesIO()
    figure(train, evals, title).savefig(png, format="png", dpi=DPI)
    write_atomically(out, png.getvalue())


def run_curves(run_dir: pathlib.Path, label: str = "") -> tuple[dict[str, Curve],
                                                                 dict[str, Curve]]:
    """(training curves, eval accuracy curves) of one run; eval lines are named
    "<label>: <dataset>" when a label is given."""
    train = train_curves(run_dir / "metrics.jsonl")
    evals = {}
    # mcckd-eval's results, and the dev accuracy measured during training (dev_eval).
    for folder, kind in (("eval", ""), ("dev_eval", " (during training)")):
        path = run_dir / folder / "metrics.jsonl"
        if path.exists():
            evals.update({f"{label}: {name}{kind}" if label else f"{name}{kind}": curve
                          for name, curve in eval_curves(path).items()})
    return train, evals


def run_labels(run_dirs: Sequence[pathlib.Path]) -> list[str]:
    """The shortest path endings that tell the runs apart: "mcckd", "alpha0"; or
    "seed_0/mcckd", "seed_1/mcckd" when the last parts repeat."""
    parts = [run.resolve().parts for run in run_dirs]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run) for run in run_dirs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcckd-plot", description="Plot runs' loss, CE, KL "
                                     "and eval accuracy into one PNG (several runs overlay).")
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir",
                        help="folder with metrics.jsonl (and eval/metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: metrics.png in the first run_dir)")
    args = parser.parse_args(argv)
    run_dirs = [pathlib.Path(run) for run in args.run_dirs]
    out = pathlib.Path(args.out) if args.out else run_dirs[0] / "metrics.png"
    several = len(run_dirs) > 1
    labels = run_labels(run_dirs) if several else [str(run_dirs[0])]
    try:
        train, evals = {}, {}
        for run_dir, label in zip(run_dirs, labels):
            train[label], run_evals = run_curves(run_dir, label if several else "")
            evals.update(run_evals)
        plot(train, evals, out, title=" vs ".join(labels))
    except (MetricsError, OSError) as error:
        print(f"mcckd-plot: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
