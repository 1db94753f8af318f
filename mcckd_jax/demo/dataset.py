"""The demo data set: disjoint train/dev/test problems and their records in the MCC-KD format.

Splits are disjoint in arithmetic, not only in wording: a problem's (kind, numbers) key is
hashed with the seed into one split, with shares proportional to the requested sizes, so a test
question never repeats a training question with other names or nouns, and every story kind
appears in every split. Within a split each key appears once.

Train records carry several teacher-style rationales per question (some wrong, some repeated),
which is what `mcckd-prepare` reads; dev and test records carry one reference rationale, like
the GSM8K files of the MCC-KD release.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from mcckd_jax.demo import problems, stories

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
    """Sizes and randomness of the demo data."""

    train: int = 3000  # training questions
    dev: int = 200  # dev questions (model selection during training)
    test: int = 500  # held-out test questions
    rationales_per_question: int = 8  # teacher draws per training question, duplicates kept
    wrong_share: float = 0.25  # probability that a teacher draw is wrong
    seed: int = 0
    kinds: tuple[str, ...] = ()  # story kinds to draw from (stories.KINDS); empty: all of them
    max_quantity: int = problems.MAX_QUANTITY  # largest number in any question or rationale

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(stories.KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; expected some of {sorted(stories.KINDS)}")
        for split in SPLITS:
            if getattr(self, split) < 0:
                raise ValueError(f"{split} must be >= 0, got {getattr(self, split)}")
        if self.train + self.dev + self.test == 0:
            raise ValueError("ask for at least one question")
        if self.rationales_per_question < 1:
            raise ValueError("rationales_per_question must be >= 1, got "
                             f"{self.rationales_per_question}")
        if not 10 <= self.max_quantity <= problems.MAX_QUANTITY:
            raise ValueError(f"max_quantity must be in [10, {problems.MAX_QUANTITY}], got "
                             f"{self.max_quantity}")
        if not 0.0 <= self.wrong_share < 1.0:
            raise ValueError(f"wrong_share must be in [0, 1), got {self.wrong_share}")

    def sizes(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in SPLITS}


def split_of(key: tuple, seed: int, sizes: Mapping[str, int]) -> str:
    """The split a problem key belongs to: a seeded hash, shares proportional to `sizes`."""
    position = zlib.crc32(f"{seed}:{key!r}".encode()) / 2**32
    total, bound = sum(sizes.values()), 0.0
    for split in SPLITS:
        bound += sizes[split] / total
        if position < bound:
            return split
    return next(split for split in reversed(SPLITS) if sizes[split])  # rounding at the top


def draw_splits(config: DemoDataConfig, *, patience: int = 50_000
                ) -> dict[str, list[problems.Problem]]:
    """Problems per split, disjoint in arithmetic and distinct within each split.

    Raises:
      ValueError: a split ran out of distinct problems (`patience` draws in a row rejected).
    """
    sizes = config.sizes()
    drawn: dict[str, list[problems.Problem]] = {}
    for split in SPLITS:
        rng = random.Random(f"{config.seed}:{split}")
        seen, chosen, rejected = set(), [], 0
        while len(chosen) < sizes[split]:
            problem = stories.draw_problem(rng, config.kinds, config.max_quantity)
            if problem.key in seen or split_of(problem.key, config.seed, sizes) != split:
                rejected += 1
                if rejected > patience:
                    raise ValueError(f"only {len(chosen)} distinct {split} problems could be "
                                     f"drawn; ask for fewer than {sizes[split]}")
                continue
            seen.add(problem.key)
            chosen.append(problem)
            rejected = 0
        drawn[split] = chosen
    return drawn


def train_records(train: Sequence[problems.Problem], config: DemoDataConfig
                  ) -> tuple[list[dict[str, Any]], list[list[problems.Rationale]]]:
    """MCC-KD training records (`instruction`, `output` list, `label`) and the rationales."""
    rng = random.Random(f"{config.seed}:teacher")
    drafts = [problems.teacher_rationales(p, rng, config.rationales_per_question,
                                          config.wrong_share) for p in train]
    rows = [{"instruction": p.question, "output": [r.text for r in drawn], "label": str(p.answer)}
            for p, drawn in zip(train, drafts)]
    return rows, drafts


def eval_records(split: Sequence[problems.Problem]) -> list[dict[str, Any]]:
    """MCC-KD evaluation records: the question, one reference rationale, the label."""
    return [{"instruction": p.question, "output": problems.reference_rationale(p).text,
             "label": str(p.answer)} for p in split]


def json_list(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list with one record per line: readable, diffable, and what `read_records` reads."""
    return "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n"


def statistics(splits: Mapping[str, Sequence[problems.Problem]],
               drafts: Sequence[Sequence[problems.Rationale]]) -> dict[str, Any]:
    """Counts that describe the generated data (printed by mcckd-demo-data)."""
    texts = [r.text for drawn in drafts for r in drawn]
    distinct_correct = [len({r.text for r in drawn if r.correct}) for drawn in drafts]
    return {
        "questions": {split: len(items) for split, items in splits.items()},
        "kinds": dict(sorted(collections.Counter(p.kind for items in splits.values()
                                                 for p in items).items())),
        "rationales": len(texts),
        "wrong": sum(not r.correct for drawn in drafts for r in drawn),
        "exact_duplicates": sum(len(drawn) - len({r.text for r in drawn}) for drawn in drafts),
        "mean_distinct_correct": (sum(distinct_correct) / len(distinct_correct)
                                  if distinct_correct else 0.0),
        "max_answer": max((p.answer for items in splits.values() for p in items), default=0),
    }
