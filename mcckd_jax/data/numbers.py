"""Numbers in rationale text: finding them with their offsets, parsing and formatting them.

Values are exact `fractions.Fraction`s, so that 18 == 18.0 == 36/2 and 0.1 + 0.2 == 0.3.
Accepted forms: thousands separators (5,700), decimals (13.27, .5), signs (-27, when the "-"
does not follow an operand: "13-4" is a subtraction), a leading "$", a trailing "%", simple
fractions (3/4), units glued to the digits (72Mb) and number words ("twenty-one", "three
hundred"). A one-letter suffix is an algebra variable (30x, 2s) and ordinals (6th) are positions,
not quantities; neither counts.
"""

from __future__ import annotations

import decimal
import fractions
import re

Number = tuple[fractions.Fraction, int, int]  # (value, start, end): text[start:end] is the number

_NOT_GLUED = r"(?![\d_])(?![A-Za-z](?![A-Za-z]))(?!(?:st|nd|rd|th)\b)"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<int>\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?P<frac>\.\d+)?(?:/(?P<den>\d+))?"
    rf"{_NOT_GLUED}|(?<![\w.])(?P<frac_only>\.\d+){_NOT_GLUED}")
# A "-" right before the digits (or before "$") is a sign unless it follows an operand.
_SIGN_BEFORE = re.compile(r"(?:^|(?<=[^\w)\]]))[-−]\$?$")

_UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
          "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
          "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
          "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
          "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_WORD = "|".join(sorted(_UNITS, key=len, reverse=True))
_NUMBER_WORDS = re.compile(
    rf"\b(?:{_WORD})(?:[\s-]+(?:and[\s-]+)?(?:{_WORD}|hundred|thousand|million))*\b",
    re.IGNORECASE)


def _words_value(words: str) -> int:
    total, current = 0, 0
    for word in re.split(r"[\s-]+", words.lower()):
        if word in _UNITS:
            current += _UNITS[word]
        elif word in _SCALES:
            current = max(current, 1) * _SCALES[word]
            if _SCALES[word] > 100:
                total, current = total + current, 0
    return total + current


def _match_value(match: re.Match) -> fractions.Fraction | None:
    if match.group("frac_only"):
        return fractions.Fraction("0" + match.group("frac_only"))
    value = fractions.Fraction(match.group("int").replace(",", "") + (match.group("frac") or ""))
    if match.group("den"):
        if int(match.group("den")) == 0:
            return None
        value /= int(match.group("den"))
    return value


def find_numbers(text: str, start: int = 0, end: int | None = None, *,
                 words: bool = True) -> list[Number]:
    """The numbers of text[start:end] in order.

    Number words are looked for only when the range holds no digits (and `words` is set), so
    that "one of the ..." does not compete with written-out arithmetic.
    """
    end = len(text) if end is None else end
    found = []
    for match in _NUMBER.finditer(text, start, end):
        value = _match_value(match)
        if value is None:
            continue
        begin = match.start()
        sign = _SIGN_BEFORE.search(text, max(start, begin - 2), begin)
        if sign is not None:
            value, begin = -value, sign.start()
        found.append((value, begin, match.end()))
    if words and not found:
        found = [(fractions.Fraction(_words_value(m.group())), m.start(), m.end())
                 for m in _NUMBER_WORDS.finditer(text, start, end)]
    return found


def format_number(value: fractions.Fraction) -> str:
    """Canonical text of a number: 18, -3, 0.5, 13.27; 1/3 when it has no finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    with decimal.localcontext() as context:
        # A finite decimal of p/q has at most log2(q) digits; the precision keeps all of them.
        context.prec = len(str(value.numerator)) + 4 * len(str(value.denominator))
        exact = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    return format(exact.normalize(), "f")


def parse_number(text: str) -> fractions.Fraction | None:
    """The value of a bare answer string ("$1,000", "18.0", "-3", "50%", "3/4", "twelve")."""
    text = text.strip().rstrip(".").strip()
    if _NUMBER_WORDS.fullmatch(text):
        return fractions.Fraction(_words_value(text))
    body = re.sub(r"^([-−]?)\s*\$\s*", r"\1", text)
    body = re.sub(r"\s*%$", "", body)
    negative = body[:1] in ("-", "−")
    match = _NUMBER.fullmatch(body[1:] if negative else body)
    if match is None:
        return None
    value = _match_value(match)
    return None if value is None else (-value if negative else value)
