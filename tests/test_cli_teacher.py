"""The whole method from a question file: mcckd-teacher (the SmolLM2-135M-Instruct GGUF as a
local teacher) -> mcckd-prepare -> mcckd-train (the same model as student, two steps) ->
mcckd-eval, each as its own process; and mcckd-teacher's one-line errors.

The questions are three one-step word problems that SmolLM2 sometimes gets right with the
few-shot prompt; adaptive sampling keeps drawing until each has a right rationale or its
budget is spent, so that mcckd-prepare keeps some.
"""

import json
import subprocess
import sys

import pytest

import hf_reference
from cli_testing import environment

QUESTIONS = [
    {"instruction": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
     "output": "", "label": "7"},
    {"instruction": "A box holds 5 pens. Anna takes 2 pens out. How many pens are left in the "
                    "box?", "output": "", "label": "3"},
    {"instruction": "There are 6 birds on a tree and 2 more birds land on it. How many birds are "
                    "on the tree?", "output": "", "label": "8"},
]
GGUF = hf_reference.SMOLLM2_GGUF


def command(name, *args):
    return [sys.executable, "-m", f"mcckd_jax.cli.{name}", *map(str, args)]


def run(cmd, timeout=600):
    # One CPU device: the real model decodes and trains faster unsplit on a 2-core machine.
    done = subprocess.run(cmd, env=environment(devices=1), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow
def test_questions_to_teacher_to_prepare_to_train_to_eval(tmp_path):
    folder = hf_reference.smollm2_folder()
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(QUESTIONS))
    raw = tmp_path / "raw.json"
    teacher = run(command("teacher", questions, "--task", "svamp", "--output", raw,
                          "--checkpoint", folder, "--gguf_file", GGUF, "--prompt", "few_shot",
                          "--num_samples", 3, "--max_tokens", 40, "--temperature", 0.5,
                          "--adaptive_target", 1, "--max_samples", 6, "--batch_size", 9,
                          "--no_progress_bar"))
    assert "de-quantizing" not in teacher.stderr  # transformers' GGUF progress bars stay off
    summary = json.loads(teacher.stdout.strip().splitlines()[-1])
    rows = json.loads(raw.read_text())
    report = json.loads((tmp_path / "raw.json.report.json").read_text())
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in QUESTIONS]
    assert summary["samples"] == report["samples"] == sum(len(r["output"]) for r in rows)
    assert all(len(r["output"]) in (3, 6) for r in rows)

    again = run(command("teacher", questions, "--task", "svamp", "--output", raw,
                        "--checkpoint", folder, "--gguf_file", GGUF, "--prompt", "few_shot",
                        "--num_samples", 3, "--max_tokens", 40, "--temperature", 0.5,
                        "--adaptive_target", 1, "--max_samples", 6, "--batch_size", 9,
                        "--no_progress_bar"))
    assert json.loads(again.stdout.strip().splitlines()[-1])["samples_new"] == 0  # all cached
    assert json.loads(raw.read_text()) == rows

    prepared = tmp_path / "prepared.jsonl"
    run(command("prepare", raw, "--task", "svamp", "--num_rationales", 2, "--output", prepared))
    assert prepared.read_text().strip(), "no question kept a right rationale"

    run_dir = tmp_path / "run"
    run(command("train", "configs/smollm2_135m_gsm8k.yaml", f"student.checkpoint={folder}",
                f"student.gguf_file={GGUF}", f"data.train_files=[{prepared}]",
                "data.tokenization.task=svamp", "data.tokenization.max_length=256",
                "data.pipeline.bucket_lengths=[256]", "data.pipeline.batch_size=2",
                "run.steps=2", "run.checkpoint_every=2", "dev_eval.every=0",
                f"run.output_dir={run_dir}", "run.progress_bar=false"))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)

    out = tmp_path / "eval"
    run(command("eval", run_dir, "--test", f"svamp={questions}", "--max_new_tokens", 16,
                "--batch_size", 4, "--no_progress_bar", "--output_dir", out))
    metrics = json.loads((out / "step_2" / "metrics.json").read_text())
    assert metrics["datasets"]["svamp"]["questions"] == 3


@pytest.mark.parametrize("args, message", [
    (["--task", "svamp", "--output", "x.json"], "choose one teacher"),
    (["--task", "svamp", "--output", "x.json", "--base_url", "http://127.0.0.1:9/v1"],
     "needs both --base_url and --model"),
    (["--task", "svamp", "--output", "x.json", "--checkpoint", "c", "sampling.top_p=2"],
     "top_p must be in (0, 1]"),
    (["--task", "nosuchtask", "--output", "x.json", "--checkpoint", "c"], "nosuchtask"),
    (["--task", "svamp", "--output", "x.json", "--base_url", "http://127.0.0.1:9/v1", "--model",
      "m", "--api_key_env", "MCCKD_TEST_UNSET_KEY"], "MCCKD_TEST_UNSET_KEY"),
])
def test_bad_settings_are_one_line_errors(args, message, tmp_path, shared_data):
    questions = shared_data / "mcckd_format" / "SVAMP" / "test.json"
    done = subprocess.run(command("teacher", questions, *args), env=environment(),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcckd-teacher: error:"), done.stderr
    assert message in lines[0]
    assert not (tmp_path / "x.json").exists()
