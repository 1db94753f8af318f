"""A run's inputs: which tokenizer a run uses, its training data tokenized, and the length-drop
guard.

Real data: the SVAMP teacher sample prepared by the `inputs` fixture (conftest.py), with the
tests' sentencepiece tokenizer. Expected counts are read from the prepared JSONL itself.
"""

import dataclasses
import json

import pytest

from mcckd_jax.data import run_inputs
from mcckd_jax.data.tokenization import TokenizationConfig
from mcckd_jax.models.pretrained import StudentConfig

LONG = TokenizationConfig(task="svamp", max_length=4096, max_encoder_length=4096)


def test_length_drops_are_a_warning_with_counts_below_the_limit_and_an_error_above(caplog):
    report = {"questions_in": 100, "rationales_in": 400,
              "length_drops": {"questions": 5, "rationales": 80}}  # 5% and 20%
    with caplog.at_level("WARNING", logger="mcckd_jax.data.run_inputs"):
        run_inputs.check_length_drops(report, run_inputs.DataConfig())
    [warning] = [r.getMessage() for r in caplog.records]
    assert "drop 5 of 100 questions (5%) and 80 of 400 rationales (20%)" in warning
    report["length_drops"]["rationales"] = 81
    with pytest.raises(ValueError, match=r"81 of 400 rationales \(20%\), more than "
                                         r"data.max_length_drop_fraction=0.2"):
        run_inputs.check_length_drops(report, run_inputs.DataConfig())
    allowed = run_inputs.DataConfig(max_length_drop_fraction=0.25)
    run_inputs.check_length_drops(report, allowed)


def test_nothing_dropped_is_silent(caplog):
    report = {"questions_in": 3, "rationales_in": 9,
              "length_drops": {"questions": 0, "rationales": 0}}
    with caplog.at_level("WARNING", logger="mcckd_jax.data.run_inputs"):
        run_inputs.check_length_drops(report, run_inputs.DataConfig(max_length_drop_fraction=0))
    assert not caplog.records


def test_the_drop_fraction_must_be_a_fraction():
    with pytest.raises(ValueError, match="within \\[0, 1\\], got 1.5"):
        run_inputs.DataConfig(max_length_drop_fraction=1.5)


def test_the_tokenizer_is_data_tokenizer_else_the_student_checkpoints(inputs, tmp_path):
    _, tokenizer_dir = inputs
    missing = str(tmp_path / "no_such_checkpoint")
    # data.tokenizer wins: the student's checkpoint does not exist and is never read.
    chosen = run_inputs.load_run_tokenizer(run_inputs.DataConfig(tokenizer=tokenizer_dir),
                                           StudentConfig(checkpoint=missing))
    assert chosen.encode("Each basket has 7 apples.") and chosen.eos_token == "</s>"
    # Without it, the student's checkpoint folder; data.tokenizer_gguf_file belongs to
    # data.tokenizer and is not applied to the student's folder.
    fallback = run_inputs.load_run_tokenizer(
        run_inputs.DataConfig(tokenizer_gguf_file="unused.gguf"),
        StudentConfig(checkpoint=tokenizer_dir))
    assert fallback.get_vocab() == chosen.get_vocab()
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        run_inputs.load_run_tokenizer(run_inputs.DataConfig(), StudentConfig(checkpoint=missing))
    with pytest.raises(ValueError, match="data.tokenizer is not set and the student has no "
                                         "checkpoint"):
        run_inputs.load_run_tokenizer(run_inputs.DataConfig(), StudentConfig())


@pytest.mark.parametrize("layout", ["decoder_only", "encoder_decoder"])
def test_train_data_holds_every_prepared_question_in_the_requested_layout(inputs, layout):
    prepared, tokenizer_dir = inputs
    rows = [json.loads(line) for line in prepared.read_text().splitlines()]
    data = run_inputs.DataConfig(train_files=(str(prepared),), tokenizer=tokenizer_dir,
                                 tokenization=LONG)
    tokenizer = run_inputs.load_run_tokenizer(data, StudentConfig())
    encoded = run_inputs.load_train_data(data, tokenizer, layout)
    assert encoded.layout == layout
    assert encoded.num_questions == len(rows)
    # Every prepared rationale ends with an answer sentence the span finder locates.
    assert int(encoded.question_rationales[-1]) == sum(len(r["rationales"]) for r in rows)


def test_train_data_errors_name_the_setting_and_length_drops_are_guarded(inputs, caplog):
    prepared, tokenizer_dir = inputs
    rows = prepared.read_text().splitlines()
    tokenizer = run_inputs.load_run_tokenizer(run_inputs.DataConfig(tokenizer=tokenizer_dir),
                                              StudentConfig())
    with pytest.raises(ValueError, match="data.train_files is empty"):
        run_inputs.load_train_data(run_inputs.DataConfig(), tokenizer, "decoder_only")
    # 128 tokens drop about a fifth of these questions and more than half of the rationales.
    short = run_inputs.DataConfig(train_files=(str(prepared),),
                                  tokenization=TokenizationConfig(task="svamp", max_length=128))
    with pytest.raises(ValueError, match="more than data.max_length_drop_fraction=0.2"):
        run_inputs.load_train_data(short, tokenizer, "decoder_only")
    allowed = dataclasses.replace(short, max_length_drop_fraction=0.9)
    with caplog.at_level("WARNING", logger="mcckd_jax.data.run_inputs"):
        encoded = run_inputs.load_train_data(allowed, tokenizer, "decoder_only")
    assert 0 < encoded.num_questions < len(rows)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("the length limits (data.tokenization.max_length=128")
    assert f"{len(rows) - encoded.num_questions} of {len(rows)} questions" in warning
