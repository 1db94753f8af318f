"""One record type for every input format, and the readers that produce it.

A `Record` is one question with its gold label and zero or more rationales. Readers accept:

* the MCC-KD JSON format: a JSON list of objects with `instruction`, `output` (one rationale as a
  string, several as a list of strings; "" means none) and `label`; `indices` and `predict` are
  accepted and ignored (the authors' answer-span indices depend on their tokenizer);
* GSM8K's official JSONL: `question` and `answer`, whose last line is `#### <answer>`; the
  rationale is the answer text without that line and without the `<<a*b=c>>` calculator marks;
* the project's prepared JSONL written by `mcckd-prepare`: `id`, `question`, `label`, `answer`,
  `rationales`;
* anything `datasets` loads from disk with one of these schemas: a parquet file or a directory
  written by `save_to_disk`.

Every problem in the input raises `RecordError`, whose message is one line naming the file, the
record index and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mcckd_jax.data import answers

_GSM8K_FINAL_LINE = re.compile(r"^\s*####\s*(?P<answer>.*?)\s*$")
_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")


@dataclasses.dataclass(frozen=True)
class Record:
    """One question, its gold label and the rationales written for it."""

    question: str
    label: str
    rationales: tuple[str, ...] = ()
    uid: str = ""  # stable id: the source's `id`, else "<file name>:<record index>"
    answer: str | None = None  # canonical answer string, set by mcckd-prepare


class RecordError(ValueError):
    """Bad input; `str(error)` is one line: file, record index, field and what was expected."""

    def __init__(self, path: str | os.PathLike, index: int | None, field: str | None,
                 message: str):
        self.path, self.index, self.field = str(path), index, field
        self.message = " ".join(str(message).split())
        super().__init__(located(self.path, None if index is None else f"record {index}",
                                 field, self.message))


def located(path: str, position: str | None, field: str | None, message: str) -> str:
    """"path, <position>, field 'f': message" in one line (position e.g. "record 3")."""
    parts = [path] + ([position] if position is not None else []) + (
        [f"field '{field}'"] if field is not None else [])
    return ": ".join([", ".join(parts), " ".join(str(message).split())])


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """Records read from one or more files, and the bad records skipped on the way."""

    records: list[Record]
    skipped: list[RecordError]


# --------------------------------------------------------------------------------------------
# Row sources: (record index, raw dict) pairs, or a RecordError for a row that cannot be parsed
# --------------------------------------------------------------------------------------------

Row = tuple[int, Any]


def _json_list_rows(path: pathlib.Path) -> Iterator[Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        # One JSON list: a bad byte anywhere makes the whole file unreadable.
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise RecordError(path, None, None, f"not valid UTF-8: byte 0x{raw[error.start]:02x} at "
                          f"line {line} column {column} (byte offset {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(path, None, None, f"malformed JSON at line {error.lineno} column "
                          f"{error.colno}: {error.msg}") from None
    if not isinstance(data, list):
        raise RecordError(path, None, None,
                          f"expected a JSON list of records, got {type(data).__name__}")
    yield from enumerate(data)


def _jsonl_rows(path: pathlib.Path) -> Iterator[Row | RecordError]:
    # Read as bytes and decoded line by line, so that a bad byte is one bad record (which
    # skip_bad_records can skip) instead of an error for the whole file.
    with path.open("rb") as lines:
        for index, raw in enumerate(lines):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield RecordError(path, index, None, f"not valid UTF-8: byte "
                                  f"0x{raw[error.start]:02x} on line {index + 1} at byte "
                                  f"{error.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as error:
                yield RecordError(path, index, None, f"malformed JSON on line {index + 1} "
                                  f"column {error.colno}: {error.msg}")


def _datasets_rows(path: pathlib.Path, split: str | None) -> Iterator[Row]:
    import datasets  # Imported here: it is slow to import and only these formats need it.

    # A private cache folder: reading must not leave files in the user's datasets cache.
    with tempfile.TemporaryDirectory(prefix="mcckd-read-") as cache:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        else:
            loaded = datasets.Dataset.from_parquet(str(path), keep_in_memory=True,
                                                   cache_dir=cache)
        if isinstance(loaded, datasets.DatasetDict):
            if split is None and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                raise RecordError(path, None, None, f"choose a split with split=...; this "
                                  f"DatasetDict has {sorted(loaded)}")
            loaded = loaded[split]
        rows = loaded.to_list()
    yield from enumerate(rows)


def _rows(path: pathlib.Path, split: str | None) -> Iterator[Row | RecordError]:
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        return _datasets_rows(path, split)
    if path.suffix == ".json":
        return _json_list_rows(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    raise RecordError(path, None, None, "unknown format: expected .json (MCC-KD), .jsonl "
                      "(GSM8K or prepared), .parquet or a saved `datasets` directory")


# --------------------------------------------------------------------------------------------
# Schemas: raw dict -> Record
# --------------------------------------------------------------------------------------------


def _string(row: Mapping[str, Any], field: str, path, index) -> str:
    if field not in row or row[field] is None:
        raise RecordError(path, index, field, "missing")
    value = row[field]
    if not isinstance(value, str):
        raise RecordError(path, index, field, f"expected a string, got {type(value).__name__}")
    return value


def _label(row: Mapping[str, Any], path, index) -> str:
    value = row.get("label")
    # JSON numbers are accepted as labels; booleans are not (bool is an int subclass).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = format(value, "g") if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"got {type(value).__name__}"
        raise RecordError(path, index, "label", f"expected a string or a number, {kind}")
    if not value.strip():
        raise RecordError(path, index, "label", "empty")
    return value.strip()


def _rationale_list(value: Any, field: str, path, index) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if not isinstance(value, Sequence) or isinstance(value, (bytes, Mapping)):
        raise RecordError(path, index, field,
                          f"expected a string or a list of strings, got {type(value).__name__}")
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise RecordError(path, index, f"{field}[{position}]",
                              f"expected a string, got {type(item).__name__}")
        if not item.strip():
            raise RecordError(path, index, f"{field}[{position}]", "empty rationale")
    return tuple(value)


def _from_mcckd(row, path, index) -> Record:
    question = _string(row, "instruction", path, index)
    rationales = _rationale_list(row.get("output", ""), "output", path, index)
    return Record(question=question.strip(), label=_label(row, path, index),
                  rationales=rationales, uid=f"{pathlib.Path(path).name}:{index}")


def _from_gsm8k(row, path, index) -> Record:
    question = _string(row, "question", path, index)
    lines = _string(row, "answer", path, index).rstrip().splitlines()
    final = _GSM8K_FINAL_LINE.match(lines[-1]) if lines else None
    if final is None or not final.group("answer"):
        raise RecordError(path, index, "answer", "expected a last line '#### <answer>'")
    rationale = _CALCULATOR_MARK.sub("", "\n".join(lines[:-1])).strip()
    return Record(question=question.strip(), label=final.group("answer").replace(",", ""),
                  rationales=(rationale,) if rationale else (),
                  uid=f"{pathlib.Path(path).name}:{index}")


def _from_prepared(row, path, index) -> Record:
    question = _string(row, "question", path, index)
    rationales = _rationale_list(row["rationales"], "rationales", path, index)
    uid = row.get("id", f"{pathlib.Path(path).name}:{index}")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise RecordError(path, index, "answer", f"expected a string, got {type(answer).__name__}")
    return Record(question=question.strip(), label=_label(row, path, index),
                  rationales=rationales, uid=str(uid), answer=answer)


def record_from_row(row: Any, path: str | os.PathLike, index: int) -> Record:
    """Converts one raw row to a Record, choosing the schema by its fields."""
    if not isinstance(row, Mapping):
        raise RecordError(path, index, None, f"expected an object, got {type(row).__name__}")
    if "instruction" in row:
        return _from_mcckd(row, path, index)
    if "rationales" in row:
        return _from_prepared(row, path, index)
    if "answer" in row and "question" in row and "label" not in row:
        return _from_gsm8k(row, path, index)
    raise RecordError(path, index, None, "unknown schema: expected the fields instruction/output/"
                      "label (MCC-KD), question/answer (GSM8K) or question/rationales/label "
                      f"(prepared); got {sorted(row)}")


def _check(record: Record, raw: Mapping[str, Any], path, index, require_rationales: bool,
           task: str | None) -> None:
    if require_rationales and not record.rationales:
        field = ("rationales" if "rationales" in raw else
                 "answer" if "answer" in raw and "instruction" not in raw else "output")
        raise RecordError(path, index, field, "empty rationale list")
    if task is not None and answers.normalize_label(record.label, task) is None:
        raise RecordError(path, index, "label", f"{record.label!r} is not a {task} answer")


def read_records(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 skip_bad_records: bool = False, require_rationales: bool = False,
                 task: str | None = None, split: str | None = None) -> ReadResult:
    """Reads records from one or more files (formats in the module docstring).

    Args:
      paths: one path or several; records keep the order of the files and of their rows.
      skip_bad_records: collect bad rows in `ReadResult.skipped` instead of raising. Errors that
        concern a whole file (missing, malformed JSON list, unknown format) always raise.
      require_rationales: a record without any rationale is bad input (training data).
      task: when given, a label that is not a valid answer of this task is bad input.
      split: the split of a saved `DatasetDict` with several splits.

    Raises:
      RecordError: the first bad record (unless skipped), with a one-line message.
    """
    if task is not None:
        answers.check_task(task)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    records, skipped = [], []
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise RecordError(path, None, None, "no such file or directory")
        for row in _rows(path, split):
            try:
                if isinstance(row, RecordError):
                    raise row
                index, raw = row
                record = record_from_row(raw, path, index)
                _check(record, raw, path, index, require_rationales, task)
            except RecordError as error:
                if not skip_bad_records:
                    raise
                skipped.append(error)
                continue
            records.append(record)
    return ReadResult(records=records, skipped=skipped)


def record_to_json(record: Record) -> dict[str, Any]:
    """The prepared-JSONL object for a record (inverse of `record_from_row`)."""
    return {"id": record.uid, "question": record.question, "label": record.label,
            "answer": record.answer, "rationales": list(record.rationales)}
