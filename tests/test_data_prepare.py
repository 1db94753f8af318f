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


@pytest.mark.parametrize("name,content,skip,message", [
    ("raw.json", "[]", False, "no records"),
    ("raw.jsonl", "", False, "no records"),
    ("raw.jsonl", "\n\n", False, "no records"),
    ("raw.json", json.dumps([{"instruction": "Q?", "output": [], "label": "2"},
                             {"instruction": "Q?", "output": ["It is 2."], "label": "many"}]),
     True, "no records: all 2 were bad and skipped (the first: record 0, field 'output': "
           "empty rationale list)"),
])
def test_input_without_records_is_an_error_and_writes_nothing(tmp_path, name, content, skip,
                                                              message):
    source = tmp_path / name
    source.write_text(content)
    with pytest.raises(records.RecordError) as raised:
        prepare_files(source, tmp_path / "out" / "prepared.jsonl",
                      PrepareConfig(task="svamp", skip_bad_records=skip))
    assert str(raised.value) == f"{source}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_an_empty_file_among_good_ones_is_named(shared_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(records.RecordError, match=f"^{empty}: no records$"):
        prepare_files([shared_data / SVAMP_SAMPLE, empty], tmp_path / "prepared.jsonl",
                      PrepareConfig(task="svamp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_a_file_given_twice_prepares_like_once(shared_data, tmp_path):
    config = PrepareConfig(task="svamp")
    once = prepare_files(shared_data / SVAMP_SAMPLE, tmp_path / "once.jsonl", config)
    twice = prepare_files([shared_data / SVAMP_SAMPLE] * 2, tmp_path / "twice.jsonl", config)
    # Each question's second copy is merged into the first; its rationales are exact
    # duplicates of the first copy's, so selection keeps the same ones.
    assert (tmp_path / "twice.jsonl").read_bytes() == (tmp_path / "once.jsonl").read_bytes()
    assert once["duplicate_questions_merged"] == 0
    assert twice["duplicate_questions_merged"] == 100 and twice["questions_in"] == 200
    assert twice["questions_with_conflicting_labels"] == 0
    assert twice["conflicting_label_examples"] == []
    assert twice["rationales_in"] == 2 * once["rationales_in"] == 2000
    assert twice["rationale_drops"]["wrong_answer"] == 2 * once["rationale_drops"]["wrong_answer"]
    assert twice["rationales_in"] == twice["rationales_out"] + sum(
        twice["rationale_drops"].values())
    assert twice["rationales_per_question"] == once["rationales_per_question"]


def test_repeated_questions_merge_by_answer_and_conflicts_are_reported(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([
        {"instruction": "Tom has 2 apples and gets 2 more. How many?", "label": "4",
         "output": ["2 + 2 = 4. The answer is 4.", "He has 2 and 2, so 4."]},
        {"instruction": "Tom has 2 apples and gets 3 more.", "label": "5",
         "output": ["2 + 3 = 5."]},
        {"instruction": "Tom has 2 apples  and gets 2 more.\nHow many?", "label": "5",
         "output": ["Maybe 5."]},
        {"instruction": " Tom has 2 apples and gets 2 more. How many?", "label": "4.0",
         "output": ["2 + 2 = 4. The answer is 4.", "Two plus two makes 4 apples."]},
    ]))
    report = prepare_files(source, tmp_path / "prepared.jsonl",
                           PrepareConfig(task="svamp", answer_template=None))
    prepared = records.read_records(tmp_path / "prepared.jsonl").records
    assert [(r.uid, r.label, r.rationales) for r in prepared] == [
        ("raw.json:0", "4", ("2 + 2 = 4. The answer is 4.", "He has 2 and 2, so 4.",
                             "Two plus two makes 4 apples.")),
        ("raw.json:1", "5", ("2 + 3 = 5.",)),
        ("raw.json:2", "5", ("Maybe 5.",)),
    ]
    assert report["questions_in"] == 4 and report["duplicate_questions_merged"] == 1
    assert report["rationale_drops"]["exact_duplicate"] == 1
    assert report["questions_with_conflicting_labels"] == 1
    assert report["conflicting_label_examples"] == [
        {"records": ["raw.json:0", "raw.json:2", "raw.json:3"], "labels": ["4", "5", "4.0"]}]


def test_output_and_report_are_written_both_or_neither(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([{"instruction": "Q?", "output": ["1 + 1 = 2."], "label": "2"}]))
    (tmp_path / "blocker").write_text("a file where the report folder should be")
    output = tmp_path / "prepared.jsonl"
    output.write_text("previous content\n")
    report = tmp_path / "blocker" / "report.json"
    with pytest.raises(OSError) as raised:
        prepare_files(source, output, PrepareConfig(task="svamp"), report_path=report)
    assert str(raised.value) == (f"cannot write {report}: folder {report.parent} cannot be "
                                 f"created: {tmp_path / 'blocker'} is a file")
    assert output.read_text() == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "prepared.jsonl", "raw.json"]


def test_same_seed_same_prepared_file(shared_data, tmp_path):
    config = PrepareConfig(task="svamp")
    prepare_files(shared_data / SVAMP_SAMPLE, tmp_path / "a.jsonl", config)
    prepare_files(shared_data / SVAMP_SAMPLE, tmp_path / "b.jsonl", config)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
