"""Choosing which teacher rationales of a question to keep.

Per question: drop rationales whose final answer is wrong, drop exact and near duplicates, then
keep up to K rationales. The MCC-KD paper keeps a diverse subset, measuring overlap with n-gram
Jaccard similarity; the "diverse" policy picks the K-subset with the lowest mean pairwise
similarity (exhaustively when the number of subsets is small, greedily otherwise). "random" and
"first" are baselines. Everything is deterministic under the seed: ties are broken by a
permutation drawn from (seed, question text).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from mcckd_jax.data import answers

SelectionPolicy = Literal["diverse", "random", "first"]
POLICIES: tuple[str, ...] = ("diverse", "random", "first")

_WORD = re.compile(r"\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How rationales are filtered and chosen per question."""

    num_rationales: int = 4  # K: rationales kept per question (fewer when fewer survive)
    ngram: int = 3  # n of the word n-grams behind the Jaccard similarity
    policy: SelectionPolicy = "diverse"  # "diverse" (least similar K), "random" or "first"
    near_duplicate_threshold: float = 0.9  # Jaccard at or above which a later rationale is dropped
    seed: int = 0  # tie-breaking and the "random" policy
    exhaustive_limit: int = 5000  # most K-subsets searched exactly; greedy search beyond

    def __post_init__(self):
        if self.num_rationales < 1:
            raise ValueError(f"num_rationales must be >= 1, got {self.num_rationales}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError("near_duplicate_threshold must be in (0, 1], got "
                             f"{self.near_duplicate_threshold}")


@dataclasses.dataclass(frozen=True)
class QuestionSelection:
    """Outcome for one question: kept rationale indices (into the input) and why others went."""

    kept: tuple[int, ...]
    wrong_answer: tuple[int, ...] = ()
    exact_duplicate: tuple[int, ...] = ()
    near_duplicate: tuple[int, ...] = ()
    over_limit: tuple[int, ...] = ()  # correct and distinct, but not among the K chosen


def word_ngrams(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """Set of lowercased word/punctuation n-grams; a text shorter than n is one gram."""
    words = tuple(_WORD.findall(text.lower()))
    if len(words) <= n:
        return frozenset([words])
    return frozenset(words[i:i + n] for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b|; 1.0 for two empty sets."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def mean_pairwise_jaccard(grams: Sequence[frozenset]) -> float | None:
    """Mean Jaccard similarity over unordered pairs; None for fewer than two sets."""
    pairs = list(itertools.combinations(grams, 2))
    return None if not pairs else sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def question_rng(seed: int, question: str) -> np.random.Generator:
    """A generator that depends on the seed and the question text, not on record order."""
    return np.random.default_rng([seed, zlib.crc32(question.encode("utf-8"))])


def _similarity_matrix(grams: Sequence[frozenset]) -> np.ndarray:
    size = len(grams)
    matrix = np.eye(size)
    for i, j in itertools.combinations(range(size), 2):
        matrix[i, j] = matrix[j, i] = jaccard(grams[i], grams[j])
    return matrix


def select_diverse(similarity: np.ndarray, k: int, order: Sequence[int],
                   exhaustive_limit: int) -> list[int]:
    """Indices of k items with low mean pairwise similarity.

    Exhaustive over all k-subsets when there are at most `exhaustive_limit` of them (the
    minimum is exact), otherwise greedy: start from the item least similar on average to the
    others, then repeatedly add the item with the lowest total similarity to those chosen.
    `order` (a permutation of the items) breaks ties: earlier in `order` wins.
    """
    size = similarity.shape[0]
    if k >= size:
        return list(order)
    if math.comb(size, k) <= exhaustive_limit:
        best, best_score = None, math.inf
        for subset in itertools.combinations(order, k):
            rows = np.asarray(subset)
            score = similarity[np.ix_(rows, rows)].sum()
            if score < best_score - 1e-12:
                best, best_score = list(subset), score
        return best
    remaining = list(order)
    first = min(remaining, key=lambda i: similarity[i].sum())
    chosen = [first]
    remaining.remove(first)
    while len(chosen) < k:
        nxt = min(remaining, key=lambda i: similarity[i, chosen].sum())
        chosen.append(nxt)
        remaining.remove(nxt)
    return chosen


def _deduplicate(candidates: Sequence[int], grams: Sequence[frozenset], texts: Sequence[str],
                 threshold: float) -> tuple[list[int], list[int], list[int]]:
    """Keeps the first of each group of exact or near duplicates, in input order."""
    kept, exact, near = [], [], []
    seen_texts = set()
    for index in candidates:
        normalized = " ".join(texts[index].lower().split())
        if normalized in seen_texts:
            exact.append(index)
        elif any(jaccard(grams[index], grams[other]) >= threshold for other in kept):
            near.append(index)
        else:
            kept.append(index)
            seen_texts.add(normalized)
    return kept, exact, near


def select_rationales(question: str, rationales: Sequence[str], label: str, task: str,
                      config: SelectionConfig) -> QuestionSelection:
    """Filters and chooses the rationales of one question (module docstring)."""
    correct, wrong = [], []
    for index, rationale in enumerate(rationales):
        predicted = answers.extract_answer(rationale, task, question=question)
        (correct if answers.answers_match(predicted, label, task) else wrong).append(index)
    grams = [word_ngrams(r, config.ngram) for r in rationales]
    distinct, exact, near = _deduplicate(correct, grams, rationales,
                                         config.near_duplicate_threshold)
    rng = question_rng(config.seed, question)
    k = config.num_rationales
    if config.policy == "first":
        kept = distinct[:k]
    elif config.policy == "random":
        chosen = rng.permutation(len(distinct))[:k]
        kept = sorted(distinct[position] for position in chosen)
    else:
        similarity = _similarity_matrix([grams[i] for i in distinct])
        order = rng.permutation(len(distinct)).tolist()
        chosen = select_diverse(similarity, k, order, config.exhaustive_limit)
        kept = sorted(distinct[position] for position in chosen)
    over = [i for i in distinct if i not in kept]
    return QuestionSelection(kept=tuple(kept), wrong_answer=tuple(wrong),
                             exact_duplicate=tuple(exact), near_duplicate=tuple(near),
                             over_limit=tuple(over))
