"""The demo's training, at reduced size, twice: every logged metric of every step is identical
(bit for bit), with the two runs side by side as `launch/demo.sh` runs its arms, so neither
thread scheduling, data order nor asynchronous checkpointing may change a number.

Real pipeline: mcckd-demo-data's generated problems and tokenizer, mcckd-prepare, then
mcckd-train on configs/demo.yaml in separate processes.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from mcckd_jax.cli import demo_data, prepare
from cli_testing import REPO_ROOT, environment

# Measured per step, not results of the run: they differ from run to run by nature.
TIMING_FIELDS = {"time", "positions_per_second", "loss_tokens_per_second",
                 "real_tokens_per_second"}


def train(data: pathlib.Path, output_dir: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mcckd_jax.cli.train", str(REPO_ROOT / "configs" / "demo.yaml"),
         f"data.train_files=[{data / 'train_prepared.jsonl'}]",
         f"data.tokenizer={data / 'tokenizer'}",
         f"run.output_dir={output_dir}", "run.steps=40", "run.checkpoint_every=20",
         "run.log_every=1", "run.progress_bar=false"],
        env=environment(devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(output_dir: pathlib.Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in lines]


@pytest.mark.slow
def test_the_demo_training_repeats_exactly(tmp_path, capsys):
    data = tmp_path / "data"
    assert demo_data.main([str(data), "--train", "300", "--dev", "10", "--test", "10",
                           "--max_quantity", "25", "--whole_numbers"]) == 0
    assert prepare.main([str(data / "train.json"), "--task", "gsm8k", "--num_rationales", "4",
                         "--output", str(data / "train_prepared.jsonl")]) == 0
    capsys.readouterr()
    runs = [train(data, tmp_path / name) for name in ("first", "second")]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    first, second = metrics(tmp_path / "first"), metrics(tmp_path / "second")
    assert [row["step"] for row in first] == list(range(1, 41))
    assert first == second
    assert first[-1]["loss"] < first[0]["loss"]  # it trained
