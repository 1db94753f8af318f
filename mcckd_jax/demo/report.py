"""The demo's table: held-out accuracy before training, with MCC-KD and with alpha = 0, per seed
and as mean ± sample standard deviation over seeds, plus the paired difference of the two arms.

    python -m mcckd_jax.demo.report runs/demo

reads <demo>/seed_<S>/<arm>/eval/step_<N>/metrics.json as `launch/demo.sh` leaves them (step 0
of the MCC-KD arm is the untrained student of that seed) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
from collections.abc import Sequence

import yaml

ARMS = (("mcckd", "MCC-KD"), ("alpha0", "alpha = 0 (plain multi-CoT)"))


def _metrics(run: pathlib.Path, step: int, dataset: str) -> dict:
    path = run / "eval" / f"step_{step}" / "metrics.json"
    return json.loads(path.read_text())["datasets"][dataset]


def last_step(run: pathlib.Path) -> int:
    """The newest evaluated step of a run (step 0, the untrained student, does not count)."""
    steps = [int(p.name.split("_")[1]) for p in (run / "eval").glob("step_*")]
    steps = [step for step in steps if step > 0]
    if not steps:
        raise FileNotFoundError(f"{run / 'eval'}: no evaluated checkpoint")
    return max(steps)


def _alpha(run: pathlib.Path) -> float | None:
    """objective.alpha of a run, from the config.yaml mcckd-train saved (None without one)."""
    path = run / "config.yaml"
    if not path.exists():
        return None
    return float(yaml.safe_load(path.read_text())["objective"]["alpha"])


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the spread of one value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_dirs(demo_dir: pathlib.Path) -> list[pathlib.Path]:
    dirs = sorted(demo_dir.glob("seed_*"), key=lambda p: int(p.name.split("_")[1]))
    if not dirs:
        raise FileNotFoundError(f"{demo_dir}: no seed_<S> folders (run launch/demo.sh)")
    return dirs


def table(demo_dir: pathlib.Path, dataset: str = "test") -> list[str]:
    """The lines of the table (accuracies in percent)."""
    seeds = seed_dirs(demo_dir)
    rows: dict[str, list[float]] = {"before training (step 0)": [
        100 * _metrics(seed / "mcckd", 0, dataset)["accuracy"] for seed in seeds]}
    steps = set()
    for arm, label in ARMS:
        values = []
        for seed in seeds:
            step = last_step(seed / arm)
            steps.add(step)
            values.append(100 * _metrics(seed / arm, step, dataset)["accuracy"])
        rows[label] = values
    questions = _metrics(seeds[0] / "mcckd", 0, dataset)["questions"]
    names = [f"seed {seed.name.split('_')[1]}" for seed in seeds]
    alpha = _alpha(seeds[0] / "mcckd")
    if alpha is not None:
        rows = {(f"MCC-KD (alpha = {alpha:g})" if label == ARMS[0][1] else label): values
                for label, values in rows.items()}
    lines = [f"Held-out {dataset} accuracy ({questions} questions, greedy decoding, step "
             f"{'/'.join(map(str, sorted(steps)))}), {len(seeds)} seeds:",
             f"  {'':<30}" + "".join(f"{name:>9}" for name in names) + f"{'mean ± sd':>17}"]
    for label, values in rows.items():
        mean, spread = mean_and_spread(values)
        lines.append(f"  {label:<30}" + "".join(f"{v:8.1f}%" for v in values)
                     + f"{mean:9.1f} ± {spread:4.1f}%")
    mcckd_values, alpha0_values = list(rows.values())[1:3]
    difference = [a - b for a, b in zip(mcckd_values, alpha0_values)]
    mean, spread = mean_and_spread(difference)
    lines.append(f"  {'MCC-KD minus alpha = 0':<30}" + "".join(f"{v:+8.1f} " for v in difference)
                 + f"{mean:+9.1f} ± {spread:4.1f} points")
    lines.append("  " + verdict(difference))
    return lines


def verdict(difference: Sequence[float]) -> str:
    """What the paired differences (MCC-KD minus alpha = 0, in points) allow one to say."""
    mean, spread = mean_and_spread(difference)
    if len(difference) < 2:
        return "One seed: no spread, so no conclusion about the difference."
    if min(difference) <= 0 <= max(difference) or abs(mean) <= spread:
        return ("The difference is within the seed spread: these seeds do not show that "
                "MCC-KD beats alpha = 0 (or the reverse) on this task.")
    better = "MCC-KD" if mean > 0 else "alpha = 0"
    stderr = spread / math.sqrt(len(difference))
    return (f"{better} is ahead on every seed ({mean:+.1f} points, standard error "
            f"{stderr:.1f}).")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcckd_jax.demo.report",
                                     description="Print the demo's accuracy table.")
    parser.add_argument("demo_dir", type=pathlib.Path)
    parser.add_argument("--dataset", default="test")
    args = parser.parse_args(argv)
    try:
        print("\n".join(table(args.demo_dir, args.dataset)))
    except (OSError, KeyError, ValueError) as error:
        print(f"demo report: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
