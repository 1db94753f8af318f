"""Demo problems: plan arithmetic, rendering, corruptions, and the answer extractor on every
rationale kind (problems.py and stories.py)."""

import operator
import random
import re

import pytest

from mcckd_jax.data import answers
from mcckd_jax.demo import problems, stories
from mcckd_jax.demo.problems import Step

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _brief_example() -> problems.Problem:
    """The example of the issue: 12 apples, 3 bags of 4, 5 given away: 12 + 12 - 5 = 19."""
    words = {"N": "Tom", "he": "he", "He": "He", "M": "Ann", "items": "apples"}
    question = ("{N} has 12 {items}. {He} buys 3 bags with 4 {items} each. {He} gives 5 to {M}. "
                "How many {items} does {he} have now?")
    bought = Step("bought", "*", 3, 4, ("{He} buys {calc} {items}.",))
    plans = [(bought,
              Step("total", "+", 12, "bought", ("Then {he} has {calc} {items}.",)),
              Step("left", "-", "total", 5, ("{He} gives 5 to {M} and has {calc} {items}.",))),
             (Step("kept", "-", 12, 5, ("Without the 5, {N} has {calc} {items}.",)),
              bought,
              Step("left", "+", "kept", "bought", ("Now {he} has {calc} {items}.",)))]
    problem = problems.checked("example", (12, 3, 4, 5), question, words, plans,
                               "So {N} has {answer} {items} now.")
    assert problem is not None
    return problem


def test_work_follows_the_plan_and_carries_a_corruption_to_the_end():
    plan = _brief_example().plans[0]
    assert problems.work(plan) == [(3, "*", 4, 12), (12, "+", 12, 24), (24, "-", 5, 19)]
    assert problems.work(plan, (0, "slip", 1)) == [(3, "*", 4, 13), (12, "+", 13, 25),
                                                   (25, "-", 5, 20)]
    assert problems.work(plan, (2, "operation", "+"))[-1] == (24, "+", 5, 29)
    assert problems.work(plan, (1, "slip", -30)) is None  # below zero
    assert problems.work((Step("x", "/", 7, 2, ("",)),)) is None  # a remainder
    assert problems.work((Step("x", "*", 10, 10, ("",)),)) is None  # above 99


def test_render_writes_the_hand_worked_rationales():
    problem = _brief_example()
    assert problem.question == ("Tom has 12 apples. He buys 3 bags with 4 apples each. He gives "
                                "5 to Ann. How many apples does he have now?")
    assert problem.answer == 19
    assert problems.render(problem, 1, [0, 0, 0], "So {N} has {answer} {items} now.") == \
        problems.Rationale("Without the 5, Tom has 12 - 5 = 7 apples. He buys 3 * 4 = 12 apples. "
                           "Now he has 7 + 12 = 19 apples. So Tom has 19 apples now.", 19, True)
    assert problems.reference_rationale(problem).text == (
        "He buys 3 * 4 = 12 apples. Then he has 12 + 12 = 24 apples. He gives 5 to Ann and has "
        "24 - 5 = 19 apples. Therefore, the answer is 19.")
    slipped = problems.render(problem, 0, [0, 0, 0], "", (1, "slip", 2))
    assert slipped.text.endswith("Then he has 12 + 12 = 26 apples. He gives 5 to Ann and has "
                                 "26 - 5 = 21 apples.")
    assert (slipped.answer, slipped.correct) == (21, False)


def test_plans_that_disagree_are_a_bug_in_the_story():
    with pytest.raises(ValueError, match="disagree"):
        problems.checked("bad", (1,), "Q", {}, [(Step("x", "+", 1, 2, ("",)),),
                                                 (Step("x", "*", 1, 2, ("",)),)], "")


def _closed_form(problem: problems.Problem) -> int:
    """The answer computed from the question's own numbers, independently of the plans."""
    n = [int(x) for x in re.findall(r"\d+", problem.question)]
    if problem.kind == "buy_and_give":
        return n[0] + n[1] * n[2] - n[3]
    if problem.kind == "together":
        return 2 * n[0] + (n[1] if " more " in problem.question else -n[1])
    if problem.kind == "share":
        return n[0] * n[1] // n[2]
    if problem.kind == "shop":
        return n[0] * n[2] + n[1] * n[3]
    if problem.kind == "farm":
        return n[0] - n[1] - n[2] + n[3]
    if problem.kind == "garden":
        return n[0] * (n[1] + (n[2] if " plants " in problem.question else -n[2]))
    assert problem.kind == "three_days"
    return n[0] + n[0] * n[1] + n[2]


@pytest.fixture(scope="module")
def drawn():
    """1,000 problems with 8 teacher draws each (30% wrong): 8,000 rationales."""
    rng = random.Random(1234)
    items = [stories.draw_problem(rng) for _ in range(1000)]
    return [(p, problems.teacher_rationales(p, rng, 8, 0.3)) for p in items]


def test_every_kind_is_drawn_and_answers_match_the_closed_form(drawn):
    assert {p.kind for p, _ in drawn} == set(stories.KINDS)
    for problem, _ in drawn:
        assert problem.answer == _closed_form(problem), problem.question


def test_the_extractor_reads_the_intended_answer_of_every_rationale(drawn):
    wrong = 0
    for problem, rationales in drawn:
        for rationale in rationales:
            for question in (None, problem.question):
                found = answers.extract_answer(rationale.text, problems.DEMO_TASK,
                                               question=question)
                assert found == str(rationale.answer), (problem.question, rationale.text)
            assert answers.answers_match(str(rationale.answer), str(problem.answer),
                                         problems.DEMO_TASK) == rationale.correct
            wrong += not rationale.correct
    assert 0.25 < wrong / (8 * len(drawn)) < 0.35


def test_correct_rationales_compute_correctly_and_numbers_stay_small(drawn):
    for problem, rationales in drawn:
        assert all(int(x) <= 99 for x in re.findall(r"\d+", problem.question))
        for rationale in rationales:
            assert all(int(x) <= 99 for x in re.findall(r"\d+", rationale.text))
            if not rationale.correct:
                continue
            equations = _EQUATION.findall(rationale.text)
            assert 2 <= len(equations) <= 3, rationale.text
            for left, op, right, result in equations:
                operation = {"+": operator.add, "-": operator.sub, "*": operator.mul,
                             "/": operator.truediv}[op]
                assert operation(int(left), int(right)) == int(result), rationale.text
            assert int(equations[-1][3]) == problem.answer


def test_every_kind_has_plans_with_different_intermediate_quantities(drawn):
    varied = set()
    for problem, _ in drawn:
        intermediates = {tuple(c[3] for c in problems.work(plan)[:-1]) for plan in problem.plans}
        if len(intermediates) > 1:
            varied.add(problem.kind)
    assert varied == set(stories.KINDS)


def test_the_vocabulary_is_modest_and_rationales_are_short(drawn):
    words = set()
    for problem, rationales in drawn:
        words.update(re.findall(r"[A-Za-z']+", problem.question))
        for rationale in rationales:
            words.update(re.findall(r"[A-Za-z']+", rationale.text))
            assert len(rationale.text.split()) <= 45, rationale.text
    assert len(words) < 250


def test_draws_come_from_the_kinds_asked_for():
    rng = random.Random(0)
    assert {stories.draw_problem(rng, ["shop", "farm"]).kind for _ in range(50)} == {"shop",
                                                                                   "farm"}


def test_draws_depend_only_on_the_seed():
    def questions(seed):
        rng = random.Random(seed)
        return [stories.draw_problem(rng).question for _ in range(20)]

    assert questions(5) == questions(5)
    assert questions(5) != questions(6)


def test_capped_keeps_a_problem_only_when_every_plan_stays_under_the_cap():
    problem = _brief_example()  # largest number: 24, in plan 0's "12 + 12 = 24"
    assert problems.capped(problem, 24).max_quantity == 24
    assert problems.capped(problem, 23) is None
    assert problems.capped(problem, 11) is None  # the question's 12 is above
    assert problems.work(problem.plans[1], max_quantity=19) is not None  # 7, 12, 19
    assert problems.work(problem.plans[1], (2, "slip", 1), max_quantity=19) is None


@pytest.mark.parametrize("max_quantity", [25, 40])
def test_a_small_max_quantity_bounds_every_number_of_every_rationale(max_quantity):
    rng = random.Random(7)
    seen_wrong = 0
    for _ in range(300):
        problem = stories.draw_problem(rng, max_quantity=max_quantity)
        assert max(int(x) for x in re.findall(r"\d+", problem.question)) <= max_quantity
        for rationale in problems.teacher_rationales(problem, rng, 8, 0.3):
            numbers = [int(x) for x in re.findall(r"\d+", rationale.text)]
            assert max(numbers) <= max_quantity, rationale.text
            assert answers.extract_answer(rationale.text, problems.DEMO_TASK,
                                          question=problem.question) == str(rationale.answer)
            assert rationale.correct == (rationale.answer == problem.answer)
            seen_wrong += not rationale.correct
    assert seen_wrong > 300


def test_a_cap_no_problem_of_the_kind_fits_is_a_clear_error():
    with pytest.raises(ValueError, match="no farm problem has all its numbers at most 10"):
        stories.draw_problem(random.Random(0), ["farm"], 10, patience=200)


def test_the_default_cap_draws_the_same_problems_as_no_cap():
    first, second = random.Random(3), random.Random(3)
    for _ in range(50):
        assert stories.draw_problem(first) == stories.draw_problem(
            second, max_quantity=problems.MAX_QUANTITY)
