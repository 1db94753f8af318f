"""Packed train batches: the (question, rationale) sequences of a batch laid end to end in
fewer rows, so that the step computes on rationale tokens rather than on padding.

A packed batch holds the same B questions x K views as the unpacked one (README, "The batch
contract"), and the same masks over them, with the sequences moved:

| field | shape | dtype | meaning |
| --- | --- | --- | --- |
| tokens, targets | [R, L] | int32 | sequences end to end, each as in the unpacked row |
| loss_mask | [R, L] | bool | as unpacked, where each sequence now lies |
| segment_ids | [R, L] | int32 | 1, 2, ... per sequence in its row; 0 for padding |
| positions | [R, L] | int32 | RoPE position within the sequence (0 at its first token) |
| prompt_segment_ids | [R, L] | int32 | shared prompt only: the segment a position also attends |
| span_index | [B, K, S] | int32 | where answer token s of view k is predicted: row x L + position |
| rationale_mask, span_mask, question_index | as unpacked | | |

Groups. The questions are split into G equal groups in order (question b is in group
b // (B / G)) and the rows likewise; a group's sequences are packed into its own rows. With G
the data-parallel size, every device computes on the sequences of its own questions, and the
span gather (a flat index into the R x L positions) reads rows of the same device. Attention
never crosses a segment, so a sequence's hidden states (and its loss) are those of the same
sequence alone in a row.

Shared prompt (`shared_prompt=True`): a question's K views share one copy of its prompt. The
row holds the prompt but its last token (segment s, no loss), then each view as that last
prompt token followed by the rationale (segments s+1, ...: the positions that carry loss,
whose first predicts the rationale's first token); `prompt_segment_ids` [R, L] names, for every
position, the segment it may attend besides its own (the prompt's for a view), and a view's
positions continue from the prompt's. K = 4 with an 80-token prompt and 150-token rationales
is 79 + 4 x 150 = 679 positions instead of 4 x 229 = 916.

Rows are filled first-fit-decreasing: sequences (questions, with a shared prompt) in
decreasing length, each into the first row of its group with room.

Legend: B questions, K views, S span tokens, R rows, L row length, G groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcckd_jax.data import batching
from mcckd_jax.data.tokenization import EncodedDataset


def sequence_length(data: EncodedDataset, q: int, r: int) -> int:
    """Positions of (question q, rationale r) in a row: prompt + rationale - 1 (decoder-only)."""
    return len(data.prompt(q)) + len(data.rationale(r)) - 1


def first_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Rows of item indices, each row's lengths summing to at most row_length; items in
    decreasing length (ties by index) each go to the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for item in order:
        if lengths[item] > row_length:
            raise ValueError(f"a sequence of {lengths[item]} positions exceeds the row length "
                             f"{row_length}")
        for row, left in enumerate(room):
            if lengths[item] <= left:
                rows[row].append(item)
                room[row] -= lengths[item]
                break
        else:
            rows.append([item])
            room.append(row_length - lengths[item])
    return rows


def shared_length(data: EncodedDataset, q: int, rationales: Sequence[int]) -> int:
    """Positions of question q with one copy of its prompt: the prompt but its last token,
    then per rationale that token and the rationale but its last (see the module docstring)."""
    return len(data.prompt(q)) - 1 + sum(len(data.rationale(r)) for r in rationales)


def plan_rows(data: EncodedDataset, questions_B: Sequence[int],
              choices_B: Sequence[Sequence[int]], *, row_length: int, groups: int,
              shared_prompt: bool = False) -> list[list[list[tuple[int, int]]]]:
    """Per group, its rows, each a list of (b, k) sequences in row order; with
    `shared_prompt` a question's views stay together, after one copy of its prompt."""
    batch_size = len(questions_B)
    if batch_size % groups:
        raise ValueError(f"{batch_size} questions do not split into {groups} groups")
    per_group = batch_size // groups
    planned = []
    for group in range(groups):
        questions = [b for b in range(group * per_group, (group + 1) * per_group)
                     if questions_B[b] >= 0 and len(choices_B[b])]
        if shared_prompt:
            items = [[(b, k) for k in range(len(choices_B[b]))] for b in questions]
            lengths = [shared_length(data, questions_B[b], choices_B[b]) for b in questions]
        else:
            items = [[(b, k)] for b in questions for k in range(len(choices_B[b]))]
            lengths = [sequence_length(data, questions_B[b], choices_B[b][k])
                       for [(b, k)] in items]
        planned.append([[view for i in row for view in items[i]]
                        for row in first_fit_decreasing(lengths, row_length)])
    return planned


def rows_needed(data: EncodedDataset, questions_B: Sequence[int],
                choices_B: Sequence[Sequence[int]], *, row_length: int, groups: int,
                shared_prompt: bool = False) -> int:
    """R: the rows of the fullest group, times the groups (every group gets as many)."""
    planned = plan_rows(data, questions_B, choices_B, row_length=row_length, groups=groups,
                        shared_prompt=shared_prompt)
    return groups * max(1, max(len(rows) for rows in planned))


def build_packed_batch(data: EncodedDataset, questions_B: Sequence[int],
                       choices_B: Sequence[Sequence[int]], *, num_rationales: int,
                       row_length: int, num_rows: int, span_length: int,
                       groups: int = 1, shared_prompt: bool = False) -> dict[str, np.ndarray]:
    """The packed fields (module docstring) of B questions; `num_rows` must be at least
    `rows_needed` (extra rows stay padding)."""
    if data.layout != "decoder_only":
        raise ValueError("packing is for decoder-only students (T5 keeps its layout)")
    if num_rows % groups:
        raise ValueError(f"{num_rows} rows do not split into {groups} groups")
    planned = plan_rows(data, questions_B, choices_B, row_length=row_length, groups=groups,
                        shared_prompt=shared_prompt)
    rows_per_group = num_rows // groups
    if (fullest := max(len(rows) for rows in planned)) > rows_per_group:
        raise ValueError(f"the batch needs {fullest} rows per group, {rows_per_group} given")
    batch = _empty(data, questions_B, num_rationales, row_length, num_rows, span_length,
                   shared_prompt)
    for group, rows in enumerate(planned):
        for local_row, sequences in enumerate(rows):
            _fill_packed_row(data, batch, group * rows_per_group + local_row, sequences,
                             questions_B, choices_B, span_length, shared_prompt)
    for b, q in enumerate(questions_B):
        if q >= 0:
            batch["span_mask"][b, :data.span_offsets[q + 1] - data.span_offsets[q]] = True
    return batch


def _empty(data, questions_B, num_rationales, row_length, num_rows, span_length,
           shared_prompt) -> dict[str, np.ndarray]:
    batch_size = len(questions_B)
    unpacked = batching.train_batch_spec(batch_size, num_rationales, 1, span_length)
    batch = {name: np.zeros(shape, dtype) for name, (shape, dtype) in unpacked.items()
             if name in ("rationale_mask", "span_mask", "question_index")}
    batch["question_index"][:] = questions_B
    shape_RL = (num_rows, row_length)
    batch.update(tokens=np.full(shape_RL, data.pad_id, np.int32),
                 targets=np.full(shape_RL, data.pad_id, np.int32),
                 loss_mask=np.zeros(shape_RL, bool), segment_ids=np.zeros(shape_RL, np.int32),
                 positions=np.zeros(shape_RL, np.int32),
                 span_index=np.zeros((batch_size, num_rationales, span_length), np.int32))
    if shared_prompt:
        batch["prompt_segment_ids"] = np.zeros(shape_RL, np.int32)
    return batch


def _fill_packed_row(data, batch, row, sequences, questions_B, choices_B, span_length,
                     shared_prompt) -> None:
    """Writes one row's sequences (views (b, k) in order; with `shared_prompt` each question's
    views follow one copy of its prompt but its last token)."""
    length = batch["tokens"].shape[1]
    offset, segment, previous, prompt_segment = 0, 0, None, None
    for b, k in sequences:
        q, r = questions_B[b], choices_B[b][k]
        full = sequence_length(data, q, r)
        unpacked = {name: np.zeros(full, dtype) for name, dtype in
                    (("tokens", np.int32), ("targets", np.int32), ("loss_mask", bool))}
        span_S = np.zeros(span_length, np.int32)
        batching.fill_row(data, q, r, unpacked["tokens"], unpacked["targets"],
                          unpacked["loss_mask"], span_S)
        skip = 0
        if shared_prompt:
            skip = len(data.prompt(q)) - 1  # the shared part: the prompt but its last token
            if b != previous:
                prompt_segment = None  # a one-token prompt: nothing to share
                if skip:
                    segment += 1
                    _place(batch, row, offset, segment, segment, np.arange(skip),
                           {name: value[:skip] for name, value in unpacked.items()})
                    prompt_segment, offset = segment, offset + skip
            previous = b
        segment += 1
        _place(batch, row, offset, segment, prompt_segment or segment,
               np.arange(skip, full), {name: value[skip:] for name, value in unpacked.items()})
        batch["span_index"][b, k] = row * length + offset + span_S - skip
        batch["rationale_mask"][b, k] = True
        offset += full - skip


def _place(batch, row, offset, segment, prompt_segment, positions, fields) -> None:
    size = len(positions)
    where = (row, slice(offset, offset + size))
    for name, value in fields.items():
        batch[name][where] = value
    batch["segment_ids"][where] = segment
    batch["positions"][where] = positions
    if "prompt_segment_ids" in batch:
        batch["prompt_segment_ids"][where] = prompt_segment
