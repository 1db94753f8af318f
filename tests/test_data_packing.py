"""The packed train pipeline: for every step it holds the examples of the unpacked pipeline's
same step (questions, views, tokens, targets, loss positions and answer positions, moved into
rows), the same R and L on every process, and fewer positions."""

import numpy as np

from mcckd_jax.data import pipeline
from test_train_packed import encoded


def sequences_of(batch, b, k):
    """(tokens, targets, loss_mask, span positions as offsets in the sequence) of view k of
    question b, from a packed or an unpacked batch."""
    if "segment_ids" not in batch:
        real = batch["loss_mask"][b, k]
        end = np.nonzero(real)[0].max() + 1
        return (batch["tokens"][b, k, :end], batch["targets"][b, k, :end], real[:end],
                batch["span_positions"][b, k])
    length = batch["tokens"].shape[1]
    index = batch["span_index"][b, k]
    row = index[0] // length
    segment = batch["segment_ids"][row, index[0] % length]
    where = np.nonzero(batch["segment_ids"][row] == segment)[0]
    first, end = where[0], np.nonzero(batch["loss_mask"][row, where])[0].max() + where[0] + 1
    return (batch["tokens"][row, first:end], batch["targets"][row, first:end],
            batch["loss_mask"][row, first:end], index - row * length - first)


def test_packed_batches_hold_the_unpacked_examples_in_fewer_positions():
    data = encoded(11, num_questions=12)
    config = pipeline.PipelineConfig(batch_size=4, num_rationales=3, bucket_lengths=(32, 48, 64),
                                     max_span_tokens=4, seed=5)
    packed_config = pipeline.PipelineConfig(**{**config.__dict__, "packing": True,
                                               "pack_groups": 2})
    for process in range(2):
        plain = pipeline.TrainBatches(data, config, process, 2)
        packed = pipeline.TrainBatches(data, packed_config, process, 2)
        other = pipeline.TrainBatches(data, packed_config, 1 - process, 2)
        for step in range(5):
            a, b = plain(step), packed(step)
            assert b["tokens"].shape == other(step)["tokens"].shape  # one R x L everywhere
            assert b["tokens"].size < a["tokens"].size
            for name in ("question_index", "rationale_mask", "span_mask"):
                np.testing.assert_array_equal(a[name], b[name])
            for q, k in zip(*np.nonzero(a["rationale_mask"])):
                for x, y in zip(sequences_of(a, q, k), sequences_of(b, q, k)):
                    np.testing.assert_array_equal(x[:len(y)], y)
