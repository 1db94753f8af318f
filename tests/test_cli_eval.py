"""mcckd-eval as a separate process on checkpoints that mcckd-train wrote: one step, the
initial student, several datasets, and --watch following a run that is still training.

Real data: SVAMP from ../shared (the teacher sample for training, dev/test questions for
evaluation), the test's sentencepiece tokenizer and the tiny LLaMA of configs/tiny.yaml.
"""

import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from mcckd_jax.data import records
from mcckd_jax.eval import scoring
from cli_testing import REPO_ROOT, environment, finish, flip_bytes, train_command, wait_for

QUESTIONS = 12
EVAL_FLAGS = ["--max_questions", str(QUESTIONS), "--max_new_tokens", "12", "--batch_size", "8",
              "--no_progress_bar"]


def train_for(inputs, output_dir, steps, *extra):
    """The tiny run's command (checkpoints every 2 steps) for `steps` steps."""
    return train_command(inputs, output_dir, f"run.steps={steps}", *extra)  # the last wins


def eval_command(source, *extra):
    return [sys.executable, "-m", "mcckd_jax.cli.eval", str(source), *EVAL_FLAGS, *extra]


def run(command, timeout=300) -> str:
    done = subprocess.run(command, env=environment(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def svamp(shared_data):
    folder = shared_data / "mcckd_format" / "SVAMP"
    return folder / "dev.json", folder / "test.json"


@pytest.fixture(scope="module")
def trained_run(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval_run") / "run"
    run(train_for(inputs, output_dir, 4))
    return output_dir


def check_predictions(folder: pathlib.Path, question_file: pathlib.Path, summary: dict):
    """Every line names its question and label, and the summary is recomputed from the lines
    with the data module's scoring."""
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    expected = records.read_records(question_file).records[:QUESTIONS]
    assert [row["question"] for row in rows] == [r.question for r in expected]
    assert [row["label"] for row in rows] == [r.label for r in expected]
    rescored = [scoring.score(record, [row["output"]], "svamp")
                for record, row in zip(expected, rows)]
    assert [p.extracted for p in rescored] == [row["extracted"] for row in rows]
    assert scoring.summarize(rescored).items() <= summary.items()
    return rows


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_by_a_separate_process(trained_run, svamp):
    dev, test = svamp
    run(eval_command(trained_run, "--dev", f"svamp_dev={dev}", "--test", f"svamp_test={test}",
                     "--step", "2"))
    out = trained_run / "eval"
    metrics = json.loads((out / "step_2" / "metrics.json").read_text())
    assert metrics["step"] == 2 and set(metrics["datasets"]) == {"svamp_dev", "svamp_test"}
    assert metrics["datasets"]["svamp_dev"]["role"] == "dev"
    for name, path in (("svamp_dev", dev), ("svamp_test", test)):
        rows = check_predictions(out / "step_2" / name, path, metrics["datasets"][name])
        assert len(rows) == QUESTIONS and metrics["datasets"][name]["questions"] == QUESTIONS
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["dataset"]) for row in lines] == [(2, "svamp_dev"),
                                                                 (2, "svamp_test")]
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 2 and set(best["test"]) == {"svamp_test"}
    assert list((trained_run / "tensorboard" / "eval").iterdir())


@pytest.mark.slow
def test_the_initial_student_is_step_zero(inputs, svamp, tmp_path):
    data, tokenizer = inputs
    _, test = svamp
    output = run(eval_command(REPO_ROOT / "configs" / "tiny.yaml", f"data.tokenizer={tokenizer}",
                              "student.architecture.vocab_size=1000", f"run.output_dir={tmp_path}",
                              "--test", str(test), "--log_level", "INFO"))
    # Each dataset's result is printed; with --log_level INFO the INFO lines reach stderr too
    # (absl's root handler, installed when Orbax is imported, once swallowed them).
    [summary] = [line for line in output.splitlines() if line.startswith("step 0 test (test):")]
    assert summary.startswith("step 0 test (test): accuracy ") and ", no answer " in summary
    assert " INFO mcckd_jax.eval.session: step 0: predictions and metrics in " in output
    assert " INFO absl" not in output  # Orbax's own chatter stays out at INFO
    metrics = json.loads((tmp_path / "eval" / "step_0" / "metrics.json").read_text())
    assert metrics["settings"]["source"] == "initial student: random init (seed 0)"
    check_predictions(tmp_path / "eval" / "step_0" / "test", test, metrics["datasets"]["test"])


@pytest.mark.slow
def test_watch_evaluates_checkpoints_as_they_appear_and_stops_at_the_last(inputs, svamp,
                                                                          tmp_path):
    _, test = svamp
    run_dir = tmp_path / "run"
    run(train_for(inputs, run_dir, 2))
    # The watcher is told the run will go to step 4; step 4 is written only after it has
    # evaluated step 2, so it must notice a checkpoint that appears while it waits.
    watcher = subprocess.Popen(eval_command(run_dir, "run.steps=4", "--test", str(test),
                                            "--watch", "--poll_seconds", "0.5"),
                               env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (run_dir / "eval" / "step_2" / "metrics.json").exists(), watcher)
    assert not (run_dir / "checkpoints" / "4").exists()
    run(train_for(inputs, run_dir, 4))
    finish(watcher, timeout=240)
    steps = [json.loads(line)["step"]
             for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert sorted(ocp.utils.checkpoint_steps(run_dir / "checkpoints")) == [2, 4]


@pytest.mark.slow
def test_watch_exits_cleanly_on_sigterm(trained_run, svamp):
    _, test = svamp
    watcher = subprocess.Popen(eval_command(trained_run, "run.steps=100", "--test", str(test),
                                            "--watch", "--poll_seconds", "0.5",
                                            "--output_dir", str(trained_run / "eval_watch")),
                               env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (trained_run / "eval_watch" / "step_4" / "metrics.json").exists(), watcher)
    watcher.send_signal(signal.SIGTERM)
    output, _ = watcher.communicate(timeout=60)
    # Stopped, not finished: the status a shell gives a process that SIGTERM ended.
    assert watcher.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "received signal" in output


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_in_one_line_and_latest_falls_back(trained_run, svamp,
                                                                         tmp_path):
    _, test = svamp
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval*"))
    flip_bytes(run_dir / "checkpoints" / "4" / "optimizer")
    explicit = subprocess.run(eval_command(run_dir, "--test", str(test), "--step", "4"),
                              env=environment(), capture_output=True, text=True, timeout=300)
    assert explicit.returncode == 1, explicit.stderr[-3000:]
    [line] = [line for line in explicit.stderr.splitlines() if line.startswith("mcckd-eval:")]
    assert "checkpoint 4 in" in line and "is damaged: optimizer/" in line
    assert "Traceback" not in explicit.stderr and not (run_dir / "eval" / "step_4").exists()
    output = run(eval_command(run_dir, "--test", str(test)))
    [line] = [line for line in output.splitlines() if "is damaged" in line]
    assert "checkpoint 4 in" in line and "evaluating checkpoint 2" in line
    assert (run_dir / "eval" / "step_2" / "metrics.json").exists()


@pytest.mark.slow
def test_watch_names_the_checkpoints_deleted_before_it_read_them(trained_run, svamp, tmp_path):
    _, test = svamp
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("eval*"))
    shutil.rmtree(run_dir / "checkpoints" / "2")  # as the trainer's keep policy would
    output = run(eval_command(run_dir, "run.steps=4", "--test", str(test), "--watch",
                              "--poll_seconds", "0.5"))
    [line] = [line for line in output.splitlines() if "deleted before" in line]
    assert "checkpoint 2 was deleted" in line and "run.keep_checkpoints=3" in line
    steps = [json.loads(row)["step"]
             for row in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4]


def test_bad_arguments_give_one_line_errors(tmp_path):
    missing = subprocess.run(eval_command(tmp_path / "nothing.yaml", "--test", "x.json"),
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nothing.yaml" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    greedy_vote = subprocess.run(
        eval_command(REPO_ROOT / "configs" / "tiny.yaml", "--test", "x.json", "--num_samples", "3"),
        env=environment(), capture_output=True, text=True, timeout=120)
    assert greedy_vote.returncode == 2 and "temperature" in greedy_vote.stderr


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("mcckd-eval:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_an_unwritable_output_dir_and_a_foreign_tokenizer_are_one_line_errors(
        inputs, svamp, tmp_path):
    _, tokenizer = inputs
    _, test = svamp
    config = [REPO_ROOT / "configs" / "tiny.yaml", f"data.tokenizer={tokenizer}",
              f"run.output_dir={tmp_path}", "--test", str(test)]
    (tmp_path / "a_file").write_text("")
    unwritable = subprocess.run(
        eval_command(*config, "student.architecture.vocab_size=1000",
                     "--output_dir", str(tmp_path / "a_file" / "eval")),
        env=environment(), capture_output=True, text=True, timeout=120)
    assert "--output_dir is not a writable folder" in one_line_error(unwritable)
    # The test tokenizer has 1,000 tokens; a 600-entry student cannot read its ids.
    foreign = subprocess.run(eval_command(*config, "student.architecture.vocab_size=600"),
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert "the student's vocabulary has 600 entries" in one_line_error(foreign)


@pytest.mark.slow
def test_training_measures_dev_accuracy_as_mcckd_eval_does(inputs, svamp, tmp_path):
    dev, _ = svamp
    run_dir = tmp_path / "run"
    run(train_for(inputs, run_dir, 4, "data.pipeline.batch_size=8",
                      f"dev_eval.files=[{dev}]", "dev_eval.every=2", "dev_eval.batch_size=8",
                      f"dev_eval.max_questions={QUESTIONS}", "dev_eval.max_new_tokens=12",
                      "run.checkpoint_every=1", "run.keep_checkpoints=1"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev_lines = {row["step"]: row for row in lines if "dev_accuracy" in row}
    assert sorted(dev_lines) == [2, 4]
    # The latest checkpoint and the best by dev accuracy (ties: the later) are kept.
    accuracy = {step: row["dev_accuracy"] for step, row in dev_lines.items()}
    best = 2 if accuracy[2] > accuracy[4] else 4
    assert sorted(ocp.utils.checkpoint_steps(run_dir / "checkpoints")) == sorted({best, 4})
    # The separate binary on the same checkpoint and questions writes the same outputs.
    run(eval_command(run_dir, "--dev", str(dev), "--step", "4", "--batch_size", "8"))
    ours = (run_dir / "eval" / "step_4" / "dev" / "predictions.jsonl").read_text()
    assert (run_dir / "dev_eval" / "step_4" / "dev" / "predictions.jsonl").read_text() == ours
    summary = json.loads((run_dir / "eval" / "step_4" / "metrics.json").read_text())
    assert summary["datasets"]["dev"]["accuracy"] == accuracy[4]


@pytest.mark.slow
def test_two_processes_write_the_outputs_of_one(trained_run, svamp, tmp_path):
    _, test = svamp
    single = tmp_path / "single"
    run(eval_command(trained_run, "--test", f"svamp={test}", "--output_dir", str(single)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    double = tmp_path / "double"
    # Each process takes 4 of the 8 rows of a global batch of 2 x 4 questions.
    processes = [subprocess.Popen(
        eval_command(trained_run, "mesh.across_hosts=[2,1,1]", "--test", f"svamp={test}",
                     "--output_dir", str(double), "--batch_size", "4"),
        env=environment(devices=4, MCCKD_NUM_PROCESSES="2", MCCKD_PROCESS_ID=str(i),
                        MCCKD_COORDINATOR=f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for process in processes:
        finish(process, timeout=300)
    path = pathlib.Path("step_4") / "svamp" / "predictions.jsonl"
    assert (double / path).read_text() == (single / path).read_text()


@pytest.mark.slow
def test_a_t5_student_is_evaluated_from_its_checkpoint(t5_run, svamp, tmp_path):
    _, test = svamp
    run_dir, _ = t5_run
    run(eval_command(run_dir, "--test", f"svamp={test}", "--output_dir", str(tmp_path)))
    metrics = json.loads((tmp_path / "step_3" / "metrics.json").read_text())
    rows = check_predictions(tmp_path / "step_3" / "svamp", test, metrics["datasets"]["svamp"])
    assert len(rows) == QUESTIONS
