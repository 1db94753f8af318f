"""Grain pipelines on the encoded SVAMP sample: order, sampling, sharding, checkpoints.

References are independent of the pipeline's own plan: coverage is checked against the set of
question indices, process shards against a single-process run with the same global batch,
restored iterators against the batches an uninterrupted iterator produced, and lengths against
the loss region that the batch itself contains.
"""

import itertools
import json

import grain
import numpy as np
import pytest

from data_testing import encoded_svamp
from mcckd_jax.data import pipeline
from mcckd_jax.data.pipeline import PipelineConfig

BUCKETS = (128, 256, 512)


def _batches(data, config, count=None, **process):
    process = process or {"process_index": 0, "process_count": 1}
    iterator = iter(pipeline.train_dataset(data, config, **process))
    return list(itertools.islice(iterator, count)) if count else list(iterator)


def _assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_batches_follow_the_contract(shared_data):
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, num_rationales=3, bucket_lengths=BUCKETS, num_epochs=1)
    for batch in _batches(data, config):
        length = batch["tokens"].shape[-1]
        shapes = {"tokens": (4, 3, length), "targets": (4, 3, length),
                  "loss_mask": (4, 3, length), "rationale_mask": (4, 3),
                  "span_positions": (4, 3, 8), "span_mask": (4, 8), "question_index": (4,)}
        assert {k: v.shape for k, v in batch.items()} == shapes
        assert {k: v.dtype.name for k, v in batch.items()} == {
            "tokens": "int32", "targets": "int32", "loss_mask": "bool", "rationale_mask": "bool",
            "span_positions": "int32", "span_mask": "bool", "question_index": "int32"}
        # The smallest bucket that holds the longest loss region of the batch.
        last = max(np.nonzero(row)[0][-1] + 1 for row in batch["loss_mask"].reshape(-1, length)
                   if row.any())
        assert length == min(b for b in BUCKETS if b >= last)
        shifted = batch["loss_mask"][..., :-1] & batch["loss_mask"][..., 1:]
        np.testing.assert_array_equal(batch["targets"][..., :-1][shifted],
                                      batch["tokens"][..., 1:][shifted])


def test_same_seed_same_batches_other_seed_other_order(shared_data):
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, seed=3)
    _assert_same(_batches(data, config, 6), _batches(data, config, 6))
    other = _batches(data, PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, seed=4), 6)
    assert any(not np.array_equal(a["question_index"], b["question_index"])
               for a, b in zip(_batches(data, config, 6), other))


def test_each_epoch_visits_every_question_once_and_samples_k(shared_data):
    data, _ = encoded_svamp(shared_data)
    n = data.num_questions
    config = PipelineConfig(batch_size=8, num_rationales=2, bucket_lengths=BUCKETS, num_epochs=3)
    batches = _batches(data, config)
    assert len(batches) == -(-3 * n // 8)
    order = np.concatenate([b["question_index"] for b in batches])
    assert (order[3 * n:] == -1).all()
    epochs = [order[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    available = np.diff(data.question_rationales)
    seen = {q: set() for q in range(n)}
    for batch in batches:
        for b, q in enumerate(batch["question_index"]):
            if q < 0:
                assert not batch["rationale_mask"][b].any() and not batch["loss_mask"][b].any()
                continue
            used = batch["rationale_mask"][b].sum()
            assert used == min(2, available[q])
            rows = {batch["tokens"][b, k].tobytes() for k in range(used)}
            assert len(rows) == used  # no rationale twice in one row
            seen[q] |= rows
    # Questions with more than K rationales see other subsets in other epochs.
    assert sum(len(seen[q]) > 2 for q in range(n) if available[q] > 2) >= 40


def test_two_processes_split_each_global_batch(shared_data):
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, num_epochs=1)
    shards = [_batches(data, config, process_index=p, process_count=2) for p in range(2)]
    single = _batches(data, PipelineConfig(batch_size=8, bucket_lengths=BUCKETS, num_epochs=1))
    assert len(shards[0]) == len(shards[1]) == len(single) == -(-data.num_questions // 8)
    for first, second, whole in zip(*shards, single):
        assert first["tokens"].shape == second["tokens"].shape
        for name in whole:
            np.testing.assert_array_equal(np.concatenate([first[name], second[name]]),
                                          whole[name], err_msg=name)
    indices = [np.concatenate([b["question_index"] for b in shard]) for shard in shards]
    real = [set(i[i >= 0].tolist()) for i in indices]
    assert not real[0] & real[1]
    assert real[0] | real[1] == set(range(data.num_questions))


def test_restoring_a_saved_state_continues_with_the_same_batches(shared_data):
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, num_epochs=2)
    dataset = pipeline.train_dataset(data, config, process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = list(itertools.islice(iterator, 6))
    restored = iter(dataset)
    restored.set_state(state)
    _assert_same(list(itertools.islice(restored, 6)), expected)


def test_orbax_checkpoint_round_trip(shared_data, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS)
    dataset = pipeline.train_dataset(data, config, process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(5, args=ocp.args.Composite(
            data_iterator=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = list(itertools.islice(iterator, 4))
    restored = iter(dataset)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.restore(5, args=ocp.args.Composite(
            data_iterator=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same(list(itertools.islice(restored, 4)), expected)


def test_worker_processes_give_the_same_batches_and_restore(shared_data):
    data, _ = encoded_svamp(shared_data)
    config = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, num_epochs=1)
    expected = _batches(data, config, 8)
    workers = PipelineConfig(batch_size=4, bucket_lengths=BUCKETS, num_epochs=1, num_workers=2)
    dataset = pipeline.train_dataset(data, workers, process_index=0, process_count=1)
    iterator = iter(dataset)
    try:
        first = list(itertools.islice(iterator, 3))
        state = iterator.get_state()
        rest = list(itertools.islice(iterator, 5))
    finally:
        iterator.close()
    _assert_same(first + rest, expected)
    restored = iter(dataset)
    try:
        restored.set_state(state)
        _assert_same(list(itertools.islice(restored, 5)), expected[3:])
    finally:
        restored.close()


def test_encoder_decoder_batches_carry_the_question_on_the_encoder_side(shared_data):
    data, _ = encoded_svamp(shared_data, "encoder_decoder")
    config = PipelineConfig(batch_size=4, bucket_lengths=(256, 512, 1024),
                            encoder_bucket_lengths=(64, 128), num_epochs=1)
    for batch in _batches(data, config, 5):
        prompt_lengths = batch["encoder_mask"].sum(axis=1)
        assert batch["encoder_tokens"].shape[1] == min(
            b for b in (64, 128) if b >= prompt_lengths.max())
        for b, q in enumerate(batch["question_index"]):
            np.testing.assert_array_equal(batch["encoder_tokens"][b, :prompt_lengths[b]],
                                          data.prompt(q))
        assert (batch["tokens"][..., 0][batch["rationale_mask"]] == data.decoder_start_id).all()


def test_eval_pipeline_serves_every_question_once_in_order(shared_data):
    from mcckd_jax.data.tokenization import EncodedPrompts

    data, _ = encoded_svamp(shared_data)
    prompts = EncodedPrompts(layout="decoder_only", pad_id=data.pad_id,
                             prompt_tokens=data.prompt_tokens, prompt_offsets=data.prompt_offsets,
                             record_index=data.record_index)
    config = PipelineConfig(batch_size=8, bucket_lengths=BUCKETS)
    shards = [list(pipeline.eval_dataset(prompts, config, process_index=p, process_count=2))
              for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-data.num_questions // 16)
    order = np.concatenate([np.concatenate([a["question_index"], b["question_index"]])
                            for a, b in zip(*shards)])
    np.testing.assert_array_equal(order[:data.num_questions], np.arange(data.num_questions))
    assert (order[data.num_questions:] == -1).all()
    for batch in shards[0] + shards[1]:
        for b, q in enumerate(batch["question_index"]):
            if q >= 0:
                np.testing.assert_array_equal(batch["prompt_tokens"][b][batch["prompt_mask"][b]],
                                              data.prompt(q))
                assert batch["prompt_mask"][b, -1]


def test_shapes_that_cannot_fit_are_rejected(shared_data):
    data, _ = encoded_svamp(shared_data)
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        pipeline.train_dataset(data, PipelineConfig(bucket_lengths=(128,)), process_index=0,
                               process_count=1)
    with pytest.raises(ValueError, match="max_span_tokens=1"):
        pipeline.train_dataset(data, PipelineConfig(max_span_tokens=1), process_index=0,
                               process_count=1)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline.train_dataset(data, PipelineConfig(), process_index=2, process_count=2)
