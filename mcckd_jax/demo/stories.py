"""The story kinds of the demo problems: question templates, plans and their phrasings.

Each kind is a function `(rng) -> Problem | None` that draws small quantities, fills a question
template and lists the plans (step orders or intermediate quantities) that solve it. A draw
that breaks a plan's constraints (a remainder, a number above 99) returns None and the caller
draws again; `problems.checked` verifies that every plan reaches the same answer.

Phrasings avoid words the answer extractor treats specially ("because", "if", "note",
parentheses), so that every rationale's final number is the one it states.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mcckd_jax.demo.problems import MAX_QUANTITY, Problem, Step, capped, checked

NAMES = (("Tom", "he", "his"), ("Ann", "she", "her"), ("Ben", "he", "his"),
         ("Mia", "she", "her"), ("Sam", "he", "his"), ("Lily", "she", "her"),
         ("Max", "he", "his"), ("Emma", "she", "her"), ("Leo", "he", "his"),
         ("Zoe", "she", "her"))
ITEMS = ("apples", "stickers", "marbles", "cards", "shells", "stamps", "coins", "eggs")
CONTAINERS = (("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets"))
GOODS = (("pen", "pens"), ("book", "books"), ("cup", "cups"), ("ball", "balls"),
         ("kite", "kites"), ("hat", "hats"))
ANIMALS = ("sheep", "goats", "hens", "cows", "ducks")
FLOWERS = ("roses", "tulips", "daisies", "lilies")
ACTIVITIES = (("reads", "read", "pages"), ("runs", "run", "laps"), ("bakes", "bake", "cookies"),
              ("paints", "paint", "pictures"))


def _people(rng: random.Random) -> dict[str, str]:
    (name, he, his), (other, _, _) = rng.sample(NAMES, 2)
    return {"N": name, "he": he, "He": he.capitalize(), "his": his, "M": other}


def buy_and_give(rng: random.Random) -> Problem | None:
    a, b, c = rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 9)
    d = rng.randint(2, a)
    (container, containers) = rng.choice(CONTAINERS)
    w = {**_people(rng), "items": rng.choice(ITEMS), "containers": containers,
         "container": container, "a": a, "b": b, "c": c, "d": d}
    question = ("{N} has {a} {items}. {He} buys {b} {containers} with {c} {items} each. "
                "{He} gives {d} {items} to {M}. How many {items} does {N} have now?")
    bought = Step("bought", "*", b, c, ("{He} buys {calc} {items}.",
                                        "The {containers} hold {calc} {items}."))
    plans = [
        (bought,
         Step("total", "+", a, "bought", ("Then {he} has {calc} {items}.",
                                          "Now {N} has {calc} {items}.")),
         Step("left", "-", "total", d, ("After giving {d} away, {he} has {calc} {items}.",
                                        "{He} gives {d} to {M}, so {he} has {calc} {items} left."))),
        (Step("kept", "-", a, d, ("{N} gives away {d} of {his} {a} {items}: {calc}.",
                                  "Without the {d} given to {M}, {N} has {calc} {items}.")),
         bought,
         Step("left", "+", "kept", "bought", ("With the new {items}, {he} has {calc} {items}.",
                                              "So {N} now has {calc} {items}."))),
        (bought,
         Step("spare", "-", "bought", d, ("{He} gives {d} of the new {items} away, keeping "
                                          "{calc}.", "Of the new {items}, {calc} are left.")),
         Step("left", "+", a, "spare", ("{N} has {calc} {items} now.",
                                        "Together with {his} first {a}, {he} has {calc}."))),
    ]
    return checked("buy_and_give", (a, b, c, d), question, w, plans,
                   "So {N} has {answer} {items} now.")


def together(rng: random.Random) -> Problem | None:
    a, b = rng.randint(5, 45), rng.randint(2, 15)
    more = rng.random() < 0.5
    op = "+" if more else "-"
    w = {**_people(rng), "items": rng.choice(ITEMS), "a": a, "b": b,
         "more": "more" if more else "fewer"}
    question = ("{N} has {a} {items}. {M} has {b} {more} {items} than {N}. "
                "How many {items} do they have together?")
    plans = [
        (Step("other", op, a, b, ("{M} has {calc} {items}.", "{M} has {calc}.")),
         Step("total", "+", a, "other", ("Together they have {calc} {items}.",
                                         "In all they have {calc} {items}."))),
        (Step("twice", "*", a, 2, ("Twice {N}'s {items} is {calc}.",
                                   "Two times {a} is {calc}.")),
         Step("total", op, "twice", b, ("{M} has {b} {more}, so together they have {calc} "
                                        "{items}.", "So they have {calc} {items}."))),
        (Step("twice", "+", a, a, ("{N}'s {items} counted twice make {calc}.",
                                   "Counting {a} twice gives {calc}.")),
         Step("total", op, "twice", b, ("With {M}'s {b} {more}, they have {calc} {items}.",
                                        "They have {calc} {items} together."))),
    ]
    return checked("together", (a, b, int(more)), question, w, plans,
                   "They have {answer} {items} together.")


def share(rng: random.Random) -> Problem | None:
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 8)
    if (a * b) % c or a * b // c < 2:
        return None
    (container, containers) = rng.choice(CONTAINERS)
    w = {**_people(rng), "items": rng.choice(ITEMS), "containers": containers,
         "container": container, "a": a, "b": b, "c": c}
    question = ("{N} has {a} {containers} with {b} {items} in each. {He} shares all the {items} "
                "equally among {c} friends. How many {items} does each friend get?")
    plans = [(Step("total", "*", a, b, ("There are {calc} {items} in all.",
                                        "{N} has {calc} {items}.")),
              Step("each", "/", "total", c, ("Each friend gets {calc} {items}.",
                                             "Shared by {c}, that is {calc} {items} each.")))]
    if a % c == 0:
        plans.append((Step("per", "/", a, c, ("Each friend gets {calc} {containers}.",
                                              "The {containers} split into {calc} each.")),
                       Step("each", "*", "per", b, ("That is {calc} {items} per friend.",
                                                    "So each friend gets {calc} {items}."))))
    if b % c == 0:
        plans.append((Step("part", "/", b, c, ("From every {container} each friend gets "
                                               "{calc} {items}.", "One {container} gives each "
                                               "friend {calc} {items}.")),
                       Step("each", "*", a, "part", ("Over {a} {containers} that is {calc} "
                                                     "{items}.", "So each friend gets {calc} "
                                                     "{items}."))))
    return checked("share", (a, b, c), question, w, plans, "Each friend gets {answer} {items}.")


def shop(rng: random.Random) -> Problem | None:
    (one, ones), (two, twos) = rng.sample(GOODS, 2)
    p, q, m, n = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 5), rng.randint(2, 5)
    w = {**_people(rng), "one": one, "ones": ones, "two": two, "twos": twos,
         "p": p, "q": q, "m": m, "n": n}
    question = ("A {one} costs {p} dollars and a {two} costs {q} dollars. {N} buys {m} {ones} "
                "and {n} {twos}. How many dollars does {N} spend?")
    first = Step("first", "*", m, p, ("The {ones} cost {calc} dollars.",
                                      "{m} {ones} cost {calc} dollars."))
    second = Step("second", "*", n, q, ("The {twos} cost {calc} dollars.",
                                        "{n} {twos} cost {calc} dollars."))
    plans = [
        (first, second, Step("total", "+", "first", "second", (
            "In total {he} spends {calc} dollars.", "{N} spends {calc} dollars."))),
        (second, first, Step("total", "+", "second", "first", (
            "Together that is {calc} dollars.", "So {he} spends {calc} dollars."))),
        (Step("first", "*", p, m, ("Each {one} is {p} dollars, so the {ones} cost {calc}.",)),
         Step("second", "*", q, n, ("Each {two} is {q} dollars, so the {twos} cost {calc}.",)),
         Step("total", "+", "first", "second", ("{N} pays {calc} dollars.",
                                                "The bill is {calc} dollars."))),
    ]
    return checked("shop", (p, q, m, n), question, w, plans, "{N} spends {answer} dollars.")


def farm(rng: random.Random) -> Problem | None:
    a, b, c, d = rng.randint(20, 60), rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 20)
    w = {"animals": rng.choice(ANIMALS), "a": a, "b": b, "c": c, "d": d}
    question = ("A farm has {a} {animals}. {b} {animals} run away on Monday and {c} run away on "
                "Tuesday. Then the farmer buys {d} more. How many {animals} are on the farm now?")
    gained = ("With {d} new ones there are {calc} {animals}.",
              "After buying {d} more, the farm has {calc} {animals}.")
    plans = [
        (Step("monday", "-", a, b, ("After Monday there are {calc} {animals}.",
                                    "On Monday {b} run away, leaving {calc}.")),
         Step("tuesday", "-", "monday", c, ("After Tuesday there are {calc} {animals}.",
                                            "On Tuesday {c} run away, leaving {calc}.")),
         Step("now", "+", "tuesday", d, gained)),
        (Step("lost", "+", b, c, ("In all {calc} {animals} run away.",
                                  "The farm loses {calc} {animals}.")),
         Step("stayed", "-", a, "lost", ("That leaves {calc} {animals}.",
                                         "So {calc} {animals} stay.")),
         Step("now", "+", "stayed", d, gained)),
        (Step("bought", "+", a, d, ("Counting the {d} bought, there are {calc} {animals}.",
                                    "Adding the new ones gives {calc}.")),
         Step("monday", "-", "bought", b, ("Taking away Monday's {b} gives {calc}.",
                                           "Without Monday's {b} there are {calc}.")),
         Step("now", "-", "monday", c, ("Taking away Tuesday's {c} gives {calc} {animals}.",
                                        "Without Tuesday's {c} there are {calc} {animals}."))),
    ]
    return checked("farm", (a, b, c, d), question, w, plans,
                   "There are {answer} {animals} on the farm now.")


def garden(rng: random.Random) -> Problem | None:
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    c = rng.randint(2, b - 1)
    plants = rng.random() < 0.5
    op = "+" if plants else "-"
    w = {**_people(rng), "flowers": rng.choice(FLOWERS), "a": a, "b": b, "c": c}
    if plants:
        question = ("A garden has {a} rows with {b} {flowers} in each row. {N} plants {c} more "
                    "{flowers} in every row. How many {flowers} are in the garden now?")
        w.update(changed="planted", verb="plants", row_left="Each row now has")
        ending = "{answer} {flowers} are in the garden now."
    else:
        question = ("A garden has {a} rows with {b} {flowers} in each row. {N} picks {c} {flowers} "
                    "from every row. How many {flowers} are left in the garden?")
        w.update(changed="picked", verb="picks", row_left="Each row has")
        ending = "{answer} {flowers} are left in the garden."
    row = Step("row", op, b, c, ("{row_left} {calc} {flowers}.",
                                 "Every row ends with {calc} {flowers}."))
    plans = [
        (row, Step("now", "*", a, "row", ("The garden has {calc} {flowers}.",
                                          "So the garden has {calc} {flowers}."))),
        (row, Step("now", "*", "row", a, ("Over {a} rows that is {calc} {flowers}.",
                                          "The {a} rows hold {calc} {flowers}."))),
        (Step("had", "*", a, b, ("The garden had {calc} {flowers}.",
                                 "At first there are {calc} {flowers}.")),
         Step("changed", "*", a, c, ("{N} {verb} {calc} {flowers}.",
                                     "In all {calc} {flowers} are {changed}.")),
         Step("now", op, "had", "changed", ("So the garden has {calc} {flowers}.",
                                            "That makes {calc} {flowers}."))),
    ]
    return checked("garden", (a, b, c, int(plants)), question, w, plans, ending)


def three_days(rng: random.Random) -> Problem | None:
    a, b, c = rng.randint(2, 15), rng.randint(2, 4), rng.randint(2, 20)
    verbs, verb, unit = rng.choice(ACTIVITIES)
    w = {**_people(rng), "verbs": verbs, "verb": verb, "unit": unit, "a": a, "b": b, "c": c}
    question = ("{N} {verbs} {a} {unit} on Monday. On Tuesday {he} {verbs} {b} times as many "
                "{unit}. On Wednesday {he} {verbs} {c} {unit}. How many {unit} does {N} {verb} "
                "in the three days?")
    tuesday = Step("tuesday", "*", a, b, ("On Tuesday {he} {verbs} {calc} {unit}.",
                                          "Tuesday has {calc} {unit}."))
    plans = [
        (tuesday,
         Step("two", "+", a, "tuesday", ("Monday and Tuesday make {calc} {unit}.",
                                         "The first two days give {calc}.")),
         Step("all", "+", "two", c, ("In the three days {he} {verbs} {calc} {unit}.",
                                     "Adding Wednesday gives {calc} {unit}."))),
        (Step("ends", "+", a, c, ("Monday and Wednesday make {calc} {unit}.",
                                  "Without Tuesday {he} {verbs} {calc} {unit}.")),
         tuesday,
         Step("all", "+", "ends", "tuesday", ("So {he} {verbs} {calc} {unit}.",
                                              "All together that is {calc} {unit}."))),
        (Step("times", "+", 1, b, ("Monday and Tuesday are {calc} times Monday.",)),
         Step("two", "*", "times", a, ("That is {calc} {unit}.",
                                       "So the first two days give {calc} {unit}.")),
         Step("all", "+", "two", c, ("With Wednesday {he} {verbs} {calc} {unit}.",
                                     "In all {N} {verbs} {calc} {unit}."))),
    ]
    return checked("three_days", (a, b, c), question, w, plans,
                   "{N} {verbs} {answer} {unit} in the three days.")


KINDS = {kind.__name__: kind for kind in (buy_and_give, together, share, shop, farm, garden,
                                          three_days)}


def draw_problem(rng: random.Random, kinds: Sequence[str] | None = None,
                 max_quantity: int = MAX_QUANTITY, *, patience: int = 10_000) -> Problem:
    """A problem of a random kind among `kinds` (default all), its numbers redrawn until valid
    and none of them, in the question or any rationale, is above `max_quantity`.

    The kind is chosen once, before the redraws, so that kinds with more constraints (sharing
    without remainder) are as frequent as the others.

    Raises:
      ValueError: `patience` draws in a row of the chosen kind stayed above `max_quantity`.
    """
    kind = rng.choice(sorted(kinds or KINDS))
    for _ in range(patience):
        problem = KINDS[kind](rng)
        if problem is not None:
            problem = capped(problem, max_quantity)
        if problem is not None:
            return problem
    raise ValueError(f"no {kind} problem has all its numbers at most {max_quantity}; "
                     "raise max_quantity or leave that kind out")
