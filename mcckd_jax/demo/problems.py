"""Multi-step arithmetic word problems written by the project, with teacher-style rationales.

The demo needs a distillation data set that exists without downloads and that a student of a
few hundred thousand parameters can learn on a CPU in minutes. A problem is one of a handful of
story kinds (shopping, sharing, rows in a garden, ...) with small integers (every quantity,
intermediate or final, below 100) and two or three arithmetic steps. Each kind has several
*plans*: orders of the steps, or different intermediate quantities, that reach the same answer.

A teacher rationale is a plan said with a random phrasing per step and a random ending (a
general "So the answer is N.", a story sentence, or none at all). A wrong rationale follows a
plan with one arithmetic slip or one wrong operation whose result carries through to the end,
as a sampled LLM rationale goes wrong. Drawing several rationales per question with replacement
gives mcckd-prepare real work: wrong answers to drop, duplicates to remove, and diverse
rationales to choose among. Every rationale's final answer is what the project's extractor
(`answers.extract_answer`, task `DEMO_TASK`) reads from it; the tests check this on thousands.

Everything is a pure function of a `random.Random` that the caller seeds.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

DEMO_TASK = "gsm8k"  # any numeric task of `answers` reads these rationales the same way
REFERENCE_ENDING = "Therefore, the answer is {answer}."  # mcckd-prepare's default sentence
GENERAL_ENDINGS = ("So the answer is {answer}.", REFERENCE_ENDING, "The answer is {answer}.", "")
MAX_QUANTITY = 99  # every number in a rationale stays below 100, which a tiny student can learn

Operand = int | str  # a number, or the name of an earlier step's result


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a plan, `name = left op right`, said in one of `phrasings`.

    A phrasing is a template over the story's words plus `{calc}`, the worked arithmetic
    ("3 * 4 = 12").
    """

    name: str
    op: str  # one of "+", "-", "*", "/"
    left: Operand
    right: Operand
    phrasings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One question with its answer and the plans a rationale may follow."""

    kind: str
    numbers: tuple[int, ...]  # the story's quantities: (kind, numbers) is its arithmetic
    question: str
    answer: int
    words: Mapping[str, str | int]  # names, nouns and quantities the templates refer to
    plans: tuple[tuple[Step, ...], ...]  # each ends with a step whose result is the answer
    story_ending: str  # a final sentence in the story's words, with {answer}
    max_quantity: int = MAX_QUANTITY  # largest number any of its rationales may contain

    @property
    def key(self) -> tuple:
        """Identity of the arithmetic: problems sharing it never go to different splits."""
        return (self.kind, self.numbers)


@dataclasses.dataclass(frozen=True)
class Rationale:
    """A rendered rationale and the final answer it states (wrong ones differ from the label)."""

    text: str
    answer: int
    correct: bool


# --------------------------------------------------------------------------------------------
# Arithmetic of a plan, with an optional corruption
# --------------------------------------------------------------------------------------------

# (step index, "slip", delta) adds delta to that step's result; (step index, "operation", op)
# computes the step with another operator.
Corruption = tuple[int, str, int | str]
_WRONG_OPERATIONS = {"+": ("-", "*"), "-": ("+",), "*": ("+",), "/": ("-", "*")}
_SLIPS = (-10, -2, -1, 1, 2, 10)


def _apply(op: str, left: int, right: int) -> int | None:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left // right if right and left % right == 0 else None


def work(plan: Sequence[Step], corruption: Corruption | None = None,
         max_quantity: int = MAX_QUANTITY) -> list[tuple[int, str, int, int]] | None:
    """(left, op, right, result) of each step, or None when some number leaves
    [0, max_quantity].

    A corruption changes one step; later steps use its (wrong) result, as a reasoner would.
    """
    values: dict[str, int] = {}
    calcs = []
    for index, step in enumerate(plan):
        left, right = (values[o] if isinstance(o, str) else o for o in (step.left, step.right))
        op = step.op
        if corruption is not None and corruption[0] == index and corruption[1] == "operation":
            op = corruption[2]
        result = _apply(op, left, right)
        if result is not None and corruption is not None and corruption[0] == index and (
                corruption[1] == "slip"):
            result += corruption[2]
        if result is None or not 0 <= result <= max_quantity or max(left, right) > max_quantity:
            return None
        values[step.name] = result
        calcs.append((left, op, right, result))
    return calcs


def render(problem: Problem, plan: int, phrasings: Sequence[int], ending: str,
           corruption: Corruption | None = None) -> Rationale | None:
    """The rationale that follows plan `plan` with the given phrasing per step and ending
    template; None when the corruption leaves the range of small numbers."""
    steps = problem.plans[plan]
    calcs = work(steps, corruption, problem.max_quantity)
    if calcs is None:
        return None
    final = calcs[-1][3]
    sentences = [step.phrasings[choice].format(calc=f"{left} {op} {right} = {result}",
                                               **problem.words)
                 for step, choice, (left, op, right, result) in zip(steps, phrasings, calcs)]
    if ending:
        sentences.append(ending.format(answer=final, **problem.words))
    return Rationale(" ".join(sentences), final, final == problem.answer)


def checked(kind: str, numbers: tuple[int, ...], question: str, words: Mapping[str, str | int],
            plans: Sequence[Sequence[Step]], story_ending: str) -> Problem | None:
    """A Problem when every plan works within the small numbers and all reach one answer;
    None otherwise (the story's draw is rejected)."""
    finals = set()
    for plan in plans:
        calcs = work(plan)
        if calcs is None:
            return None
        finals.add(calcs[-1][3])
    if len(finals) != 1:
        raise ValueError(f"the plans of {kind} {numbers} disagree: {sorted(finals)}")
    return Problem(kind=kind, numbers=tuple(numbers), question=question.format(**words),
                   answer=finals.pop(), words=dict(words),
                   plans=tuple(tuple(plan) for plan in plans), story_ending=story_ending)


def capped(problem: Problem, max_quantity: int) -> Problem | None:
    """The problem with every number of its question and its rationales (wrong ones included)
    kept at most `max_quantity`; None when its question or one of its plans goes above."""
    if max(problem.numbers) > max_quantity or any(
            work(plan, max_quantity=max_quantity) is None for plan in problem.plans):
        return None
    return dataclasses.replace(problem, max_quantity=max_quantity)


def reference_rationale(problem: Problem) -> Rationale:
    """The first plan, first phrasings, ending with mcckd-prepare's answer sentence."""
    rationale = render(problem, 0, [0] * len(problem.plans[0]), REFERENCE_ENDING)
    assert rationale is not None and rationale.correct, problem  # stories check their plans
    return rationale


def _random_wording(problem: Problem, plan: int, rng: random.Random) -> tuple[list[int], str]:
    phrasings = [rng.randrange(len(step.phrasings)) for step in problem.plans[plan]]
    return phrasings, rng.choice(GENERAL_ENDINGS + (problem.story_ending,))


def sample_rationale(problem: Problem, rng: random.Random, *, wrong: bool = False) -> Rationale:
    """A teacher-style rationale: random plan, phrasings and ending; with `wrong`, one slip or
    wrong operation makes its final answer differ from the problem's."""
    while True:
        plan = rng.randrange(len(problem.plans))
        phrasings, ending = _random_wording(problem, plan, rng)
        if not wrong:
            return render(problem, plan, phrasings, ending)
        steps = problem.plans[plan]
        index = rng.randrange(len(steps))
        if rng.random() < 0.5:
            corruption = (index, "slip", rng.choice(_SLIPS))
        else:
            corruption = (index, "operation", rng.choice(_WRONG_OPERATIONS[steps[index].op]))
        rationale = render(problem, plan, phrasings, ending, corruption)
        # A corruption can cancel out (0 * 5 either way) or leave the small numbers; redraw.
        if rationale is not None and not rationale.correct:
            return rationale


def teacher_rationales(problem: Problem, rng: random.Random, count: int,
                       wrong_share: float) -> list[Rationale]:
    """`count` independent draws, each wrong with probability `wrong_share` (duplicates kept:
    a sampled teacher repeats itself, and mcckd-prepare must remove them)."""
    return [sample_rationale(problem, rng, wrong=rng.random() < wrong_share)
            for _ in range(count)]
