"""The demo's table from hand-written evaluation results: per-seed accuracies, mean ± sample
standard deviation (checked against hand-worked numbers), the paired difference, and what it
allows one to conclude."""

import json

import pytest

from mcckd_jax.demo import report


def write_eval(run, step, accuracy, questions=300):
    folder = run / "eval" / f"step_{step}"
    folder.mkdir(parents=True)
    folder.joinpath("metrics.json").write_text(json.dumps({"step": step, "datasets": {"test": {
        "accuracy": accuracy, "questions": questions, "role": "test"}}}))


def demo_dir(tmp_path, mcckd, alpha0, before=(0.013, 0.01, 0.02)):
    for seed, (a, b, c) in enumerate(zip(mcckd, alpha0, before)):
        write_eval(tmp_path / f"seed_{seed}" / "mcckd", 0, c)
        write_eval(tmp_path / f"seed_{seed}" / "mcckd", 300, a / 2)
        write_eval(tmp_path / f"seed_{seed}" / "mcckd", 600, a)
        write_eval(tmp_path / f"seed_{seed}" / "alpha0", 600, b)
    return tmp_path


def test_the_table_gives_every_seed_and_the_mean_and_sample_spread(tmp_path):
    lines = report.table(demo_dir(tmp_path, [0.48, 0.50, 0.52], [0.46, 0.44, 0.45]))
    assert lines[0].startswith("Held-out test accuracy (300 questions, greedy decoding, step "
                               "600), 3 seeds:")
    [mcckd] = [line for line in lines if line[2:32].strip() == "MCC-KD"]
    # 48, 50, 52: mean 50, sample sd sqrt(((-2)^2 + 0 + 2^2) / 2) = 2.
    assert mcckd.split()[-4:] == ["52.0%", "50.0", "±", "2.0%"]
    [difference] = [line for line in lines if "minus" in line]
    # 2, 6, 7: mean 5, sd sqrt((9 + 1 + 4) / 2) = 2.65
    assert difference.split()[-5:] == ["+7.0", "+5.0", "±", "2.6", "points"]
    assert lines[-1].strip() == "MCC-KD is ahead on every seed (+5.0 points, standard error 1.5)."


def test_seeds_that_disagree_on_the_sign_are_called_within_the_spread():
    assert report.verdict([3.0, -1.0, 0.5]).startswith("The difference is within the seed spread")
    assert report.verdict([2.0]).startswith("One seed")


def test_a_missing_evaluation_is_an_error(tmp_path):
    root = demo_dir(tmp_path, [0.5], [0.4], before=[0.01])
    (root / "seed_0" / "alpha0" / "eval" / "step_600" / "metrics.json").unlink()
    (root / "seed_0" / "alpha0" / "eval" / "step_600").rmdir()
    with pytest.raises(FileNotFoundError, match="no evaluated checkpoint"):
        report.table(root)
