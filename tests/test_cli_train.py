"""mcckd-train's answers to bad input: one line on stderr naming what is wrong, before any
weight is read or any step compiled, and no request to a hub (the suite's network guard would
fail the test).

Real data: the SVAMP teacher sample prepared by test_train_loop's fixture, with the test
tokenizer (1,000 tokens) and the tiny LLaMA of configs/tiny.yaml.
"""

import subprocess
import sys

import pytest

from cli_testing import REPO_ROOT, environment, train_command


def run_train(inputs, output_dir, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(inputs, output_dir, *overrides), env=environment(),
                          capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("mcckd-train:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_a_missing_tokenizer_is_named(inputs, tmp_path):
    line = one_line_error(run_train(inputs, tmp_path / "run",
                                    f"data.tokenizer={tmp_path / 'no_tokenizer'}"))
    assert f"{tmp_path / 'no_tokenizer'}: no such tokenizer" in line


@pytest.mark.parametrize("gguf", [None, "model.gguf"])
def test_a_hub_name_as_checkpoint_is_a_missing_path_not_a_download(inputs, tmp_path, gguf):
    extra = [f"student.gguf_file={gguf}"] if gguf else []
    line = one_line_error(run_train(inputs, tmp_path / "run",
                                    "student.checkpoint=some-org/some-model", *extra))
    assert "some-org/some-model" in line and "local paths only" in line


def test_an_unwritable_output_dir_is_refused_before_anything_is_loaded(inputs, tmp_path):
    (tmp_path / "a_file").write_text("")
    # The tokenizer is missing too: the output folder must be checked first.
    line = one_line_error(run_train(inputs, tmp_path / "a_file" / "run",
                                    f"data.tokenizer={tmp_path / 'no_tokenizer'}"))
    assert "run.output_dir is not a writable folder" in line
    assert f"{tmp_path / 'a_file'} is a file" in line


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(inputs, tmp_path):
    # The test tokenizer has 1,000 tokens; a 600-entry embedding would give NaN losses.
    line = one_line_error(run_train(inputs, tmp_path / "run",
                                    "student.architecture.vocab_size=600"))
    assert "the student's vocabulary has 600 entries" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_max_length_that_drops_most_of_the_data_is_refused(inputs, tmp_path):
    line = one_line_error(run_train(inputs, tmp_path / "run",
                                    "data.tokenization.max_length=48"))
    assert "data.max_length_drop_fraction=0.2" in line and "max_length=48" in line
    assert "questions" in line and "rationales" in line


@pytest.mark.slow
def test_resuming_with_a_changed_model_is_one_line_and_keeps_the_checkpoints(inputs, tmp_path):
    done = run_train(inputs, tmp_path, "run.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    line = one_line_error(run_train(inputs, tmp_path, "run.steps=4",
                                    "student.architecture.hidden_size=64"))
    assert "checkpoint 2 in" in line and "intact (digests verified) but does not fit" in line
    assert "embed_tokens" in line and "Use a new run.output_dir" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_the_demo_config_before_its_data_exists_names_the_missing_tokenizer(tmp_path):
    # From a folder without demo_data/, as a newcomer who skipped mcckd-demo-data would run it.
    done = subprocess.run([sys.executable, "-m", "mcckd_jax.cli.train",
                           str(REPO_ROOT / "configs" / "demo.yaml")], cwd=tmp_path,
                          env=environment(devices=1), capture_output=True, text=True, timeout=300)
    line = one_line_error(done)
    assert line == ("mcckd-train: demo_data/tokenizer: no such tokenizer file or directory "
                    "(tokenizers are read from local paths only; nothing is downloaded)")
