"""Scoring on hand-written outputs whose answers were worked out by hand."""

import pytest

from mcckd_jax.data.records import Record
from mcckd_jax.eval import scoring

NATALIA = Record(question="Natalia sold clips to 48 of her friends in April, and then she sold "
                          "half as many clips in May. How many clips did Natalia sell altogether "
                          "in April and May?", label="72", uid="q0")
WENG = Record(question="Weng earns $12 an hour for babysitting. Yesterday, she just did 50 "
                       "minutes of babysitting. How much did she earn?", label="10", uid="q1")


@pytest.mark.parametrize("output, extracted, correct", [
    ("In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. "
     "The answer is 72.", "72", True),
    ("She sold 48 + 48 = 96 clips. The answer is 96.", "96", False),
    ("The answer is 72.0", "72", True),  # 72.0 and 72 are the same number
    ("I am not sure how to solve this.", None, False),  # no answer: wrong and missing
    ("", None, False),
])
def test_single_outputs(output, extracted, correct):
    prediction = scoring.score(NATALIA, [output], "gsm8k")
    assert (prediction.extracted, prediction.correct) == (extracted, correct)
    assert prediction.to_json() == {"id": "q0", "question": NATALIA.question, "output": output,
                                    "extracted": extracted, "label": "72", "correct": correct}


def test_dollar_answers_match_plain_labels():
    output = "She earns 12 / 60 = $0.2 per minute. So she earned 0.2 x 50 = $10. The answer is $10."
    prediction = scoring.score(WENG, [output], "gsm8k")
    assert prediction.extracted == "10" and prediction.correct


def test_majority_vote():
    assert scoring.majority_vote(["3", "5", "5", None, None, None]) == "5"  # None never wins
    assert scoring.majority_vote(["7", "3", "3", "7"]) == "7"  # tie: the first seen
    assert scoring.majority_vote([None, None]) is None
    assert scoring.majority_vote([]) is None


def test_self_consistency_votes_over_samples():
    outputs = ["48 + 48 = 96. The answer is 96.", "48 + 24 = 72. The answer is 72.",
               "No idea.", "Half of 48 is 24, and 48 + 24 = 72. The answer is 72."]
    prediction = scoring.score(NATALIA, outputs, "gsm8k")
    assert prediction.extracted == "72" and prediction.correct
    assert prediction.output == outputs[0]
    assert prediction.sample_answers == ("96", "72", None, "72")
    row = prediction.to_json()
    assert row["samples"] == outputs and row["sample_answers"] == ["96", "72", None, "72"]


def test_summary_counts_missing_answers_as_wrong():
    predictions = [scoring.score(NATALIA, ["The answer is 72."], "gsm8k"),
                   scoring.score(NATALIA, ["The answer is 71."], "gsm8k"),
                   scoring.score(WENG, ["Hmm."], "gsm8k"),
                   scoring.score(WENG, ["The answer is 10."], "gsm8k")]
    assert scoring.summarize(predictions) == {"questions": 4, "correct": 2, "missing": 1,
                                              "accuracy": 0.5, "missing_rate": 0.25}
    assert scoring.summarize([])["accuracy"] == 0.0


def test_no_output_is_an_error():
    with pytest.raises(ValueError, match="q0"):
        scoring.score(NATALIA, [], "gsm8k")
