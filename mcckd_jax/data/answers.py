"""Final answers: extracting them from rationales, normalising them, comparing them to labels.

Tasks: gsm8k, svamp, asdiv, multiarith (numbers), csqa (a choice letter A-E, or the text of a
choice) and strategyqa (yes/no). Extraction works on raw teacher text, whose endings vary
("Therefore, ...", "Thus ...", "The answer is 18", "#### 18", or no final sentence at all, with
caveats and checks after the answer). For numbers, in order:

1. a GSM8K-style `#### 18`, then the last explicit marker ("the answer is 18", "Answer: 18",
   "A: 18") followed by a number within its sentence;
2. otherwise the answer sentence: the last sentence with a number, where the text is cut at
   the first digression after a numbered sentence ("It's worth noting ...", "Let's check ...",
   "Alternatively, ..."); number words count only in a conclusion (Therefore/So/Thus/...) or in
   the last sentence. When the question is known, sentences that only restate its numbers
   ("Since he only had $4, ...") are skipped, and so are sentences that share no content word
   with its interrogative clause when some sentence shares at least three;
3. inside that sentence, after skipping a leading "Since/If ... ," clause and cutting a
   trailing "because ..."/", as 7 x 3 = 21": the number after the last "=", else (with the
   question) the last number followed by the counted noun of "how many <noun>", else the first
   number not stated in the question, else the first number.

Parentheses, `<<...>>` calculator marks and list labels ("1. Subtract ...") are ignored.
Character offsets of the answer as written are kept (`AnswerMatch`), so that the tokenizer can
locate the answer span.
"""

from __future__ import annotations

import dataclasses
import fractions
import re

from mcckd_jax.data.numbers import Number, find_numbers, format_number, parse_number

NUMERIC_TASKS = ("gsm8k", "svamp", "asdiv", "multiarith")
TASKS = NUMERIC_TASKS + ("csqa", "strategyqa")

_SENTENCE_END = re.compile(r"\n+|(?<=[.!?])\s+")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|approx|e\.g|i\.e)\.$",
                           re.IGNORECASE)
_BLANKED = (re.compile(r"<<[^<>]*>>"),  # GSM8K calculator marks
            re.compile(r"\([^()\n]*\)"),  # asides: "(45 x 9 x 21)", "(rounded to 4 places)"
            re.compile(r"(?m)^[ \t]*(?:step\s+)?\d{1,2}[.)](?=[ \t]+[A-Za-z])", re.IGNORECASE))
_GSM8K_MARK = re.compile(r"####[ \t]*")
_ANSWER_MARK = re.compile(
    r"(?:\banswer\s*(?:is|was|would\s+be|will\s+be|:|=)|(?:^|\n)\s*A\s*:)[\s:]*", re.IGNORECASE)
_MARKER_STOP = re.compile(r"(?<=[.!?])\s|\n\s*\n")
_CONCLUSION = re.compile(
    r"\W*(?:\w+\W+){0,3}?(?:therefore|thus|so|hence|consequently|overall|altogether|finally|"
    r"in\s+total|in\s+conclusion|in\s+other\s+words|as\s+a\s+result|this\s+means|"
    r"either\s+way|we\s+come\s+to\s+the\s+conclusion)\b", re.IGNORECASE)
_DIGRESSION = re.compile(
    r"\W*(?:(?:however|but)\s*,?\s+if|note|alternatively|of\s+course|additionally|"
    r"keep\s+in\s+mind|it(?:'s|’s|\s+is)\s+(?:worth|important)|this\s+matches|"
    r"(?:now\s*,?\s*)?(?:let's|let’s|let\s+us|we\s+can|to)\s+(?:check|verify|double[-\s]check)|"
    r"now\s*,?\s*let(?:'s|’s)\s+(?:use|think|check))\b", re.IGNORECASE)
_LEADING_CLAUSE = re.compile(r"\W*(?:since|because|as|if|when|after|given)\b[^,]*,",
                             re.IGNORECASE)
_JUSTIFICATION = re.compile(r"\s*(?:,\s*)?(?:\bbecause\b|\bsince\b)|,\s*as\b(?=\s*\d)",
                            re.IGNORECASE)
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but if than then that this these those "
    "is are was were be been being do does did have has had will would can could should shall "
    "how many much more fewer less what which who whom whose when where why each every all "
    "he she it they we you i his her its their our your him them us me there here not no "
    "total altogether left now still".split())
# With a question whose interrogative clause shares at least this many content words with
# some sentence, a sentence sharing none (a side computation after the answer) is skipped.
_RELEVANCE_GATE = 3

_CHOICE_LINE = re.compile(r"^\s*\(?([A-E])[.)]\s*(.+?)\s*$", re.MULTILINE)
_CHOICE_MARK = re.compile(
    r"\banswer\s*(?:is|:)?\s*(?:choice|option)?\s*:?\s*\(?([A-E])\)?(?![\w])", re.IGNORECASE)
_LETTER = re.compile(r"(?<![\w])\(?([A-E])\)(?![\w])|(?<![\w'])([A-E])(?=[.:](?:\s|$)|$)")
_YES_NO_MARK = re.compile(r"\banswer\s*(?:is|:)\s*(yes|no)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class AnswerMatch:
    """An extracted answer: normalised string and the [start, end) characters it came from."""

    answer: str
    start: int
    end: int


def check_task(task: str) -> None:
    """Raises ValueError naming the known tasks when `task` is not one of them."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------------
# Sentences and questions
# --------------------------------------------------------------------------------------------

Span = tuple[int, int]


def _sentences(text: str) -> list[Span]:
    """[start, end) of each non-empty sentence (split at newlines and at . ! ? + space).

    A sentence that ends with ":" ("..., the total is:") runs on into the next one, which
    holds the result it announces; "Mr." and the like do not end a sentence.
    """
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if "\n" not in match.group() and _ABBREVIATION.search(text, start, match.start()):
            continue
        if text[start:match.start()].strip():
            spans.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    merged: list[Span] = []
    for span in spans:
        if merged and text[merged[-1][0]:merged[-1][1]].rstrip().endswith(":"):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return merged


def _stem(word: str) -> str:
    word = word.lower()
    for suffix in ("ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _content_stems(text: str) -> frozenset[str]:
    return frozenset(_stem(w) for w in re.findall(r"[A-Za-z]+", text)
                     if w.lower() not in _STOPWORDS)


@dataclasses.dataclass(frozen=True)
class _Asked:
    """What a question asks for, as far as choosing the answer sentence needs it."""

    stems: frozenset[str]  # content-word stems of the interrogative clause
    unit: str | None  # stem of the counted noun of "how many [more] <noun>", if any
    given: frozenset[fractions.Fraction]  # numbers stated in the question

    @classmethod
    def from_question(cls, question: str) -> _Asked:
        clauses = [question[s:e] for s, e in _sentences(question)]
        clause = ([c for c in clauses if "?" in c] or clauses[-1:] or [""])[-1]
        opener = re.search(r"\b(?:how|what|which|who|find|calculate)\b", clause, re.IGNORECASE)
        clause = clause[opener.start():] if opener else clause
        counted = re.search(r"\bhow\s+many\s+(?:(?:more|fewer|less|total|different|extra|other)"
                            r"\s+)*([A-Za-z]+)", clause, re.IGNORECASE)
        return cls(_content_stems(clause), _stem(counted.group(1)) if counted else None,
                   frozenset(value for value, _, _ in find_numbers(question)))


# --------------------------------------------------------------------------------------------
# Numeric answers
# --------------------------------------------------------------------------------------------


def _blanked(text: str) -> str:
    """`text` with calculator marks, parentheses and list labels replaced by spaces.

    Blanking instead of removing keeps offsets into the result valid for `text`.
    """
    for pattern in _BLANKED:
        text = pattern.sub(lambda match: " " * len(match.group()), text)
    return text


def _after_marker(text: str) -> Number | None:
    """The first number after the last explicit answer marker that has one in its sentence."""
    for marker in (_GSM8K_MARK, _ANSWER_MARK):
        for match in reversed(list(marker.finditer(text))):
            limit = min(len(text), match.end() + 80)
            stop = _MARKER_STOP.search(text, match.end(), limit)
            found = find_numbers(text, match.end(), stop.start() if stop else limit)
            if found:
                return found[0]
    return None


def _answer_sentence(text: str, asked: _Asked | None) -> Span | None:
    """The sentence that states the final answer (rule 2 of the module docstring)."""
    sentences = _sentences(text)
    numbered = [(s, e) for s, e in sentences if find_numbers(text, s, e, words=False) or (
        find_numbers(text, s, e) and ((s, e) == sentences[-1] or _CONCLUSION.match(text, s, e)))]
    for position, span in enumerate(numbered[1:], start=1):
        if _DIGRESSION.match(text, *span):
            numbered = numbered[:position]
            break
    if asked is not None and numbered:
        def restates(start, end):
            return "=" not in text[start:end] and all(
                value in asked.given for value, _, _ in find_numbers(text, start, end))

        numbered = [span for span in numbered if not restates(*span)] or numbered
        relevance = {span: len(asked.stems & _content_stems(text[span[0]:span[1]]))
                     for span in numbered}
        if max(relevance.values()) >= _RELEVANCE_GATE:
            numbered = [span for span in numbered if relevance[span] > 0]
    return numbered[-1] if numbered else None


def _counts(text: str, number: Number, end: int, nouns: frozenset[str]) -> bool:
    """Whether one of `nouns` is among the two words after the number ("32 more wrappers"),
    before any other number ("52 x 2 beads" counts the 2, not the 52)."""
    following = text[number[2]:end]
    next_number = find_numbers(following, words=False)
    if next_number:
        following = following[:next_number[0][1]]
    return any(_stem(w) in nouns for w in re.findall(r"[A-Za-z]+", following)[:2])


def _number_in_sentence(text: str, start: int, end: int, asked: _Asked | None) -> Number | None:
    """The answer number of one sentence (rule 3 of the module docstring)."""
    leading = _LEADING_CLAUSE.match(text, start, end)
    if leading is not None and find_numbers(text, leading.end(), end):
        start = leading.end()
    cut = _JUSTIFICATION.search(text, start, end)
    if cut is not None and find_numbers(text, start, cut.start()):
        end = cut.start()
    equals = text.rfind("=", start, end)
    after_equals = find_numbers(text, equals + 1, end) if equals >= 0 else []
    if after_equals:
        return after_equals[0]
    numbers = find_numbers(text, start, end)
    if asked is None or not numbers:
        return numbers[0] if numbers else None
    nouns = frozenset([asked.unit]) if asked.unit else asked.stems
    counted = [n for n in numbers if _counts(text, n, end, nouns)]
    new = [n for n in numbers if n[0] not in asked.given]
    counted_new = [n for n in counted if n in new]
    if counted_new or counted:
        return (counted_new or counted)[0]
    return (new or numbers)[0]


def _find_number(text: str, question: str | None) -> Number | None:
    text = _blanked(text)
    found = _after_marker(text)
    if found is not None:
        return found
    asked = _Asked.from_question(question) if question else None
    sentence = _answer_sentence(text, asked)
    return None if sentence is None else _number_in_sentence(text, *sentence, asked)


# --------------------------------------------------------------------------------------------
# Choices and yes/no
# --------------------------------------------------------------------------------------------


def parse_choices(question: str) -> dict[str, str]:
    """{"A": "annoy", ...} from the "A. annoy" lines of a CSQA question."""
    return {letter: choice for letter, choice in _CHOICE_LINE.findall(question)}


def _last_conclusion(text: str) -> Span | None:
    sentences = _sentences(text)
    conclusions = [span for span in sentences if _CONCLUSION.match(text, *span)]
    return (conclusions or sentences or [None])[-1]


def _find_choice(text: str, question: str | None) -> AnswerMatch | None:
    marks = list(_CHOICE_MARK.finditer(text))
    if marks:
        return AnswerMatch(marks[-1].group(1).upper(), marks[-1].start(1), marks[-1].end(1))
    choices = parse_choices(question) if question else {}
    sentence = _last_conclusion(text)
    for start, end in ([sentence] if sentence else []) + [(0, len(text))]:
        letters = list(_LETTER.finditer(text, start, end))
        if letters:
            group = 1 if letters[-1].group(1) else 2
            return AnswerMatch(letters[-1].group(group), letters[-1].start(group),
                               letters[-1].end(group))
        lowered = text.lower()
        # The choice text mentioned last wins; the longer one when one contains another.
        hits = [(lowered.rfind(choice.lower(), start, end), letter, choice)
                for letter, choice in choices.items()]
        hits = [hit for hit in hits if hit[0] >= 0]
        if hits:
            position, letter, choice = max(hits, key=lambda h: (h[0] + len(h[2]), len(h[2])))
            return AnswerMatch(letter, position, position + len(choice))
    return None


def _find_yes_no(text: str) -> AnswerMatch | None:
    found = list(_YES_NO_MARK.finditer(text))
    if not found:
        sentence = _last_conclusion(text)
        found = list(_YES_NO.finditer(text, *sentence)) if sentence else []
        found = found or list(_YES_NO.finditer(text))
    if not found:
        return None
    word = found[-1].group(1).lower()
    return AnswerMatch({"true": "yes", "false": "no"}.get(word, word), found[-1].start(1),
                       found[-1].end(1))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def find_answer(text: str, task: str, *, question: str | None = None) -> AnswerMatch | None:
    """The final answer of a rationale with its character offsets, or None if it has none.

    Args:
      text: a rationale or a model's output.
      task: one of TASKS.
      question: the question, when known; numeric tasks use it to tell the answer from
        restatements and side computations, csqa to match the text of a choice.
    """
    check_task(task)
    if task == "csqa":
        return _find_choice(text, question)
    if task == "strategyqa":
        return _find_yes_no(text)
    found = _find_number(text, question)
    return None if found is None else AnswerMatch(format_number(found[0]), found[1], found[2])


def extract_answer(text: str, task: str, *, question: str | None = None) -> str | None:
    """The normalised final answer of `text` ("18", "0.5", "C", "yes"), or None."""
    match = find_answer(text, task, question=question)
    return None if match is None else match.answer


def normalize_label(label: str, task: str) -> str | None:
    """Canonical string of a gold label ("6.0" -> "6", "$1,000" -> "1000", "(c)" -> "C").

    Returns None when the label is not a valid answer for the task.
    """
    check_task(task)
    label = label.strip()
    if task == "csqa":
        letter = label.strip("() .").upper()
        return letter if re.fullmatch(r"[A-E]", letter) else None
    if task == "strategyqa":
        word = label.strip(" .").lower()
        return {"true": "yes", "false": "no"}.get(word, word) if word in (
            "yes", "no", "true", "false") else None
    value = parse_number(label)
    return None if value is None else format_number(value)


def answers_match(pred: str | None, label: str, task: str) -> bool:
    """Whether a predicted answer equals the gold label (18 == 18.0 == $18 for numbers)."""
    check_task(task)
    if pred is None:
        return False
    if task in NUMERIC_TASKS:
        pred_value, label_value = parse_number(pred), parse_number(label)
        if pred_value is None or label_value is None:
            return False
        tolerance = fractions.Fraction(1, 10**6) * max(1, abs(label_value))
        return abs(pred_value - label_value) <= tolerance
    normalized = normalize_label(label, task)
    return normalized is not None and normalize_label(pred, task) == normalized
