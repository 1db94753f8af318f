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
| span_index | [B, K, S] | int32 | where answer token s of view k is predicted: row x L + position |
| rationale_mask, span_mask, question_index | as unpacked | | |

Groups. The questions are split into G equal groups in order (question b is in group
b // (B / G)) and the rows likewise; a group's sequences are packed into its own rows. With G
the data-parallel size, every device computes on the sequences of its own questions, and the
span gather (a flat index into the R x L positions) reads rows of the same device. Attention
never crosses a segment, so a sequence's hidden states (and its loss) are those of the same
sequence alone in a row.

Rows are filled first-fit-decreasing: sequences in decreasing length, each into the first row
of its group with room. Legend: B questions, K views, S span tokens, R rows, L row length,
G groups.
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


def plan_rows(data: EncodedDataset, questions_B: Sequence[int],
              choices_B: Sequence[Sequence[int]], *, row_length: int, groups: int
              ) -> list[list[list[tuple[int, int]]]]:
    """Per group, its rows, each a list of (b, k) sequences in row order."""
    batch_size = len(questions_B)
    if batch_size % groups:
        raise ValueError(f"{batch_size} questions do not split into {groups} groups")
    per_group = batch_size // groups
    planned = []
    for group in range(groups):
        items = [(b, k) for b in range(group * per_group, (group + 1) * per_group)
                 if questions_B[b] >= 0 for k in range(len(choices_B[b]))]
        lengths = [sequence_length(data, questions_B[b], choices_B[b][k]) for b, k in items]
        planned.append([[items[i] for i in row]
                        for row in first_fit_decreasing(lengths, row_length)])
    return planned


def rows_needed(data: EncodedDataset, questions_B: Sequence[int],
                choices_B: Sequence[Sequence[int]], *, row_length: int, groups: int) -> int:
    """R: the rows of the fullest group, times the groups (every group gets as many)."""
    planned = plan_rows(data, questions_B, choices_B, row_length=row_length, groups=groups)
    return groups * max(1, max(len(rows) for rows in planned))


def build_packed_batch(data: EncodedDataset, questions_B: Sequence[int],
                       choices_B: Sequence[Sequence[int]], *, num_rationales: int,
                       row_length: int, num_rows: int, span_length: int,
                       groups: int = 1) -> dict[str, np.ndarray]:
    """The packed fields (module docstring) of B questions; `num_rows` must be at least
    `rows_needed` (extra rows stay padding)."""
    if data.layout != "decoder_only":
        raise ValueError("packing is for decoder-only students (T5 keeps its layout)")
    if num_rows % groups:
        raise ValueError(f"{num_rows} rows do not split into {groups} groups")
    planned = plan_rows(data, questions_B, choices_B, row_length=row_length, groups=groups)
    rows_per_group = num_rows // groups
    if (fullest := max(len(rows) for rows in planned)) > rows_per_group:
        raise ValueError(f"the batch needs {fullest} rows per group, {rows_per_group} given")
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
    for group, rows in enumerate(planned):
        for local_row, sequences in enumerate(rows):
            row = group * rows_per_group + local_row
            offset = 0
            for segment, (b, k) in enumerate(sequences, start=1):
                q, r = questions_B[b], choices_B[b][k]
                size = sequence_length(data, q, r)
                span_S = np.zeros(span_length, np.int32)
                batching.fill_row(data, q, r, batch["tokens"][row, offset:offset + size],
                                  batch["targets"][row, offset:offset + size],
                                  batch["loss_mask"][row, offset:offset + size], span_S)
                batch["segment_ids"][row, offset:offset + size] = segment
                batch["positions"][row, offset:offset + size] = np.arange(size)
                batch["span_index"][b, k] = row * row_length + offset + span_S
                batch["rationale_mask"][b, k] = True
                offset += size
    for b, q in enumerate(questions_B):
        if q >= 0:
            batch["span_mask"][b, :data.span_offsets[q + 1] - data.span_offsets[q]] = True
    return batch
