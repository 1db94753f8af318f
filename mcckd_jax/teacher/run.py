"""One mcckd-teacher run: questions -> N sampled rationales each -> MCC-KD JSON and a report.

Every question gets sample indices 0..N-1. A sample already in the cache is reused; the others
go to the teacher, and each one is appended to the cache as it lands (before it counts), so a
run that was killed and started again asks for nothing it already has and writes the same
output as an uninterrupted one (samples depend on (seed, question, index) only: base.py).

Adaptive sampling (`target` > 0): after each round of N, a question that has fewer than
`target` usable rationales (answer matches the label, not a near-duplicate: the selection
mcckd-prepare applies) gets the next N indices, until it has them or `max_samples` were drawn;
questions that end short are listed in the report.

The output holds every sample of every question, in index order, in the MCC-KD format that
mcckd-prepare reads ({"instruction", "output": [...], "label"}); mcckd-prepare filters them.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from mcckd_jax.data import answers, selection
from mcckd_jax.data.records import Record
from mcckd_jax.teacher import cache as sample_cache
from mcckd_jax.teacher.base import Sample, SampleRequest, SamplingParams, Teacher
from mcckd_jax.teacher.prompts import PromptTemplate


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Keep sampling a question until it has `target` usable rationales."""

    target: int = 0  # usable rationales wanted per question; 0 turns adaptive sampling off
    max_samples: int = 20  # per-question budget of samples under adaptive sampling

    def __post_init__(self):
        if self.target < 0 or self.max_samples < 1:
            raise ValueError("adaptive.target must be >= 0 and adaptive.max_samples >= 1")


@dataclasses.dataclass(frozen=True)
class RunResult:
    rows: list[dict[str, Any]]  # MCC-KD JSON rows, in the question file's order
    report: dict[str, Any]


Key = tuple[str, int]  # (question uid, sample index)


def usable_count(record: Record, texts: Sequence[str], task: str, target: int) -> int:
    """How many of `texts` mcckd-prepare would keep for `record` with K = target: answer equal
    to the label, no exact or near duplicate."""
    if not texts:
        return 0
    chosen = selection.select_rationales(record.question, list(texts), record.label, task,
                                         selection.SelectionConfig(num_rationales=target))
    return len(chosen.kept)


class _Collector:
    """The samples of the run so far; appends each new one to the cache first."""

    def __init__(self, store: sample_cache.SampleCache, model_id: str, params: SamplingParams,
                 progress: Callable[[Sample], None] | None):
        self.store, self.model_id, self.params, self.progress = store, model_id, params, progress
        self.samples: dict[Key, Sample] = {}
        self.from_cache = self.new = 0

    def key(self, request: SampleRequest) -> str:
        return sample_cache.request_key(self.model_id, request, self.params)

    def reuse(self, request: SampleRequest) -> bool:
        sample = self.store.get(self.key(request))
        if sample is not None:
            self.samples[(request.question_key, request.sample_index)] = sample
            self.from_cache += 1
        return sample is not None

    def on_sample(self, request: SampleRequest, sample: Sample) -> None:
        self.store.append(self.key(request), request, sample)  # durable before it counts
        self.samples[(request.question_key, request.sample_index)] = sample
        self.new += 1
        if self.progress is not None:
            self.progress(sample)

    def texts(self, uid: str) -> list[str]:
        indices = sorted(i for (q, i) in self.samples if q == uid)
        return [self.samples[(uid, i)].text for i in indices]


def _round(records: Sequence[Record], indices: dict[str, range], template: PromptTemplate,
           teacher: Teacher, collector: _Collector) -> None:
    requests = [SampleRequest(r.uid, template.messages(r.question), i)
                for r in records for i in indices[r.uid]]
    missing = [request for request in requests if not collector.reuse(request)]
    if missing:
        teacher.generate(missing, collector.params, collector.on_sample)


def run_teacher(records: Sequence[Record], teacher: Teacher, store: sample_cache.SampleCache, *,
                task: str, template: PromptTemplate, params: SamplingParams, num_samples: int,
                adaptive: AdaptiveConfig = AdaptiveConfig(),
                progress: Callable[[Sample], None] | None = None) -> RunResult:
    """Samples rationales for every record (module docstring); `progress` is called per new
    sample."""
    answers.check_task(task)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    uids = [r.uid for r in records]
    if len(set(uids)) != len(uids):
        raise ValueError("question ids repeat in the input: each question needs its own id")
    started = time.perf_counter()
    collector = _Collector(store, teacher.model_id, params, progress)
    pending, drawn, rounds = list(records), 0, 0
    while pending:
        stop = drawn + num_samples if not adaptive.target else min(drawn + num_samples,
                                                                    adaptive.max_samples)
        _round(pending, {r.uid: range(drawn, stop) for r in pending}, template, teacher,
               collector)
        drawn, rounds = stop, rounds + 1
        if not adaptive.target or drawn >= adaptive.max_samples:
            break
        pending = [r for r in pending
                   if usable_count(r, collector.texts(r.uid), task, adaptive.target) < adaptive.target]
    rows = [{"instruction": r.question, "output": collector.texts(r.uid), "label": r.label}
            for r in records]
    report = _report(records, collector, teacher, task, params, num_samples, adaptive, rounds,
                     time.perf_counter() - started)
    return RunResult(rows=rows, report=report)


def _report(records, collector: _Collector, teacher, task, params, num_samples, adaptive,
            rounds, seconds) -> dict[str, Any]:
    per_question = collections.Counter(len(collector.texts(r.uid)) for r in records)
    target = adaptive.target or num_samples
    usable = {r.uid: usable_count(r, collector.texts(r.uid), task, target) for r in records}
    completion_tokens = sum(s.completion_tokens for s in collector.samples.values())
    stats = getattr(teacher, "stats", None)
    return {
        "teacher": teacher.model_id, "task": task, "sampling": dataclasses.asdict(params),
        "questions": len(records), "samples": len(collector.samples),
        "samples_from_cache": collector.from_cache, "samples_new": collector.new,
        "rounds": rounds, "wall_seconds": round(seconds, 3),
        "prompt_tokens": sum(s.prompt_tokens for s in collector.samples.values()),
        "completion_tokens": completion_tokens,
        "finish_reasons": dict(collections.Counter(s.finish_reason
                                                   for s in collector.samples.values())),
        "samples_per_question": {str(k): per_question[k] for k in sorted(per_question)},
        "usable_per_question": {str(k): v for k, v in
                                sorted(collections.Counter(usable.values()).items())},
        "adaptive": {**dataclasses.asdict(adaptive),
                     "questions_short": [uid for uid, n in usable.items()
                                         if adaptive.target and n < adaptive.target]},
        "api": stats.as_dict() if stats is not None else None,
    }
