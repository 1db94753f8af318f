"""Packed batches (data/packing.py): the same questions and views packed into rows give the
loss and gradients of the unpacked batch (float32, rtol 1e-5), for K = 2..4, questions with
fewer than K rationales, on one device and on a (2,2,2) mesh; no attention crosses sequences
(changing one sequence of a row leaves every other sequence's hidden states unchanged).

The reference is the project's own unpacked step, which the other tests check against
float64 NumPy and transformers' PyTorch models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mcckd_jax import sharding
from mcckd_jax.data import batching, packing
from mcckd_jax.data.tokenization import EncodedDataset
from mcckd_jax.models import decoder, llama
from mcckd_jax.train import optimizer as opt
from mcckd_jax.train import state as train_state
from mcckd_jax.train import step as train_step

VOCAB = 128
OPTIMIZER = opt.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, max_grad_norm=None)


def encoded(seed, num_questions=8, max_rationales=4):
    """Random questions: prompts of 5-14 tokens, 1..max_rationales rationales of 8-30 tokens
    each ending in the question's answer span (2-3 tokens) and EOS."""
    rng = np.random.default_rng(seed)
    prompts, rationales, owners, starts, spans = [], [], [0], [], []
    for q in range(num_questions):
        prompts.append(rng.integers(3, VOCAB, rng.integers(5, 15)))
        span = rng.integers(3, VOCAB, rng.integers(2, 4))
        spans.append(span)
        count = 1 if q == 1 else int(rng.integers(1, max_rationales + 1))
        for _ in range(count):
            body = rng.integers(3, VOCAB, rng.integers(5, 27))
            starts.append(len(body))
            rationales.append(np.concatenate([body, span, [2]]))
        owners.append(owners[-1] + count)

    def flat(parts):
        return (np.concatenate(parts).astype(np.int32),
                np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64))

    prompt_tokens, prompt_offsets = flat(prompts)
    rationale_tokens, rationale_offsets = flat(rationales)
    span_tokens, span_offsets = flat(spans)
    return EncodedDataset(layout="decoder_only", pad_id=0, decoder_start_id=0,
                          prompt_tokens=prompt_tokens, prompt_offsets=prompt_offsets,
                          rationale_tokens=rationale_tokens, rationale_offsets=rationale_offsets,
                          question_rationales=np.asarray(owners, np.int64),
                          span_start=np.asarray(starts, np.int64), span_tokens=span_tokens,
                          span_offsets=span_offsets, record_index=np.arange(num_questions))


def both_batches(data, num_rationales, groups, row_length=64, shared_prompt=False):
    questions = list(range(data.num_questions))
    choices = [list(range(data.question_rationales[q], data.question_rationales[q + 1]))
               [:num_rationales] for q in questions]
    length = int(max(packing.sequence_length(data, q, r) for q, c in zip(questions, choices)
                     for r in c))
    unpacked = batching.build_train_batch(data, questions, choices, num_rationales=num_rationales,
                                          length=length, span_length=4)
    if shared_prompt:
        row_length = max(packing.shared_length(data, q, c) for q, c in zip(questions, choices))
    rows = packing.rows_needed(data, questions, choices, row_length=row_length, groups=groups,
                               shared_prompt=shared_prompt)
    packed = packing.build_packed_batch(data, questions, choices, num_rationales=num_rationales,
                                        row_length=row_length, num_rows=rows, span_length=4,
                                        groups=groups, shared_prompt=shared_prompt)
    del unpacked["question_index"], packed["question_index"]
    return unpacked, packed


def loss_and_grads(batch, mesh_shape):
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    with sharding.activate(mesh):
        model = decoder.DecoderModel(llama.tiny(vocab_size=VOCAB, max_position_embeddings=128),
                                     rngs=nnx.Rngs(0))
    tx = optax.sgd(1.0)  # the update is minus the gradient
    graphdef, state, shardings = train_state.create_train_state(model, tx, mesh=mesh)
    step = train_step.make_train_step(
        graphdef, tx, train_step.ObjectiveConfig(alpha=1.0, chunk_size=16),
        opt.learning_rate_schedule(OPTIMIZER, 10))
    placed = jax.device_put(batch, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    with sharding.activate(mesh):
        new_state, metrics = jax.jit(step)(state, placed)
    state = jax.tree.map(np.asarray, state)
    grads = jax.tree.map(lambda new, old: np.asarray(old) - np.asarray(new), new_state.params,
                         state.params)
    return {k: float(v) for k, v in metrics.items()}, grads


def assert_same_gradients(grads, reference):
    """rtol 1e-5, with an absolute floor of 1e-5 of the largest gradient entry: the packed step
    adds the same contributions in another order (a shared prompt's gradient arrives once for
    its K views), and entries near zero keep float32's rounding of the larger terms. The
    attention softmax runs in float32 whatever the model's dtype, so a float64 run leaves the
    same floor (measured: 2.2e-7 of each tensor's largest entry, packed or not)."""
    floor = 1e-5 * max(float(np.abs(g).max()) for g in jax.tree.leaves(reference))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=floor), grads,
                 reference)


@pytest.mark.parametrize("shared_prompt", [False, True])
@pytest.mark.parametrize("num_rationales", [2, 3, 4])
def test_a_packed_step_equals_the_unpacked_step(num_rationales, shared_prompt):
    unpacked, packed = both_batches(encoded(num_rationales), num_rationales, groups=1,
                                    shared_prompt=shared_prompt)
    assert packed["tokens"].size < unpacked["tokens"].size  # it packs
    reference, reference_delta = loss_and_grads(unpacked, (1, 1, 1))
    result, delta = loss_and_grads(packed, (1, 1, 1))
    for name in ("loss", "ce", "kl", "grad_norm", "ce_tokens", "kl_count", "argmax_agreement"):
        assert result[name] == pytest.approx(reference[name], rel=1e-5), name
    assert_same_gradients(delta, reference_delta)


@pytest.mark.slow
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_a_packed_step_on_a_mesh_equals_the_unpacked_step_on_one_device(shared_prompt):
    unpacked, packed = both_batches(encoded(7), 3, groups=4, shared_prompt=shared_prompt)
    reference, reference_delta = loss_and_grads(unpacked, (1, 1, 1))
    result, delta = loss_and_grads(packed, (2, 2, 2))
    for name in ("loss", "ce", "kl", "grad_norm"):
        assert result[name] == pytest.approx(reference[name], rel=1e-5), name
    assert_same_gradients(delta, reference_delta)


def test_no_attention_crosses_sequences():
    data = encoded(3)
    _, packed = both_batches(data, 3, groups=1)
    row = int(np.argmax((packed["segment_ids"].max(axis=1))))  # a row with several sequences
    assert packed["segment_ids"][row].max() >= 2
    with sharding.activate(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        model = decoder.DecoderModel(llama.tiny(vocab_size=VOCAB, max_position_embeddings=128),
                                     rngs=nnx.Rngs(0))
    hidden = np.asarray(model.packed_hidden(jax.tree.map(jnp.asarray, packed)))
    changed = dict(packed, tokens=packed["tokens"].copy())
    first = packed["segment_ids"][row] == 1
    changed["tokens"][row, first] = (changed["tokens"][row, first] + 7) % VOCAB
    after = np.asarray(model.packed_hidden(jax.tree.map(jnp.asarray, changed)))
    others = packed["segment_ids"] != 1
    others[np.arange(len(others)) != row] = True
    np.testing.assert_array_equal(after[others], hidden[others])  # bit for bit
    assert not np.allclose(after[row, first], hidden[row, first])


def test_first_fit_decreasing_fills_rows_in_order():
    assert packing.first_fit_decreasing([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    with pytest.raises(ValueError, match="exceeds the row length"):
        packing.first_fit_decreasing([11], 10)


def test_a_shared_prompt_is_seen_by_its_views_and_views_never_see_each_other():
    data = encoded(5)
    _, packed = both_batches(data, 3, groups=1, shared_prompt=True)
    # positions: 79 + 4 x 150 = 679 in the docstring's example; here: fewer than unpacked.
    _, plain = both_batches(data, 3, groups=1)
    assert packed["segment_ids"].astype(bool).sum() < plain["segment_ids"].astype(bool).sum()
    with sharding.activate(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        model = decoder.DecoderModel(llama.tiny(vocab_size=VOCAB, max_position_embeddings=128),
                                     rngs=nnx.Rngs(0))
    hidden = np.asarray(model.packed_hidden(jax.tree.map(jnp.asarray, packed)))
    row = 0
    segments = packed["segment_ids"][row]
    views = [s for s in np.unique(segments) if s and (packed["prompt_segment_ids"][row][
        segments == s] != s).all()]
    prompt = packed["prompt_segment_ids"][row][segments == views[0]][0]
    siblings = [v for v in views if packed["prompt_segment_ids"][row][segments == v][0] == prompt]
    assert len(siblings) >= 2
    first, second = (segments == siblings[0]), (segments == siblings[1])
    changed = dict(packed, tokens=packed["tokens"].copy())
    changed["tokens"][row, first] = (changed["tokens"][row, first] + 7) % VOCAB
    after = np.asarray(model.packed_hidden(jax.tree.map(jnp.asarray, changed)))
    np.testing.assert_array_equal(after[row, second], hidden[row, second])  # a sibling view
    changed = dict(packed, tokens=packed["tokens"].copy())
    shared = segments == prompt
    changed["tokens"][row, shared] = (changed["tokens"][row, shared] + 7) % VOCAB
    after = np.asarray(model.packed_hidden(jax.tree.map(jnp.asarray, changed)))
    assert not np.allclose(after[row, second], hidden[row, second])  # it reads its prompt
