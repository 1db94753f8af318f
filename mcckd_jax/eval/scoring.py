"""Scoring generated rationales: answer extraction, self-consistency voting, accuracy.

Pure functions over strings; the runner feeds them decoded outputs. An output whose answer
cannot be found is wrong and counted as missing, so accuracy is always over every question.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from mcckd_jax.data import answers
from mcckd_jax.data.records import Record


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One evaluated question: a line of predictions.jsonl."""

    uid: str
    question: str
    output: str  # the generated rationale (the first sample under self-consistency)
    extracted: str | None  # the answer read from the output(s); None: no answer found
    label: str
    correct: bool
    samples: tuple[str, ...] = ()  # every sampled rationale when num_samples > 1
    sample_answers: tuple[str | None, ...] = ()

    def to_json(self) -> dict:
        row = {"id": self.uid, "question": self.question, "output": self.output,
               "extracted": self.extracted, "label": self.label, "correct": self.correct}
        if self.samples:
            row.update(samples=list(self.samples), sample_answers=list(self.sample_answers))
        return row


def majority_vote(sample_answers: Sequence[str | None]) -> str | None:
    """The most frequent answer among the samples that have one; ties go to the answer seen
    first. None when no sample has an answer."""
    found = [answer for answer in sample_answers if answer is not None]
    if not found:
        return None
    counts = collections.Counter(found)
    best = max(counts.values())
    return next(answer for answer in found if counts[answer] == best)


def score(record: Record, outputs: Sequence[str], task: str) -> Prediction:
    """The prediction for one question from its generated output(s).

    With one output its extracted answer is the prediction; with several (self-consistency)
    the majority vote over their extracted answers is.
    """
    if not outputs:
        raise ValueError(f"question {record.uid!r}: no output to score")
    extracted = tuple(answers.extract_answer(text, task, question=record.question)
                      for text in outputs)
    vote = extracted[0] if len(outputs) == 1 else majority_vote(extracted)
    several = len(outputs) > 1
    return Prediction(uid=record.uid, question=record.question, output=outputs[0],
                      extracted=vote, label=record.label,
                      correct=answers.answers_match(vote, record.label, task),
                      samples=tuple(outputs) if several else (),
                      sample_answers=extracted if several else ())


def summarize(predictions: Sequence[Prediction]) -> dict[str, float | int]:
    """accuracy (missing answers count as wrong), missing_rate, and the counts behind them."""
    total = len(predictions)
    correct = sum(p.correct for p in predictions)
    missing = sum(p.extracted is None for p in predictions)
    return {"questions": total, "correct": correct, "missing": missing,
            "accuracy": correct / total if total else 0.0,
            "missing_rate": missing / total if total else 0.0}
