"""Number finding, parsing and formatting against hand-worked examples."""

from fractions import Fraction

import pytest

from mcckd_jax.data.numbers import find_numbers, format_number, parse_number


@pytest.mark.parametrize("text,value", [
    ("18", 18), ("18.0", 18), ("$1,000", 1000), ("$ 1,000.50", Fraction(200_100, 200)),
    ("-3", -3), ("-$9", -9), ("50%", 50), ("3/4", Fraction(3, 4)), (".5", Fraction(1, 2)),
    ("twenty-one", 21), ("three hundred and five", 305), ("Twelve", 12), ("5,700.", 5700),
    ("1,234,567", 1_234_567),
])
def test_parse_number_reads_answer_strings(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["abc", "", "1/0", "12 apples", "1,23"])
def test_parse_number_rejects_what_is_not_one_number(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("value,text", [
    (Fraction(18), "18"), (Fraction(-3), "-3"), (Fraction(1, 2), "0.5"),
    (Fraction(1327, 100), "13.27"), (Fraction(1, 3), "1/3"), (Fraction(-7, 8), "-0.875"),
    (Fraction(10**20 + 1, 10**4), "10000000000000000.0001"),
])
def test_format_number_is_canonical(value, text):
    assert format_number(value) == text
    assert parse_number(text) == value


def _found(text):
    return [(value, text[start:end]) for value, start, end in find_numbers(text)]


def test_find_numbers_keeps_offsets_and_tells_signs_from_subtraction():
    assert _found("Danny has 100 - 68 = 32 more") == [(100, "100"), (68, "68"), (32, "32")]
    assert _found("13-4=9") == [(13, "13"), (4, "4"), (9, "9")]
    assert _found("so -x = -27") == [(-27, "-27")]
    assert _found("he owes -$9 now") == [(-9, "-$9")]
    assert _found("a total of $5,700.") == [(5700, "5,700")]
    assert _found("21/7 = 3") == [(3, "21/7"), (3, "3")]


def test_find_numbers_skips_variables_and_ordinals_but_keeps_glued_units():
    assert _found("30x = 420 and 2s + 16") == [(420, "420"), (16, "16")]
    assert _found("the 6th place, 72Mb per hour") == [(72, "72")]


def test_number_words_count_only_where_there_are_no_digits():
    assert _found("one of them ate three") == [(1, "one"), (3, "three")]
    assert _found("one of them ate 3") == [(3, "3")]
    assert find_numbers("one of them ate three", words=False) == []
