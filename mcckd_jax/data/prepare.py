"""mcckd-prepare as a function: raw teacher rationales in, prepared JSONL and a report out.

A question that appears several times with the same answer becomes one question holding all
its rationales; with different answers the copies stay apart and are reported. For each
question: keep the rationales whose final answer matches the label, remove exact and near
duplicates, choose up to K diverse ones (`selection`), and end each with the canonical answer
sentence (default "Therefore, the answer is {answer}.") so that every rationale of a question
carries the same answer tokens. The prepared file and its report are written together, all or
nothing (`files.write_together`); nothing is written when the input is bad or holds no record.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from mcckd_jax import files
from mcckd_jax.data import answers, records, selection

DEFAULT_ANSWER_TEMPLATE = "Therefore, the answer is {answer}."
CONFLICT_EXAMPLES = 5  # questions with conflicting labels listed in the report


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What mcckd-prepare keeps and how it rewrites it."""

    task: str = "gsm8k"  # one of answers.TASKS
    selection: selection.SelectionConfig = selection.SelectionConfig()  # filter and choice of K
    answer_template: str | None = DEFAULT_ANSWER_TEMPLATE  # final sentence; None keeps endings
    skip_bad_records: bool = False  # skip and count bad input records instead of failing

    def __post_init__(self):
        answers.check_task(self.task)
        if self.answer_template is not None and self.answer_template.count("{answer}") != 1:
            raise ValueError("answer_template must contain '{answer}' exactly once, got "
                             f"{self.answer_template!r}")


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """Prepared records (one per question that kept a rationale) and the report."""

    records: list[records.Record]
    report: dict[str, Any]


def _template_pattern(template: str) -> re.Pattern:
    """Matches a final sentence written like the template, whatever its spacing and answer."""
    prefix, suffix = template.split("{answer}")
    flexible = lambda part: r"\s*".join(map(re.escape, part.split()))  # noqa: E731
    return re.compile(rf"(?:^|(?<=\s)){flexible(prefix)}\s*(?P<answer>[^\n]+?)\s*"
                      rf"{flexible(suffix)}\s*$", re.IGNORECASE)


def with_answer_sentence(rationale: str, answer: str, template: str,
                         task: str) -> tuple[str, str]:
    """The rationale ending with the template sentence for `answer`, and what was done.

    Returns (text, action) with action "kept" (it already ended with exactly that sentence),
    "rewritten" (it ended with the template sentence spelling the same answer differently,
    "is 12 ." or "is $12.00.", which is replaced) or "appended" (anything else, including
    "the answer is that 367 crayons were lost.", which stays and gets the sentence after it).
    """
    sentence = template.format(answer=answer)
    stripped = rationale.rstrip()
    if stripped.endswith(sentence):
        return stripped, "kept"
    ending = _template_pattern(template).search(stripped)
    if ending is not None and answers.normalize_label(ending.group("answer"), task) == answer:
        return stripped[:ending.start()].rstrip() + _separator(stripped) + sentence, "rewritten"
    return stripped + _separator(stripped) + sentence, "appended"


def _separator(text: str) -> str:
    return "\n" if "\n" in text else " "


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def merge_repeated_questions(inputs: Sequence[records.Record],
                             task: str) -> tuple[list[records.Record], dict[str, Any]]:
    """One record per (question, answer), and a report of the questions with several answers.

    Questions are compared with their whitespace collapsed, answers after
    `answers.normalize_label` ("4" and "4.0" agree). A merged record is the first of its
    group holding the rationales of all, in input order, so that deduplication and selection
    see every rationale written for the question. The same question with different answers is
    kept apart: nothing here can tell which label is right.

    Returns:
      (records in order of first appearance, report with `duplicate_questions_merged` (records
      folded into an earlier one), `questions_with_conflicting_labels` and up to
      CONFLICT_EXAMPLES `conflicting_label_examples` (record ids and labels)).
    """
    groups: dict[tuple[str, str], list[records.Record]] = {}
    by_question: dict[str, list[tuple[str, records.Record]]] = {}  # (answer, record) in order
    for record in inputs:
        question = " ".join(record.question.split())
        answer = answers.normalize_label(record.label, task) or record.label
        groups.setdefault((question, answer), []).append(record)
        by_question.setdefault(question, []).append((answer, record))
    merged = [dataclasses.replace(group[0], rationales=tuple(
        rationale for record in group for rationale in record.rationales))
        for group in groups.values()]
    conflicts = [[record for _, record in copies] for copies in by_question.values()
                 if len({answer for answer, _ in copies}) > 1]
    report = {"duplicate_questions_merged": len(inputs) - len(merged),
              "questions_with_conflicting_labels": len(conflicts),
              "conflicting_label_examples": [
                  {"records": [r.uid for r in copies], "labels": [r.label for r in copies]}
                  for copies in conflicts[:CONFLICT_EXAMPLES]]}
    return merged, report


def prepare_records(inputs: Sequence[records.Record], config: PrepareConfig) -> PrepareResult:
    """Merges repeated questions, then filters, deduplicates, selects and finalises the
    rationales of each question."""
    drops: collections.Counter = collections.Counter()
    endings: collections.Counter = collections.Counter()
    per_question: collections.Counter = collections.Counter()
    jaccard_before, jaccard_candidates, jaccard_after = [], [], []
    prepared = []
    ngram = config.selection.ngram
    questions, merging = merge_repeated_questions(inputs, config.task)
    for record in questions:
        answer = answers.normalize_label(record.label, config.task)
        chosen = selection.select_rationales(record.question, record.rationales, record.label,
                                             config.task, config.selection)
        for reason in ("wrong_answer", "exact_duplicate", "near_duplicate", "over_limit"):
            drops[reason] += len(getattr(chosen, reason))
        grams = [selection.word_ngrams(r, ngram) for r in record.rationales]
        candidates = sorted(chosen.kept + chosen.over_limit)
        jaccard_before.append(selection.mean_pairwise_jaccard(grams))
        jaccard_candidates.append(selection.mean_pairwise_jaccard([grams[i] for i in candidates]))
        jaccard_after.append(selection.mean_pairwise_jaccard([grams[i] for i in chosen.kept]))
        per_question[len(chosen.kept)] += 1
        if not chosen.kept:
            continue
        kept = [record.rationales[i] for i in chosen.kept]
        if config.answer_template is not None:
            finished = [with_answer_sentence(r, answer, config.answer_template, config.task)
                        for r in kept]
            endings.update(action for _, action in finished)
            kept = [text for text, _ in finished]
        prepared.append(dataclasses.replace(record, rationales=tuple(kept), answer=answer))
    report = {
        "task": config.task,
        "questions_in": len(inputs),
        **merging,
        "questions_out": len(prepared),
        "questions_without_correct_rationale": per_question[0],
        "rationales_in": sum(len(r.rationales) for r in inputs),
        "rationales_out": sum(len(r.rationales) for r in prepared),
        "rationale_drops": {k: drops[k] for k in ("wrong_answer", "exact_duplicate",
                                                  "near_duplicate", "over_limit")},
        "rationales_per_question": {str(k): per_question[k]
                                    for k in range(config.selection.num_rationales + 1)},
        "mean_pairwise_jaccard": {"before": _mean(jaccard_before),
                                  "correct_distinct": _mean(jaccard_candidates),
                                  "after": _mean(jaccard_after)},
        "answer_sentence": {k: endings[k] for k in ("kept", "rewritten", "appended")},
        "selection": dataclasses.asdict(config.selection),
        "answer_template": config.answer_template,
    }
    return PrepareResult(records=prepared, report=report)


def _read_inputs(paths: Sequence[str | os.PathLike], config: PrepareConfig) -> records.ReadResult:
    """The records of every input file; a file that yields none is an error, since an empty
    prepared file would only fail later, far from its cause."""
    read, skipped = [], []
    for path in paths:
        result = records.read_records(path, skip_bad_records=config.skip_bad_records,
                                      require_rationales=True, task=config.task)
        if not result.records:
            first = result.skipped[0] if result.skipped else None
            why = "" if first is None else (
                f": all {len(result.skipped)} were bad and skipped (the first: "
                f"{str(first).removeprefix(first.path + ', ')})")
            raise records.RecordError(path, None, None, f"no records{why}")
        read += result.records
        skipped += result.skipped
    return records.ReadResult(records=read, skipped=skipped)


def prepare_files(input_paths: str | os.PathLike | Sequence[str | os.PathLike],
            output_path: str | os.PathLike, config: PrepareConfig,
            report_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads raw records, prepares them and writes the prepared JSONL and its report.

    Args:
      input_paths: files in any format `records.read_records` accepts.
      output_path: prepared JSONL, one question per line (`records.record_to_json`).
      config: task, selection and answer sentence.
      report_path: where the report JSON goes; default `<output_path>.report.json`.

    Returns:
      The report (also written to report_path).

    Raises:
      records.RecordError: bad input and `config.skip_bad_records` unset, or an input file
        without any (good) record; nothing is written.
      files.WriteError: the output or the report cannot be written; neither is.
    """
    paths = [input_paths] if isinstance(input_paths, (str, os.PathLike)) else list(input_paths)
    read = _read_inputs(paths, config)
    result = prepare_records(read.records, config)
    report = {"inputs": [str(p) for p in paths],
              "output": str(output_path),
              "bad_records_skipped": len(read.skipped),
              "bad_records": [str(error) for error in read.skipped[:20]],
              **result.report}
    lines = "".join(json.dumps(records.record_to_json(r), ensure_ascii=False) + "\n"
                    for r in result.records)
    report_path = report_path or f"{output_path}.report.json"
    # Together: a prepared file next to the report of an earlier run would mislead.
    files.write_together({output_path: lines, report_path: json.dumps(report, indent=2) + "\n"})
    return report
