"""Evaluation results on disk, all written atomically by process 0.

    <output_dir>/step_<N>/<dataset>/predictions.jsonl  one line per question
    <output_dir>/step_<N>/metrics.json                 every dataset's summary
    <output_dir>/metrics.jsonl                         one line per (step, dataset), all steps
    <output_dir>/best.json                             the step with the best dev accuracy
    <run_dir>/tensorboard/eval/                        eval/<dataset>/accuracy per step

Checkpoints are chosen on dev datasets only: best.json reports the test accuracies of the
step the dev sets chose, never a step chosen by a test set.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mcckd_jax.eval.scoring import Prediction
from mcckd_jax.files import write_atomically


def read_summaries(output_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The lines of <output_dir>/metrics.jsonl (empty when there is none yet)."""
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def evaluated_steps(output_dir: str | pathlib.Path) -> set[int]:
    return {int(row["step"]) for row in read_summaries(output_dir)}


def best_step(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The step with the highest mean accuracy over the dev datasets (ties: the later step,
    as the trainer's best-checkpoint policy decides), with the test accuracies of that step;
    None without dev results."""
    by_step: dict[int, dict[str, Mapping[str, Any]]] = {}
    for row in summaries:
        by_step.setdefault(int(row["step"]), {})[row["dataset"]] = row
    scored = []
    for step, rows in sorted(by_step.items()):
        dev = [row["accuracy"] for row in rows.values() if row["role"] == "dev"]
        if dev:
            scored.append((sum(dev) / len(dev), step, rows))
    if not scored:
        return None
    dev_accuracy, step, rows = max(scored, key=lambda item: item[:2])
    return {"step": step, "dev_accuracy": dev_accuracy,
            "dev": {name: row["accuracy"] for name, row in rows.items() if row["role"] == "dev"},
            "test": {name: row["accuracy"] for name, row in rows.items() if row["role"] == "test"}}


def write_step(output_dir: str | pathlib.Path, step: int,
               results: Mapping[str, tuple[Sequence[Prediction], Mapping[str, Any]]],
               settings: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one evaluated step (every dataset), updates metrics.jsonl and best.json;
    returns the step's metrics.json content."""
    output_dir = pathlib.Path(output_dir)
    folder = output_dir / f"step_{step}"
    for name, (predictions, _) in results.items():
        write_atomically(folder / name / "predictions.jsonl",
                         "".join(json.dumps(p.to_json()) + "\n" for p in predictions))
    metrics = {"step": step, "settings": dict(settings),
               "datasets": {name: dict(summary) for name, (_, summary) in results.items()}}
    write_atomically(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    summaries = [row for row in read_summaries(output_dir) if int(row["step"]) != step]
    summaries += [{"step": step, "dataset": name, **{k: summary[k] for k in (
        "role", "accuracy", "missing_rate", "questions", "correct", "missing")}}
        for name, (_, summary) in results.items()]
    summaries.sort(key=lambda row: (int(row["step"]), row["dataset"]))
    write_atomically(output_dir / "metrics.jsonl",
                     "".join(json.dumps(row) + "\n" for row in summaries))
    best = best_step(summaries)
    if best is not None:
        write_atomically(output_dir / "best.json", json.dumps(best, indent=2) + "\n")
    return metrics


def write_tensorboard(run_dir: str | pathlib.Path, step: int,
                      summaries: Mapping[str, Mapping[str, Any]]) -> None:
    """eval/<dataset>/accuracy and missing_rate at `step`, beside the training scalars."""
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

    with SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard" / "eval")) as writer:
        for name, summary in summaries.items():
            writer.add_scalar(f"eval/{name}/accuracy", summary["accuracy"], step)
            writer.add_scalar(f"eval/{name}/missing_rate", summary["missing_rate"], step)
