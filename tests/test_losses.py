"""mcckd_jax.losses against float64 loop references, PyTorch formulations and hand-worked values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import reference_losses as ref
from mcckd_jax import losses

FLOAT_DTYPES = [jnp.float32, jnp.bfloat16]


def as_float64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def random_span_case(seed, num_views, dtype, num_questions=3, span_len=3, vocab=5):
    """Span logits [B, K, S, V] with a mix of masks: question 0 keeps every view and token,
    the last question has a single view, and the others are random."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(scale=2.0, size=(num_questions, num_views, span_len, vocab)),
                         dtype)
    rationale_mask = rng.random((num_questions, num_views)) < 0.7
    rationale_mask[0] = True
    rationale_mask[-1] = False
    rationale_mask[-1, 0] = True
    span_mask = rng.random((num_questions, span_len)) < 0.7
    span_mask[0] = True
    span_mask[1, 0] = True
    return logits, jnp.asarray(span_mask), jnp.asarray(rationale_mask)


REFERENCE_KL = {"exact": ref.consistency_kl, "release": ref.release_consistency_kl}


# ------------------------------------------------------------------------------------------
# Cross-entropy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_token_cross_entropy_matches_float64_reference(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 3, 4, 7)), dtype)
    targets = rng.integers(0, 7, size=(2, 3, 4))
    mask = rng.random((2, 3, 4)) < 0.6
    targets[~mask] = -100  # padding ids are never read

    value, count = jax.jit(losses.token_cross_entropy)(logits, targets, mask)
    expected, expected_count = ref.token_cross_entropy(as_float64(logits), targets, mask)
    assert float(count) == expected_count
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)

    grad = jax.grad(lambda x: losses.token_cross_entropy(x, targets, mask)[0])(logits)
    expected_grad = ref.central_difference_grad(
        lambda x: ref.token_cross_entropy(x, targets, mask)[0], as_float64(logits))
    scale = np.abs(expected_grad).max()
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(as_float64(grad), expected_grad, atol=tolerance * scale)


def test_token_cross_entropy_hand_worked():
    # p(target) = 3 / (1 + 3), so the loss is ln(4/3); the masked row never counts.
    logits = jnp.array([[0.0, math.log(3.0)], [50.0, -50.0]])
    value, count = losses.token_cross_entropy(logits, jnp.array([1, 1]), jnp.array([1, 0]))
    assert float(count) == 1.0
    np.testing.assert_allclose(float(value), math.log(4.0 / 3.0), rtol=1e-6)


def test_token_cross_entropy_matches_torch_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 11))
    targets = rng.integers(0, 11, size=6)
    targets[[1, 4]] = -100
    torch_logits = torch.tensor(logits, requires_grad=True)
    torch_loss = F.cross_entropy(torch_logits, torch.tensor(targets), ignore_index=-100)
    torch_loss.backward()

    value, grad = jax.value_and_grad(
        lambda x: losses.token_cross_entropy(x, targets, targets != -100)[0])(
            jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(float(value), torch_loss.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), torch_logits.grad.numpy(), atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 30, 1000])
def test_chunked_cross_entropy_equals_plain(chunk_size):
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(2, 3, 5, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(scale=0.3, size=(16, 33)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 33, size=(2, 3, 5)))
    mask = jnp.asarray(rng.random((2, 3, 5)) < 0.7)

    def plain(h, w):
        return losses.token_cross_entropy(jnp.einsum("...d,dv->...v", h, w), targets, mask)

    def chunked(h, w):
        return losses.chunked_token_cross_entropy(h, w, targets, mask, chunk_size)

    plain_value, plain_count = plain(hidden, weight)
    plain_grads = jax.grad(lambda h, w: plain(h, w)[0], (0, 1))(hidden, weight)
    chunked_value, chunked_count = jax.jit(chunked)(hidden, weight)
    chunked_grads = jax.jit(jax.grad(lambda h, w: chunked(h, w)[0], (0, 1)))(hidden, weight)

    assert float(chunked_count) == float(plain_count)
    np.testing.assert_allclose(float(chunked_value), float(plain_value), rtol=1e-5)
    for got, want in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    expected, _ = ref.token_cross_entropy(
        np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64), targets, mask)
    np.testing.assert_allclose(float(chunked_value), expected, rtol=1e-5)


def test_chunks_of_prompt_and_padding_positions_are_skipped():
    # 6 rows x 8 positions, chunk_size 12: chunks are blocks of 2 positions of every row.
    # Positions 0-3 (the prompt) and 6-7 (padding) carry no loss: their 3 chunks must not run.
    # NaN there is the witness: a computed chunk would turn the loss into NaN (NaN * 0 weight).
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(2, 3, 8, 16)).astype(np.float32)
    weight = jnp.asarray(rng.normal(scale=0.3, size=(16, 33)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 33, size=(2, 3, 8)))
    mask = np.zeros((2, 3, 8), bool)
    mask[..., 4:6] = rng.random((2, 3, 2)) < 0.8
    mask[0, 0, 4] = True  # every kept block has a token
    poisoned = hidden.copy()
    poisoned[..., :4, :] = np.nan
    poisoned[..., 6:, :] = np.nan

    def chunked(h, w):
        return losses.chunked_token_cross_entropy(h, w, targets, jnp.asarray(mask), 12)[0]

    value, grads = jax.jit(jax.value_and_grad(chunked, (0, 1)))(jnp.asarray(poisoned), weight)
    expected, _ = ref.token_cross_entropy(
        hidden.astype(np.float64) @ np.asarray(weight, np.float64), targets, mask)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    hidden_grad = np.asarray(grads[0])
    assert np.all(hidden_grad[..., :4, :] == 0) and np.all(hidden_grad[..., 6:, :] == 0)
    assert np.all(np.isfinite(np.asarray(grads[1])))


def test_chunked_cross_entropy_bfloat16_close_to_plain():
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(4, 9, 16)), jnp.bfloat16)
    weight = jnp.asarray(rng.normal(scale=0.3, size=(16, 40)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 40, size=(4, 9)))
    mask = jnp.ones((4, 9), bool)

    def plain(h, w):
        logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
        return losses.token_cross_entropy(logits, targets, mask)[0]

    def chunked(h, w):
        return losses.chunked_token_cross_entropy(h, w, targets, mask, 8)[0]

    np.testing.assert_allclose(float(chunked(hidden, weight)), float(plain(hidden, weight)),
                               rtol=1e-5)
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, weight),
                         jax.grad(plain, (0, 1))(hidden, weight)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(as_float64(got), as_float64(want),
                                   atol=1e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


@pytest.mark.slow
def test_chunked_cross_entropy_gradient_memory_is_under_a_quarter():
    num_tokens, model_dim, vocab = 8192, 576, 49152  # SmolLM2-135M's width and vocabulary
    args = (jax.ShapeDtypeStruct((num_tokens, model_dim), jnp.float32),
            jax.ShapeDtypeStruct((model_dim, vocab), jnp.float32),
            jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens,), jnp.bool_))

    def plain(h, w, t, m):
        return losses.token_cross_entropy(h @ w, t, m)[0]

    def chunked(h, w, t, m):
        return losses.chunked_token_cross_entropy(h, w, t, m, chunk_size=1024)[0]

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain_bytes, chunked_bytes = temp_bytes(plain), temp_bytes(chunked)
    # The [8192, 49152] float32 logits alone are 1.5 GiB.
    assert plain_bytes > 1.5 * 2**30
    assert chunked_bytes < plain_bytes / 4, (plain_bytes, chunked_bytes)


# ------------------------------------------------------------------------------------------
# Consistency KL
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["exact", "release"])
@pytest.mark.parametrize("num_views", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_consistency_kl_matches_float64_reference(formulation, num_views, dtype):
    logits, span_mask, rationale_mask = random_span_case(10 + num_views, num_views, dtype)
    temperature = 1.5
    reference = REFERENCE_KL[formulation]

    def loss(x):
        return losses.answer_consistency_kl(x, span_mask, rationale_mask, temperature,
                                            formulation)

    value, count = jax.jit(loss)(logits)
    expected, expected_count = reference(as_float64(logits), span_mask, rationale_mask,
                                         temperature)
    assert float(count) == expected_count
    assert float(losses.consistency_count(span_mask, rationale_mask, formulation)) == expected_count
    np.testing.assert_allclose(float(value), expected, rtol=2e-5, atol=1e-7)

    grad = jax.jit(jax.grad(lambda x: loss(x)[0]))(logits)
    expected_grad = ref.central_difference_grad(
        lambda x: reference(x, span_mask, rationale_mask, temperature)[0], as_float64(logits))
    scale = max(np.abs(expected_grad).max(), 1e-3)
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(as_float64(grad), expected_grad, atol=tolerance * scale)
    if num_views == 1:
        assert float(value) == 0.0 and float(count) == 0.0


def test_consistency_kl_hand_worked():
    # P1 = softmax([0, 0]) = (0.5, 0.5), P2 = softmax([ln 9, 0]) = (0.9, 0.1):
    # KL(P1||P2) + KL(P2||P1) = sum (p1 - p2)(ln p1 - ln p2) = 0.4 ln(9/5) + 0.4 ln 5 = 0.4 ln 9,
    # so the symmetric term is 0.2 ln 9. A third view equal to P1 adds pairs worth 0 and 0.2 ln 9.
    views = jnp.array([[0.0, 0.0], [math.log(9.0), 0.0], [0.0, 0.0]])[None, :, None, :]
    span_mask = jnp.ones((1, 1))
    two, _ = losses.answer_consistency_kl(views[:, :2], span_mask, jnp.ones((1, 2)))
    three, count = losses.answer_consistency_kl(views, span_mask, jnp.ones((1, 3)))
    np.testing.assert_allclose(float(two), 0.2 * math.log(9.0), rtol=1e-6)
    np.testing.assert_allclose(float(three), 0.4 * math.log(9.0) / 3, rtol=1e-6)
    assert float(count) == 1.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_consistency_kl_matches_torch_kl_div_for_two_views(temperature):
    rng = np.random.default_rng(4)
    a = torch.tensor(rng.normal(size=(3, 4, 9)), requires_grad=True)  # [B, S, V] view 1
    b = torch.tensor(rng.normal(size=(3, 4, 9)), requires_grad=True)  # view 2

    def kl_div(log_estimate, target):  # summed over the vocabulary, averaged over tokens
        return F.kl_div(log_estimate.reshape(-1, 9), target.reshape(-1, 9),
                        reduction="batchmean")

    torch_value = 0.5 * (
        kl_div(F.log_softmax(b / temperature, -1), F.softmax(a / temperature, -1))
        + kl_div(F.log_softmax(a / temperature, -1), F.softmax(b / temperature, -1)))
    torch_value.backward()

    logits = jnp.asarray(np.stack([a.detach().numpy(), b.detach().numpy()], 1), jnp.float32)
    value, grad = jax.value_and_grad(lambda x: losses.answer_consistency_kl(
        x, jnp.ones((3, 4)), jnp.ones((3, 2)), temperature)[0])(logits)
    np.testing.assert_allclose(float(value), torch_value.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad[:, 0]), a.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[:, 1]), b.grad.numpy(), atol=1e-6)


def test_release_formulation_matches_torch_release_code_path():
    """The authors' criterion in PyTorch: softmax, eps-smoothing, KL over masked tokens."""
    rng = np.random.default_rng(5)
    temperature, eps = 2.0, 7e-5
    p_logits = torch.tensor(rng.normal(size=(3, 4, 9)), requires_grad=True)
    q_logits = torch.tensor(rng.normal(size=(3, 4, 9)), requires_grad=True)
    token_mask = torch.tensor(rng.random((3, 4)) < 0.7)
    token_mask[0, 0] = True

    def smooth(x):
        x = x + eps
        return x / (x.sum(-1, keepdim=True) + eps)

    def direction(logits, targets):
        estimates = smooth(torch.softmax(logits, -1))
        targets = smooth(torch.softmax(targets / temperature, -1))
        kl = torch.sum(targets * (torch.log(targets) - torch.log(estimates)), -1)
        return torch.masked_select(kl, token_mask).mean()

    torch_value = 0.5 * (direction(p_logits, q_logits) + direction(q_logits, p_logits))
    torch_value.backward()

    logits = jnp.asarray(np.stack([p_logits.detach().numpy(), q_logits.detach().numpy()], 1),
                         jnp.float32)
    value, grad = jax.value_and_grad(lambda x: losses.answer_consistency_kl(
        x, jnp.asarray(token_mask.numpy()), jnp.ones((3, 2)), temperature, "release")[0])(logits)
    np.testing.assert_allclose(float(value), torch_value.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad[:, 0]), p_logits.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[:, 1]), q_logits.grad.numpy(), atol=1e-6)


def test_span_argmax_agreement_hand_worked():
    # Question 0: views agree on token 0 (argmax 1, 1) and disagree on token 1 (0 vs 2).
    # Question 1: the disagreeing third view is masked out, so both tokens agree.
    # Question 2 has a single view and is not counted.
    logits = np.zeros((3, 3, 2, 3))
    logits[0, 0, 0, 1] = logits[0, 1, 0, 1] = 1
    logits[0, 0, 1, 0] = logits[0, 1, 1, 2] = 1
    logits[1, :, :, 2] = 1
    logits[1, 2, :, 0] = 5
    rationale_mask = jnp.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]])
    share, tokens = losses.span_argmax_agreement(jnp.asarray(logits), jnp.ones((3, 2)),
                                                 rationale_mask)
    assert float(tokens) == 4.0
    assert float(share) == 0.75


# ------------------------------------------------------------------------------------------
# The full objective
# ------------------------------------------------------------------------------------------


def random_batch(seed, num_questions=4, num_views=3, length=10, span_len=3, model_dim=8,
                 vocab=13):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(num_questions, num_views, length, model_dim))
    weight = rng.normal(scale=0.5, size=(model_dim, vocab))
    targets = rng.integers(0, vocab, size=(num_questions, num_views, length))
    loss_mask = rng.random((num_questions, num_views, length)) < 0.6
    span_positions = rng.integers(0, length, size=(num_questions, num_views, span_len))
    span_mask = np.ones((num_questions, span_len), bool)
    span_mask[1, 2] = False
    rationale_mask = np.ones((num_questions, num_views), bool)
    rationale_mask[1, 2] = False
    rationale_mask[2, 1:] = False  # a single-rationale question
    rationale_mask[3] = False  # a padding question
    loss_mask &= rationale_mask[:, :, None]
    return dict(hidden=hidden, output_weight=weight, targets=targets, loss_mask=loss_mask,
                span_positions=span_positions, span_mask=span_mask,
                rationale_mask=rationale_mask)


def to_jax(batch):
    return {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else None)
            for k, v in batch.items()}


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("formulation", ["exact", "release"])
def test_mcc_kd_loss_matches_reference(chunk_size, formulation):
    batch = random_batch(6)
    alpha, temperature = 0.7, 1.3
    loss, metrics = jax.jit(lambda b: losses.mcc_kd_loss(
        **b, alpha=alpha, temperature=temperature, chunk_size=chunk_size,
        formulation=formulation))(to_jax(batch))

    hidden32 = np.asarray(jnp.asarray(batch["hidden"], jnp.float32), np.float64)
    weight32 = np.asarray(jnp.asarray(batch["output_weight"], jnp.float32), np.float64)
    logits = hidden32 @ weight32
    ce, ce_tokens = ref.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    span_logits = np.empty(batch["span_positions"].shape + (weight32.shape[1],))
    for b, k, s in np.ndindex(*batch["span_positions"].shape):
        span_logits[b, k, s] = logits[b, k, batch["span_positions"][b, k, s]]
    kl, kl_count = REFERENCE_KL[formulation](span_logits, batch["span_mask"],
                                             batch["rationale_mask"], temperature)

    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=2e-5)
    np.testing.assert_allclose(float(loss), ce + alpha * kl, rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)
    assert float(metrics["ce_tokens"]) == ce_tokens
    assert float(metrics["kl_count"]) == kl_count
    # Questions 0 (3 views) and 1 (2 views) count: 3 + 1 pairs, 3 + 2 span tokens.
    assert float(metrics["kl_questions"]) == 2.0
    assert float(metrics["kl_pairs"]) == 4.0
    assert float(metrics["span_tokens"]) == 5.0
    assert float(metrics["single_rationale_questions"]) == 1.0
    agree = [np.all(span_logits[b, views, s].argmax(-1) == span_logits[b, views[0], s].argmax())
             for b, views, tokens in ((0, [0, 1, 2], [0, 1, 2]), (1, [0, 1], [0, 1]))
             for s in tokens]
    np.testing.assert_allclose(float(metrics["argmax_agreement"]), np.mean(agree))


def test_mcc_kd_loss_alpha_zero_is_plain_cross_entropy_and_chunking_keeps_gradients():
    batch = to_jax(random_batch(7))

    def loss(params, alpha, chunk_size):
        return losses.mcc_kd_loss(params["hidden"], params["output_weight"], batch["targets"],
                                  batch["loss_mask"], batch["span_positions"],
                                  batch["span_mask"], batch["rationale_mask"], alpha=alpha,
                                  chunk_size=chunk_size)[0]

    params = {"hidden": batch["hidden"], "output_weight": batch["output_weight"]}
    ce_grads = jax.grad(lambda p: losses.token_cross_entropy(
        jnp.einsum("...d,dv->...v", p["hidden"], p["output_weight"]), batch["targets"],
        batch["loss_mask"])[0])(params)
    zero_alpha = jax.grad(loss)(params, 0.0, 16)
    for name in params:
        np.testing.assert_allclose(zero_alpha[name], ce_grads[name], rtol=1e-5, atol=1e-7)

    plain = jax.grad(loss)(params, 0.5, None)
    chunked = jax.grad(loss)(params, 0.5, 16)
    for name in params:
        np.testing.assert_allclose(chunked[name], plain[name], rtol=1e-5, atol=1e-7)
        assert not np.allclose(plain[name], ce_grads[name])  # the KL term reaches both


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("formulation", ["exact", "release"])
def test_everything_masked_gives_zero_loss_and_zero_finite_gradients(formulation):
    batch = to_jax(random_batch(8))
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"])
    for masked in ("span_mask", "rationale_mask"):
        masked_batch = dict(batch, **{masked: jnp.zeros_like(batch[masked])})
        params = {"hidden": masked_batch.pop("hidden"),
                  "output_weight": masked_batch.pop("output_weight")}
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: losses.mcc_kd_loss(**p, **masked_batch, alpha=1.0, chunk_size=16,
                                         formulation=formulation), has_aux=True)(params)
        assert float(loss) == 0.0 and float(metrics["kl"]) == 0.0
        for name in ("hidden", "output_weight"):
            assert np.all(np.asarray(grads[name]) == 0.0), (masked, name)

    logits = jnp.ones((2, 3, 4, 5))
    value, grad = jax.value_and_grad(lambda x: losses.answer_consistency_kl(
        x, jnp.zeros((2, 4)), jnp.ones((2, 3)), formulation=formulation)[0])(logits)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    value, grad = jax.value_and_grad(lambda x: losses.token_cross_entropy(
        x, jnp.zeros((2, 3), int), jnp.zeros((2, 3)))[0])(logits[:, :, 0])
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("formulation", ["exact", "release"])
def test_very_negative_logits_stay_finite(formulation):
    logits, span_mask, rationale_mask = random_span_case(20, 3, jnp.float32, vocab=6)
    reference = REFERENCE_KL[formulation]
    expected, _ = reference(as_float64(logits), span_mask, rationale_mask, 0.5)

    def kl(x):
        return losses.answer_consistency_kl(x, span_mask, rationale_mask, 0.5, formulation)[0]

    # A constant shift of -1e4 changes nothing.
    np.testing.assert_allclose(float(kl(logits - 1e4)), expected, rtol=1e-3)
    # Entries pushed to the most negative bfloat16 value in every view (a masked vocabulary
    # entry); with T = 0.5 their scaled logits overflow float32 to -inf.
    for dtype in FLOAT_DTYPES:
        masked_vocab = logits.at[..., 0].set(jnp.finfo(jnp.bfloat16).min).astype(dtype)
        value, grad = jax.value_and_grad(kl)(masked_vocab)
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(as_float64(grad)))
        expected_masked, _ = reference(as_float64(masked_vocab), span_mask, rationale_mask, 0.5)
        np.testing.assert_allclose(float(value), expected_masked,
                                   rtol=1e-5 if dtype == jnp.float32 else 1e-2)
    # Cross-entropy with such entries off the target.
    targets = jnp.array([1, 2])
    ce_logits = jnp.array([[-3e38, 0.5, 1.0], [-1e30, -1e30, 2.0]])
    value, grad = jax.value_and_grad(
        lambda x: losses.token_cross_entropy(x, targets, jnp.ones(2))[0])(ce_logits)
    np.testing.assert_allclose(float(value), 0.5 * math.log1p(math.exp(0.5)), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_raises_when_traced(temperature):
    logits, span_mask, rationale_mask = random_span_case(30, 2, jnp.float32)
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda x: losses.answer_consistency_kl(x, span_mask, rationale_mask,
                                                       temperature))(logits)
    batch = to_jax(random_batch(9))
    with pytest.raises(ValueError, match="temperature"):
        jax.jit(lambda b: losses.mcc_kd_loss(**b, alpha=1.0, temperature=temperature))(batch)


def test_unknown_formulation_is_an_error():
    logits, span_mask, rationale_mask = random_span_case(31, 2, jnp.float32)
    with pytest.raises(ValueError, match="formulation"):
        losses.answer_consistency_kl(logits, span_mask, rationale_mask, 1.0, "paper")


# ------------------------------------------------------------------------------------------
# Transformations: vmap and sharded inputs
# ------------------------------------------------------------------------------------------


def test_vmap_over_an_extra_batch_axis_equals_a_loop():
    rng = np.random.default_rng(41)
    logits = jnp.asarray(rng.normal(size=(4, 2, 3, 2, 6)), jnp.float32)
    span_mask = jnp.asarray(rng.random((4, 2, 2)) < 0.8)
    rationale_mask = jnp.asarray(rng.random((4, 2, 3)) < 0.8)
    batched = jax.vmap(losses.answer_consistency_kl)(logits, span_mask, rationale_mask)
    for i in range(4):
        single = losses.answer_consistency_kl(logits[i], span_mask[i], rationale_mask[i])
        np.testing.assert_allclose(float(batched[0][i]), float(single[0]), rtol=1e-6)
        assert float(batched[1][i]) == float(single[1])


def test_sharded_inputs_give_the_single_device_loss_and_gradients():
    assert jax.device_count() == 8, "conftest.py forces 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    batch = to_jax(random_batch(11, num_questions=8, vocab=16))
    batch_spec = P(("data", "fsdp"))
    shardings = {name: NamedSharding(mesh, batch_spec) for name in batch}
    shardings["output_weight"] = NamedSharding(mesh, P(None, "tensor"))

    def loss_and_grads(b):
        return jax.value_and_grad(
            lambda params: losses.mcc_kd_loss(
                params["hidden"], params["output_weight"], b["targets"], b["loss_mask"],
                b["span_positions"], b["span_mask"], b["rationale_mask"], alpha=0.5,
                chunk_size=32)[0])({"hidden": b["hidden"], "output_weight": b["output_weight"]})

    expected_loss, expected_grads = jax.jit(loss_and_grads)(batch)
    sharded_batch = jax.device_put(batch, shardings)
    loss, grads = jax.jit(loss_and_grads, in_shardings=(shardings,))(sharded_batch)
    assert len(sharded_batch["hidden"].sharding.device_set) == 8
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    for name in grads:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(expected_grads[name]),
                                   rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Final-logit soft-capping (Gemma 2: logits = c * tanh((hidden @ W) / c))
# ------------------------------------------------------------------------------------------

# On logits of standard deviation ~10 (capped_case), a cap of 3 leaves tanh far from linear:
# the capped loss differs from the uncapped one, and 1 - tanh^2 is far from 1.
CAP = 3.0


def capped_case(seed, shape=(2, 3, 5), model_dim=16, vocab=33, dtype=jnp.float32):
    """hidden [*shape, D], weight [D, V] with logits of scale ~10, targets and a mask."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(*shape, model_dim)), dtype)
    weight = jnp.asarray(rng.normal(scale=2.5, size=(model_dim, vocab)), dtype)
    targets = jnp.asarray(rng.integers(0, vocab, size=shape))
    mask = rng.random(shape) < 0.7
    mask.flat[0] = True
    return hidden, weight, targets, jnp.asarray(mask)


def capped_full_logits(h, w):
    """The plain full-logits formulation, written here: float32 projection, then the cap."""
    logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
    return CAP * jnp.tanh(logits / CAP)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_softcapped_chunked_cross_entropy_matches_float64_reference(chunk_size):
    hidden, weight, targets, mask = capped_case(50)
    value, count = jax.jit(lambda h, w: losses.chunked_token_cross_entropy(
        h, w, targets, mask, chunk_size, logit_softcap=CAP))(hidden, weight)
    logits64 = as_float64(hidden) @ as_float64(weight)
    expected, expected_count = ref.token_cross_entropy(ref.softcap(logits64, CAP), targets, mask)
    assert float(count) == expected_count
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    uncapped, _ = ref.token_cross_entropy(logits64, targets, mask)
    assert abs(uncapped - expected) > 0.5 * expected  # the cap matters at this scale


@pytest.mark.parametrize("shape,chunk_size", [((2, 3, 5), 4), ((2, 3, 5), 1000), ((30,), 7)])
def test_softcapped_chunked_cross_entropy_gradients_equal_autodiff_of_full_logits(shape,
                                                                                  chunk_size):
    hidden, weight, targets, mask = capped_case(51, shape)

    def plain(h, w):
        return losses.token_cross_entropy(capped_full_logits(h, w), targets, mask)[0]

    def chunked(h, w):
        return losses.chunked_token_cross_entropy(h, w, targets, mask, chunk_size,
                                                  logit_softcap=CAP)[0]

    want = jax.grad(plain, (0, 1))(hidden, weight)
    got = jax.jit(jax.grad(chunked, (0, 1)))(hidden, weight)
    for name, g, w in zip(("hidden", "weight"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-6 * float(jnp.max(jnp.abs(w))), err_msg=name)

    # The same value without the tanh derivative (the cap in the forward pass only) gives
    # gradients far from these: the comparison above can tell.
    def value_capped_only(h, w):
        logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
        logits = logits + jax.lax.stop_gradient(capped_full_logits(h, w) - logits)
        return losses.token_cross_entropy(logits, targets, mask)[0]

    for wrong, w in zip(jax.grad(value_capped_only, (0, 1))(hidden, weight), want):
        assert not np.allclose(np.asarray(wrong), np.asarray(w), rtol=1e-2)


def test_softcapped_chunked_cross_entropy_bfloat16_close_to_plain():
    hidden, weight, targets, mask = capped_case(52, (4, 9), dtype=jnp.bfloat16)

    def plain(h, w):
        return losses.token_cross_entropy(capped_full_logits(h, w), targets, mask)[0]

    def chunked(h, w):
        return losses.chunked_token_cross_entropy(h, w, targets, mask, 8, logit_softcap=CAP)[0]

    np.testing.assert_allclose(float(chunked(hidden, weight)), float(plain(hidden, weight)),
                               rtol=1e-5)
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, weight),
                         jax.grad(plain, (0, 1))(hidden, weight)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(as_float64(got), as_float64(want),
                                   atol=1e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


def capped_batch(seed):
    """random_batch with logits of scale ~10, so that CAP changes every term."""
    batch = random_batch(seed)
    batch["output_weight"] = batch["output_weight"] * 8.0
    return batch


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("formulation", ["exact", "release"])
def test_mcc_kd_loss_with_softcap_matches_float64_reference(chunk_size, formulation):
    batch = capped_batch(53)
    alpha, temperature = 0.7, 1.3
    loss, metrics = jax.jit(lambda b: losses.mcc_kd_loss(
        **b, alpha=alpha, temperature=temperature, chunk_size=chunk_size,
        formulation=formulation, logit_softcap=CAP))(to_jax(batch))

    hidden32 = np.asarray(jnp.asarray(batch["hidden"], jnp.float32), np.float64)
    weight32 = np.asarray(jnp.asarray(batch["output_weight"], jnp.float32), np.float64)
    uncapped_logits = hidden32 @ weight32
    logits = ref.softcap(uncapped_logits, CAP)
    ce, _ = ref.token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    span_logits = np.empty(batch["span_positions"].shape + (weight32.shape[1],))
    uncapped_span = np.empty_like(span_logits)
    for b, k, s in np.ndindex(*batch["span_positions"].shape):
        span_logits[b, k, s] = logits[b, k, batch["span_positions"][b, k, s]]
        uncapped_span[b, k, s] = uncapped_logits[b, k, batch["span_positions"][b, k, s]]
    kl, _ = REFERENCE_KL[formulation](span_logits, batch["span_mask"], batch["rationale_mask"],
                                      temperature)
    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=2e-5)
    np.testing.assert_allclose(float(loss), ce + alpha * kl, rtol=1e-5)

    # The span logits themselves, and the cap changing the KL at this scale.
    got_span = losses.span_logits(to_jax(batch)["hidden"], to_jax(batch)["output_weight"],
                                  batch["span_positions"], logit_softcap=CAP)
    np.testing.assert_allclose(np.asarray(got_span), span_logits, rtol=1e-5, atol=1e-5)
    uncapped_kl, _ = REFERENCE_KL[formulation](uncapped_span, batch["span_mask"],
                                               batch["rationale_mask"], temperature)
    assert abs(uncapped_kl - kl) > 0.1 * kl


def test_mcc_kd_loss_with_softcap_gradients_equal_autodiff_of_full_logits():
    batch = to_jax(capped_batch(54))
    params = {"hidden": batch.pop("hidden"), "output_weight": batch.pop("output_weight")}

    def plain(p):  # written here: full capped logits, then the public loss functions
        logits_BKLV = capped_full_logits(p["hidden"], p["output_weight"])
        ce, _ = losses.token_cross_entropy(logits_BKLV, batch["targets"], batch["loss_mask"])
        span_BKSV = jnp.take_along_axis(logits_BKLV, batch["span_positions"][..., None], axis=2)
        kl, _ = losses.answer_consistency_kl(span_BKSV, batch["span_mask"],
                                             batch["rationale_mask"], 1.3)
        return ce + 0.7 * kl

    def loss(p, chunk_size):
        return losses.mcc_kd_loss(**p, **batch, alpha=0.7, temperature=1.3,
                                  chunk_size=chunk_size, logit_softcap=CAP)[0]

    value, want = jax.value_and_grad(plain)(params)
    for chunk_size in (None, 16):
        got_value, got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunk_size)
        np.testing.assert_allclose(float(got_value), float(value), rtol=1e-5)
        for name in params:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5,
                                       atol=1e-6 * float(jnp.max(jnp.abs(want[name]))),
                                       err_msg=f"{name}, chunk_size {chunk_size}")


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_non_positive_softcap_is_an_error(cap):
    hidden, weight, targets, mask = capped_case(55)
    with pytest.raises(ValueError, match="logit_softcap"):
        losses.chunked_token_cross_entropy(hidden, weight, targets, mask, logit_softcap=cap)


# ------------------------------------------------------------------------------------------
# The table of terms
# ------------------------------------------------------------------------------------------


def split_questions(batch, parts):
    """The batch's questions in `parts` consecutive micro-batches (the weight in each)."""
    size = len(batch["span_mask"]) // parts
    return [{k: v if k == "output_weight" else v[i * size:(i + 1) * size]
             for k, v in batch.items()} for i in range(parts)]


@pytest.mark.parametrize("formulation", ["exact", "release"])
def test_terms_of_micro_batches_add_up_to_the_whole_batch(formulation):
    batch = to_jax(random_batch(56, num_questions=4))
    settings = losses.LossSettings(temperature=1.3, formulation=formulation, chunk_size=16)
    weights = losses.term_weights({"alpha": 0.7})
    assert weights == {"ce": 1.0, "kl": 0.7}
    _, expected = losses.mcc_kd_loss(**batch, alpha=0.7, temperature=1.3, chunk_size=16,
                                     formulation=formulation)

    def micro_sums(params, micro):
        outputs = losses.student_outputs(params["hidden"], params["output_weight"],
                                         micro["span_positions"])
        return losses.evaluate_terms(outputs, micro, settings)

    micros = split_questions(batch, 2)
    params = {"hidden": batch["hidden"], "output_weight": batch["output_weight"]}
    sums = jax.tree.map(jnp.add, *[micro_sums({"hidden": m["hidden"],
                                               "output_weight": m["output_weight"]}, m)
                                   for m in micros])
    metrics = losses.term_metrics(sums, weights)
    for name in ("loss", "ce", "kl", "argmax_agreement", "ce_tokens", "kl_count", "span_tokens"):
        np.testing.assert_allclose(float(metrics[name]), float(expected[name]), rtol=1e-6,
                                   err_msg=name)

    # Each term in the loss knows its count from the masks, and weighting each micro-batch by
    # the whole batch's counts gives the whole batch's gradient.
    totals = {term.name: term.batch_count(batch, settings)
              for term in losses.TERMS if term.name in weights}
    for name, total in totals.items():
        assert float(total) == float(sums[name][1]), name

    def whole(p):
        return losses.mcc_kd_loss(**p, **{k: v for k, v in batch.items() if k not in p},
                                  alpha=0.7, temperature=1.3, chunk_size=16,
                                  formulation=formulation)[0]

    def accumulated(p):
        loss = 0.0
        for i, micro in enumerate(micros):
            rows = slice(i * 2, (i + 1) * 2)
            micro_params = {"hidden": p["hidden"][rows], "output_weight": p["output_weight"]}
            loss += losses.weighted_loss(micro_sums(micro_params, micro), weights, totals)
        return loss

    want, got = jax.grad(whole)(params), jax.grad(accumulated)(params)
    for name in params:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5,
                                   atol=1e-7, err_msg=name)


def test_a_new_term_is_one_function_and_one_weight():
    def span_logit_square(outputs, batch, settings):  # mean squared span logit, a toy term
        del settings
        weights_BKS = (batch["rationale_mask"][:, :, None] & batch["span_mask"][:, None, :])
        square_BKS = jnp.mean(jnp.square(outputs.span_logits_BKSV), axis=-1)
        return (jnp.sum(square_BKS * weights_BKS),
                jnp.sum(weights_BKS.astype(jnp.float32)))

    def span_logit_square_count(batch, settings):
        del settings
        return jnp.sum((batch["rationale_mask"][:, :, None]
                        & batch["span_mask"][:, None, :]).astype(jnp.float32))

    terms = losses.TERMS + (losses.Term("square", "square_count", span_logit_square,
                                        weight="beta", batch_count=span_logit_square_count),)
    batch = to_jax(random_batch(57))
    outputs = losses.student_outputs(batch["hidden"], batch["output_weight"],
                                     batch["span_positions"])
    sums = losses.evaluate_terms(outputs, batch, losses.LossSettings(), terms)
    weights = losses.term_weights({"alpha": 0.7, "beta": 0.1}, terms)
    metrics = losses.term_metrics(sums, weights, terms)
    _, plain = losses.mcc_kd_loss(**batch, alpha=0.7)
    expected_count = np.sum(random_batch(57)["rationale_mask"][:, :, None]
                            & random_batch(57)["span_mask"][:, None, :])
    assert float(metrics["square_count"]) == float(span_logit_square_count(batch, None)) == \
        expected_count
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(plain["loss"]) + 0.1 * float(metrics["square"]), rtol=1e-6)
