"""Batch-contract arrays built from a hand-made encoded dataset, checked against hand-written
arrays (pad 0, EOS 2)."""

import numpy as np
import pytest

from mcckd_jax.data import batching
from mcckd_jax.data.tokenization import EncodedDataset, EncodedPrompts


def _dataset(layout):
    # Question 0: prompt [10 11 12], rationales [20 21 22 EOS] (answer 22 at 2), [30 22 EOS]
    # (answer at 1). Question 1: prompt [13], rationale [40 41 42 43 EOS] (answer 42 43 at 2).
    return EncodedDataset(
        layout=layout, pad_id=0, decoder_start_id=0,
        prompt_tokens=np.array([10, 11, 12, 13], np.int32), prompt_offsets=np.array([0, 3, 4]),
        rationale_tokens=np.array([20, 21, 22, 2, 30, 22, 2, 40, 41, 42, 43, 2], np.int32),
        rationale_offsets=np.array([0, 4, 7, 12]), question_rationales=np.array([0, 2, 3]),
        span_start=np.array([2, 1, 2]), span_tokens=np.array([22, 42, 43], np.int32),
        span_offsets=np.array([0, 1, 3]), record_index=np.array([0, 1]))


def test_decoder_only_batch_by_hand():
    data = _dataset("decoder_only")
    np.testing.assert_array_equal(data.sequence_lengths(), [6, 5, 5])
    batch = batching.build_train_batch(data, [0, 1, -1], [[0, 1], [2], []], num_rationales=2,
                                       length=7, span_length=3)
    tokens = np.zeros((3, 2, 7), np.int32)
    tokens[0, 0, :6] = [10, 11, 12, 20, 21, 22]
    tokens[0, 1, :5] = [10, 11, 12, 30, 22]
    tokens[1, 0, :5] = [13, 40, 41, 42, 43]
    targets = np.zeros((3, 2, 7), np.int32)
    targets[0, 0, :6] = [11, 12, 20, 21, 22, 2]
    targets[0, 1, :5] = [11, 12, 30, 22, 2]
    targets[1, 0, :5] = [40, 41, 42, 43, 2]
    loss_mask = np.zeros((3, 2, 7), bool)
    loss_mask[0, 0, 2:6] = loss_mask[0, 1, 2:5] = loss_mask[1, 0, 0:5] = True
    expected = {
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
        "rationale_mask": np.array([[1, 1], [1, 0], [0, 0]], bool),
        "span_positions": np.array([[[4, 0, 0], [3, 0, 0]], [[2, 3, 0], [0, 0, 0]],
                                    [[0, 0, 0], [0, 0, 0]]], np.int32),
        "span_mask": np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool),
        "question_index": np.array([0, 1, -1], np.int32),
    }
    assert batch.keys() == expected.keys()
    for name, value in expected.items():
        assert batch[name].dtype == value.dtype, name
        np.testing.assert_array_equal(batch[name], value, err_msg=name)


def test_encoder_decoder_batch_by_hand():
    data = _dataset("encoder_decoder")
    np.testing.assert_array_equal(data.sequence_lengths(), [4, 3, 5])
    batch = batching.build_train_batch(data, [1, 0], [[2], [1, 0]], num_rationales=2, length=5,
                                       span_length=2, encoder_length=4)
    np.testing.assert_array_equal(batch["encoder_tokens"], [[13, 0, 0, 0], [10, 11, 12, 0]])
    np.testing.assert_array_equal(batch["encoder_mask"], [[1, 0, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["tokens"][1], [[0, 30, 22, 0, 0], [0, 20, 21, 22, 0]])
    np.testing.assert_array_equal(batch["targets"][1], [[30, 22, 2, 0, 0], [20, 21, 22, 2, 0]])
    np.testing.assert_array_equal(batch["loss_mask"][1], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["tokens"][0, 0], [0, 40, 41, 42, 43])
    np.testing.assert_array_equal(batch["span_positions"], [[[2, 3], [0, 0]], [[1, 0], [2, 0]]])
    np.testing.assert_array_equal(batch["span_mask"], [[1, 1], [1, 0]])


def test_eval_batch_left_pads_decoder_prompts_and_right_pads_encoder_inputs():
    prompts = EncodedPrompts(layout="decoder_only", pad_id=0,
                             prompt_tokens=np.array([5, 6, 7, 8], np.int32),
                             prompt_offsets=np.array([0, 3, 4]), record_index=np.array([0, 1]))
    batch = batching.build_eval_batch(prompts, [1, 0, -1], length=4)
    np.testing.assert_array_equal(batch["prompt_tokens"], [[0, 0, 0, 8], [0, 5, 6, 7], [0] * 4])
    np.testing.assert_array_equal(batch["prompt_mask"], [[0, 0, 0, 1], [0, 1, 1, 1], [0] * 4])
    np.testing.assert_array_equal(batch["question_index"], [1, 0, -1])
    encoder = batching.build_eval_batch(
        EncodedPrompts("encoder_decoder", 0, prompts.prompt_tokens, prompts.prompt_offsets,
                       prompts.record_index), [0], length=4)
    np.testing.assert_array_equal(encoder["encoder_tokens"], [[5, 6, 7, 0]])
    np.testing.assert_array_equal(encoder["encoder_mask"], [[1, 1, 1, 0]])


def test_bucket_for():
    assert batching.bucket_for(5, (8, 4, 16)) == 8
    assert batching.bucket_for(16, (8, 16)) == 16
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        batching.bucket_for(17, (8, 16))
