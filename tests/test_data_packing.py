"""The packed train pipeline: for every step it holds the examples of the unpacked pipeline's
same step (questions, views, tokens, targets, loss positions and answer positions, moved into
rows), the same R and L on every process, and fewer positions."""

import numpy as np
import pytest

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


def test_shared_prompt_batches_hold_the_same_examples_in_fewer_positions():
    data = encoded(12, num_questions=12)
    base = dict(batch_size=4, num_rationales=3, bucket_lengths=(64, 96, 128), max_span_tokens=4,
                seed=5, packing=True, pack_groups=2)
    separate = pipeline.TrainBatches(data, pipeline.PipelineConfig(**base), 0, 1)
    shared = pipeline.TrainBatches(data, pipeline.PipelineConfig(**base, shared_prompt=True), 0, 1)
    saved = 0
    for step in range(6):
        a, b = separate(step), shared(step)
        for name in ("question_index", "rationale_mask", "span_mask"):
            np.testing.assert_array_equal(a[name], b[name])
        assert a["loss_mask"].sum() == b["loss_mask"].sum()  # the same loss tokens
        saved += (a["segment_ids"] > 0).sum() - (b["segment_ids"] > 0).sum()
        # each view's targets at its answer positions are the question's answer span
        for q, k in zip(*np.nonzero(b["rationale_mask"])):
            span = data.span(b["question_index"][q])
            where = b["span_index"][q, k, :len(span)]
            np.testing.assert_array_equal(b["targets"].reshape(-1)[where], span)
            np.testing.assert_array_equal(a["targets"].reshape(-1)[a["span_index"][q, k,
                                                                               :len(span)]], span)
    assert saved > 0  # the prompts counted once


def test_shared_prompt_needs_packing_and_room():
    data = encoded(12, num_questions=4)
    with pytest.raises(ValueError, match="needs data.pipeline.packing"):
        pipeline.TrainBatches(data, pipeline.PipelineConfig(shared_prompt=True), 0, 1)
    with pytest.raises(ValueError, match="more than the largest bucket"):
        pipeline.TrainBatches(data, pipeline.PipelineConfig(
            packing=True, shared_prompt=True, num_rationales=4, bucket_lengths=(40,)), 0, 1)
