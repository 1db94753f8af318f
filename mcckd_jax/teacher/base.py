"""What every teacher provides to `mcckd-teacher`: samples for requests, reported as they land.

A teacher writes chain-of-thought rationales for questions. The run asks for sample indices
0..N-1 of each question (more under adaptive sampling); each (question, sample index) is a
`SampleRequest`, and each finished one is handed to `on_sample` at once, so that the run can
append it durably to its cache before it counts as done. Two kinds exist:

* an API teacher (`teacher.api`): any OpenAI-compatible chat-completions endpoint through the
  official `openai` client, concurrent requests, retries with backoff;
* a local teacher (`teacher.local`): a checkpoint that `load_pretrained` reads, sampled with the
  project's KV-cache decoder over the device mesh.

Reproducibility: a sample's randomness depends on (seed, question key, sample index) only, not
on which other requests share its batch or HTTP request, so that a resumed run regenerates
exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How rationales are sampled (what the cache keys on, with the model and the prompt)."""

    temperature: float = 0.7  # 0 is greedy: then every sample of a question is the same
    top_p: float = 1.0  # nucleus mass
    max_tokens: int = 512  # new tokens per rationale
    seed: int = 0  # base seed; each sample's own seed derives from it and its index

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """One rationale to write: sample `sample_index` of the question `question_key`."""

    question_key: str  # stable id of the question in its file (Record.uid)
    messages: tuple[tuple[str, str], ...]  # chat messages as (role, content), prompt applied
    sample_index: int


@dataclasses.dataclass(frozen=True)
class Sample:
    """A finished rationale and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (ended by itself) or "length" (cut at max_tokens)


OnSample = Callable[[SampleRequest, Sample], None]


class Teacher(Protocol):
    """Writes samples for requests."""

    @property
    def model_id(self) -> str:
        """What the cache keys on besides prompt and sampling: the endpoint's model name, or a
        local checkpoint's path and file digest."""

    def generate(self, requests: Sequence[SampleRequest], params: SamplingParams,
                 on_sample: OnSample) -> None:
        """Samples every request and calls `on_sample(request, sample)` as each finishes (in
        any order, from the calling thread). Raises when a request fails for good (after the
        teacher's own retries)."""


def sample_seed(params: SamplingParams, question_key: str, sample_index: int) -> int:
    """A 31-bit seed of one sample, from the run's seed, the question and the index only."""
    digest = hashlib.sha256(f"{params.seed}\0{question_key}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

