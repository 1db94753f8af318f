"""mcckd-prepare as a function: raw teacher rationales in, prepared JSONL and a report out.

For each question: keep the rationales whose final answer matches the label, remove exact and
near duplicates, choose up to K diverse ones (`selection`), and end each with the canonical
answer sentence (default "Therefore, the answer is {answer}.") so that every rationale of a
question carries the same answer tokens. The output is written atomically (temporary file in
the same folder, then rename), and nothing is written when the input is bad.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from mcckd_jax.data import answers, records, selection

DEFAULT_ANSWER_TEMPLATE = "Therefore, the answer is {answer}."


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


def prepare_records(inputs: Sequence[records.Record], config: PrepareConfig) -> PrepareResult:
    """Filters, deduplicates, selects and finalises the rationales of each record."""
    drops: collections.Counter = collections.Counter()
    endings: collections.Counter = collections.Counter()
    per_question: collections.Counter = collections.Counter()
    jaccard_before, jaccard_candidates, jaccard_after = [], [], []
    prepared = []
    ngram = config.selection.ngram
    for record in inputs:
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


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Writes `content` (text as UTF-8, or bytes) to `path` through a temporary file and a
    rename: all or nothing."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


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
      records.RecordError: bad input and `config.skip_bad_records` unset; nothing is written.
    """
    read = records.read_records(input_paths, skip_bad_records=config.skip_bad_records,
                                require_rationales=True, task=config.task)
    result = prepare_records(read.records, config)
    report = {"inputs": [str(p) for p in ([input_paths] if isinstance(
        input_paths, (str, os.PathLike)) else input_paths)],
              "output": str(output_path),
              "bad_records_skipped": len(read.skipped),
              "bad_records": [str(error) for error in read.skipped[:20]],
              **result.report}
    lines = "".join(json.dumps(records.record_to_json(r), ensure_ascii=False) + "\n"
                    for r in result.records)
    report_path = report_path or f"{output_path}.report.json"
    write_atomically(output_path, lines)
    write_atomically(report_path, json.dumps(report, indent=2) + "\n")
    return report
