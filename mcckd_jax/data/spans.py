"""Answer spans: from the characters of the answer to the tokens that carry it.

The answer is located in the rationale's text (`answers.find_answer`, character offsets); the
tokenizer's offset mapping turns that into a token range. A token range is accepted only when it
covers exactly the answer's characters (plus whitespace before them): a token that runs past the
answer ("32." as one token) would make the span carry other text, so such a rationale is
dropped. The consistency loss compares the span's predictions across a question's rationales,
which needs the same span token ids in all of them; `agreeing_group` keeps the largest group of
rationales that share them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

Offsets = Sequence[tuple[int, int]]


def token_span(text: str, offsets: Offsets, start: int, end: int) -> tuple[int, int] | None:
    """[first, last + 1) of the tokens covering text[start:end], or None if none align.

    Args:
      text: the text that was tokenized.
      offsets: per token, the [start, end) characters it covers (a tokenizer's offset mapping);
        empty ranges (special tokens, a lone sentencepiece "▁") cover nothing.
      start, end: the answer's characters.

    Returns:
      None when no token overlaps the answer, or when the overlapping tokens reach outside it
      other than by whitespace before the answer.
    """
    overlapping = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not overlapping:
        return None
    first, last = overlapping[0], overlapping[-1]
    if offsets[last][1] > end or text[offsets[first][0]:start].strip():
        return None
    if offsets[first][0] > start:
        return None
    return first, last + 1


def agreeing_group(span_ids: Sequence[tuple[int, ...]]) -> list[int]:
    """Indices of the largest group of equal span token-id tuples (the earliest on ties)."""
    if not span_ids:
        return []
    counts = collections.Counter(span_ids)
    most = max(counts.values())
    winner = next(ids for ids in span_ids if counts[ids] == most)
    return [i for i, ids in enumerate(span_ids) if ids == winner]
