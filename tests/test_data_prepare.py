"""prepare: canonical answer sentence, report arithmetic, atomic output, real SVAMP sample."""

import json

import pytest

from data_testing import SVAMP_SAMPLE, hand_labels
from mcckd_jax.data import answers, prepare, records
from mcckd_jax.data.prepare import PrepareConfig, prepare_files, with_answer_sentence

TEMPLATE = prepare.DEFAULT_ANSWER_TEMPLATE
ANSWER_12 = "Therefore, the answer is 12."


@pytest.mark.parametrize("rationale,expected,action", [
    ("So 5 + 7 = 12.\nTherefore, the answer is 12.", f"So 5 + 7 = 12.\n{ANSWER_12}", "kept"),
    ("So 5 + 7 = 12.\nTherefore, the answer is 12 .", f"So 5 + 7 = 12.\n{ANSWER_12}", "rewritten"),
    ("It costs 12 dollars. therefore, the answer is $12.00.",
     "It costs 12 dollars. Therefore, the answer is 12.", "rewritten"),
    ("He has 12 apples.  ", "He has 12 apples. Therefore, the answer is 12.", "appended"),
    ("First line.\nHe has 12 apples.", f"First line.\nHe has 12 apples.\n{ANSWER_12}", "appended"),
    ("Therefore, the answer is that 12 were lost.",
     "Therefore, the answer is that 12 were lost. Therefore, the answer is 12.", "appended"),
])
def test_answer_sentence(rationale, expected, action):
    assert with_answer_sentence(rationale, "12", TEMPLATE, "gsm8k") == (expected, action)


def test_template_must_hold_one_answer_field():
    with pytest.raises(ValueError, match="answer_template"):
        PrepareConfig(task="svamp", answer_template="The answer.")
    with pytest.raises(ValueError, match="unknown task"):
        PrepareConfig(task="svamps")


def test_prepare_files_on_the_svamp_teacher_sample(shared_data, tmp_path):
    output = tmp_path / "out" / "svamp.jsonl"
    report = prepare_files(shared_data / SVAMP_SAMPLE, output, PrepareConfig(task="svamp"))
    assert json.loads((tmp_path / "out" / "svamp.jsonl.report.json").read_text()) == report
    prepared = records.read_records(output).records
    drops = report["rationale_drops"]
    assert report["questions_in"] == 100 and report["rationales_in"] == 1000
    assert report["rationales_in"] == report["rationales_out"] + sum(drops.values())
    assert report["rationales_out"] == sum(len(r.rationales) for r in prepared)
    assert report["questions_out"] == len(prepared) == 100 - report["rationales_per_question"]["0"]
    assert sum(report["rationales_per_question"].values()) == 100
    assert sum(int(k) * v for k, v in report["rationales_per_question"].items()) == \
        report["rationales_out"]
    # Wrong answers by hand label (questions 0-30) are a floor for the filter's wrong count.
    assert drops["wrong_answer"] >= sum(not correct for _, _, correct in hand_labels())
    jaccard = report["mean_pairwise_jaccard"]
    assert jaccard["after"] < jaccard["correct_distinct"]
    for record in prepared:
        assert record.answer == answers.normalize_label(record.label, "svamp")
        for rationale in record.rationales:
            assert rationale.endswith(f"\nTherefore, the answer is {record.answer}.") or \
                rationale.endswith(f" Therefore, the answer is {record.answer}.")
    assert sum(report["answer_sentence"].values()) == report["rationales_out"]


def test_bad_input_writes_nothing_and_skipping_counts(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([
        {"instruction": "Q1? How many?", "output": ["2 + 2 = 4.", "It is 5."], "label": "4"},
        {"instruction": "Q2?", "output": [], "label": "3"},
        {"instruction": "Q3?", "output": ["x"], "label": "3", "indices": [[0, 1]]},
    ]))
    output = tmp_path / "prepared.jsonl"
    output.write_text("previous content\n")
    with pytest.raises(records.RecordError, match=r"record 1, field 'output': empty rationale"):
        prepare_files(source, output, PrepareConfig(task="svamp"))
    assert output.read_text() == "previous content\n"
    assert not (tmp_path / "prepared.jsonl.report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared.jsonl", "raw.json"]

    report = prepare_files(source, output, PrepareConfig(task="svamp", skip_bad_records=True))
    assert report["bad_records_skipped"] == 1 and "record 1" in report["bad_records"][0]
    assert report["questions_in"] == 2 and report["questions_out"] == 1
    assert report["rationale_drops"]["wrong_answer"] == 2  # "It is 5." and "x"
    (record,) = records.read_records(output).records
    assert record.rationales == ("2 + 2 = 4. Therefore, the answer is 4.",)


def test_write_atomically_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(prepare.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare.write_atomically(target, "text")
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_prepared_file(shared_data, tmp_path):
    config = PrepareConfig(task="svamp")
    prepare_files(shared_data / SVAMP_SAMPLE, tmp_path / "a.jsonl", config)
    prepare_files(shared_data / SVAMP_SAMPLE, tmp_path / "b.jsonl", config)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
