"""Token spans from character offsets, and agreement of span ids, on hand-made offsets."""

import pytest

from mcckd_jax.data.spans import agreeing_group, token_span

TEXT = "Therefore, the answer is 5700."
#        0         1         2
#        0123456789012345678901234567890


@pytest.mark.parametrize("offsets,expected", [
    # Digits one per token, the space its own token (SmolLM2-like).
    ([(0, 9), (9, 10), (10, 14), (14, 21), (21, 24), (24, 25), (25, 26), (26, 27), (27, 28),
      (28, 29), (29, 30)], (6, 10)),
    # "▁57" / "00" / "." with trimmed offsets (sentencepiece-like).
    ([(0, 9), (9, 10), (11, 14), (15, 21), (22, 24), (25, 27), (27, 29), (29, 30)], (5, 7)),
    # " 5700" with its leading space inside the token (byte-level BPE without trimming).
    ([(0, 9), (9, 10), (10, 14), (14, 21), (21, 24), (24, 29), (29, 30)], (5, 6)),
    # A zero-width special token before the answer covers nothing.
    ([(0, 24), (25, 25), (25, 29), (29, 30)], (2, 3)),
])
def test_token_span_covers_exactly_the_answer(offsets, expected):
    assert TEXT[25:29] == "5700"
    assert token_span(TEXT, offsets, 25, 29) == expected


@pytest.mark.parametrize("offsets", [
    [(0, 24), (24, 27), (27, 30)],  # " 57" then "00." runs past the answer
    [(0, 26), (26, 29), (29, 30)],  # "...is 5" starts inside other text
    [(0, 10), (10, 24)],  # nothing overlaps the answer
])
def test_token_span_rejects_tokens_reaching_outside_the_answer(offsets):
    assert token_span(TEXT, offsets, 25, 29) is None


def test_agreeing_group_keeps_the_largest_then_earliest_group():
    assert agreeing_group([(5, 7), (5, 7, 0), (5, 7), (9,)]) == [0, 2]
    assert agreeing_group([(1,), (2,), (2,), (1,)]) == [0, 3]
    assert agreeing_group([]) == []
