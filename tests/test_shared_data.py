"""The shared data that later tests read is where MCCKD_SHARED says, with the documented sizes.

Sizes come from ../shared/data/README.md; CI sets MCCKD_REQUIRE_SHARED=1 so that a missing
folder fails instead of silently skipping every data test.
"""

import json

import pytest

JSON_RECORDS = {
    "mcckd_format/GSM8K/dev.json": 660,
    "mcckd_format/GSM8K/test.json": 659,
    "mcckd_format/SVAMP/dev.json": 150,
    "mcckd_format/SVAMP/test.json": 150,
    "mcckd_format/ASDiv/dev.json": 313,
    "mcckd_format/ASDiv/test.json": 314,
    "mcckd_format/SVAMP/train_multicot_sample.json": 100,
}


@pytest.mark.parametrize("relative_path,num_records", sorted(JSON_RECORDS.items()))
def test_mcckd_format_files_have_documented_sizes(shared_data, relative_path, num_records):
    records = json.loads((shared_data / relative_path).read_text())
    assert len(records) == num_records
    assert all({"instruction", "output", "label"} <= record.keys() for record in records)


def test_gsm8k_jsonl_has_documented_sizes_and_answer_lines(shared_data):
    for split, num_records in (("train", 7473), ("test", 1319)):
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == num_records
        first = json.loads(lines[0])
        assert "####" in first["answer"].splitlines()[-1]


def test_multicot_sample_has_ten_raw_rationales_per_question(shared_data):
    records = json.loads((shared_data / "mcckd_format/SVAMP/train_multicot_sample.json").read_text())
    assert all(isinstance(r["output"], list) and len(r["output"]) == 10 for r in records)
