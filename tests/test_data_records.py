"""Readers: every supported format into one Record type; bad input as one-line errors."""

import json

import pytest

from mcckd_jax.data import records
from mcckd_jax.data.records import Record, RecordError, read_records


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_mcckd_json_with_string_list_and_empty_outputs_and_ignored_indices(tmp_path):
    path = _write_json(tmp_path / "train.json", [
        {"instruction": "Q1?\n", "output": ["r1", "r2"], "label": "3", "indices": [[1, 2], [3, 4]]},
        {"instruction": "Q2?", "output": "only one", "label": 7.5, "predict": "7"},
        {"instruction": "Q3?", "output": "", "label": "C"},
    ])
    read = read_records(path)
    assert read.records == [
        Record(question="Q1?", label="3", rationales=("r1", "r2"), uid="train.json:0"),
        Record(question="Q2?", label="7.5", rationales=("only one",), uid="train.json:1"),
        Record(question="Q3?", label="C", rationales=(), uid="train.json:2"),
    ]
    assert read.skipped == []


def test_gsm8k_jsonl_drops_final_line_and_calculator_marks(tmp_path):
    row = {"question": "How much?", "answer": "He has 2+3=<<2+3=5>>5 apples.\n#### 1,005"}
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(row) + "\n\n")
    (record,) = read_records(path).records
    assert record == Record(question="How much?", label="1005",
                            rationales=("He has 2+3=5 apples.",), uid="gsm.jsonl:0")


def test_real_files_have_documented_shapes(shared_data):
    svamp = read_records(shared_data / "mcckd_format/SVAMP/train_multicot_sample.json").records
    assert len(svamp) == 100 and all(len(r.rationales) == 10 for r in svamp)
    gsm8k = read_records(shared_data / "gsm8k/test.jsonl").records
    assert gsm8k[0].label == "18" and gsm8k[0].rationales[0].endswith("farmer’s market.")
    csqa = read_records(shared_data / "mcckd_format/CSQA/dev.json").records
    assert csqa[0].label == "C" and "C. open doors" in csqa[0].question


def test_prepared_jsonl_round_trip(tmp_path):
    original = [Record(question="Q?", label="6.0", rationales=("a\nTherefore, the answer is 6.",),
                       uid="x:4", answer="6")]
    path = tmp_path / "prepared.jsonl"
    path.write_text("".join(json.dumps(records.record_to_json(r)) + "\n" for r in original))
    assert read_records(path).records == original


def test_datasets_formats_parquet_and_saved_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": "Q?", "output": ["r1", "r2"], "label": "4"}]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dict"))
    expected = Record(question="Q?", label="4", rationales=("r1", "r2"))
    for path in ("rows.parquet", "saved"):
        (record,) = read_records(tmp_path / path).records
        assert dataclass_without_uid(record) == expected
    (record,) = read_records(tmp_path / "dict", split="test").records
    assert dataclass_without_uid(record) == expected
    with pytest.raises(RecordError, match="split"):
        read_records(tmp_path / "dict")


def dataclass_without_uid(record):
    return Record(question=record.question, label=record.label, rationales=record.rationales)


@pytest.mark.parametrize("row,field,message", [
    ({"output": ["r"], "label": "1"}, None, "unknown schema"),
    ({"instruction": 5, "output": ["r"], "label": "1"}, "instruction",
     "expected a string, got int"),
    ({"instruction": "Q", "output": ["r", 3], "label": "1"}, "output[1]", "expected a string"),
    ({"instruction": "Q", "output": {"a": 1}, "label": "1"}, "output", "got dict"),
    ({"instruction": "Q", "output": ["r"]}, "label", "missing"),
    ({"instruction": "Q", "output": ["r"], "label": True}, "label", "got bool"),
    ({"instruction": "Q", "output": [], "label": "1"}, "output", "empty rationale list"),
    ({"instruction": "Q", "output": ["r"], "label": "many"}, "label", "not a svamp answer"),
    ({"question": "Q", "answer": "no final line"}, "answer", "#### <answer>"),
    ("just a string", None, "expected an object"),
])
def test_bad_records_raise_one_line_errors_naming_file_record_and_field(tmp_path, row, field,
                                                                         message):
    good = {"instruction": "Q", "output": ["r"], "label": "1"}
    path = _write_json(tmp_path / "bad.json", [good, row])
    with pytest.raises(RecordError) as raised:
        read_records(path, require_rationales=True, task="svamp")
    text = str(raised.value)
    assert "\n" not in text and str(path) in text and "record 1" in text and message in text
    assert raised.value.index == 1 and raised.value.field == field
    if field is not None:
        assert f"field '{field}'" in text
    read = read_records(path, require_rationales=True, task="svamp", skip_bad_records=True)
    assert len(read.records) == 1 and len(read.skipped) == 1


def test_malformed_json_names_the_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "Q",\n "output": ["r"] "label": "1"}]')
    with pytest.raises(RecordError, match=r"broken.json: malformed JSON at line 2 column"):
        read_records(path, skip_bad_records=True)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"question": "Q", "answer": "x\\n#### 1"}\n{"question": \n')
    with pytest.raises(RecordError, match=r"broken.jsonl, record 1: malformed JSON on line 2"):
        read_records(lines)
    assert len(read_records(lines, skip_bad_records=True).skipped) == 1


def test_file_level_problems(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "missing.json")
    with pytest.raises(RecordError, match="expected a JSON list"):
        read_records(_write_json(tmp_path / "object.json", {"instruction": "Q"}))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecordError, match="unknown format"):
        read_records(tmp_path / "notes.txt")


def test_jsonl_that_is_not_utf8_names_the_line_and_byte(shared_data, tmp_path):
    # Real GSM8K rows, one re-saved as Windows-1252: its ’ becomes the lone byte 0x92.
    rows = [json.loads(line) for line in
            (shared_data / "gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    lines = [json.dumps(row, ensure_ascii=False).encode("utf-8") for row in rows]
    lines[0] = json.dumps(rows[0], ensure_ascii=False).encode("cp1252")
    position = lines[0].index(b"\x92")
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\n".join([lines[1], *lines]) + b"\n")  # the bad row is line 2
    with pytest.raises(RecordError) as raised:
        read_records(path)
    assert str(raised.value) == (f"{path}, record 1: not valid UTF-8: byte 0x92 on line 2 at "
                                 f"byte {position + 1}")
    assert raised.value.index == 1
    read = read_records(path, skip_bad_records=True)
    assert [r.uid for r in read.records] == ["windows.jsonl:0", "windows.jsonl:2",
                                             "windows.jsonl:3"]
    assert read.records[1].question == rows[1]["question"] and len(read.skipped) == 1


def test_jsonl_with_windows_line_endings_reads_like_unix(shared_data, tmp_path):
    text = "".join((shared_data / "gsm8k/test.jsonl").read_text().splitlines(True)[:4])
    (tmp_path / "unix.jsonl").write_bytes(text.encode("utf-8"))
    (tmp_path / "crlf.jsonl").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    unix = read_records(tmp_path / "unix.jsonl").records
    crlf = read_records(tmp_path / "crlf.jsonl").records
    assert len(unix) == 4
    assert [(r.question, r.label, r.rationales) for r in crlf] == \
        [(r.question, r.label, r.rationales) for r in unix]


def test_json_that_is_not_utf8_names_the_line_and_column(shared_data, tmp_path):
    rows = json.loads((shared_data / "mcckd_format/SVAMP/train_multicot_sample.json").read_text())
    rows[2]["instruction"] = "At the café: " + rows[2]["instruction"]
    # ASCII throughout (other characters escaped) except the é, written as Latin-1 below.
    text = json.dumps(rows[:5], indent=1).replace("caf\\u00e9", "café")
    offset = text.index("é")  # the text before it is ASCII: characters are bytes
    line, column = text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
    path = tmp_path / "latin1.json"
    path.write_bytes(text.encode("latin-1"))
    for skip in (False, True):  # one JSON list: the whole file is unreadable
        with pytest.raises(RecordError) as raised:
            read_records(path, skip_bad_records=skip)
        assert str(raised.value) == (f"{path}: not valid UTF-8: byte 0xe9 at line {line} "
                                     f"column {column} (byte offset {offset})")
        assert raised.value.index is None
