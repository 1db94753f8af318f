"""Answer-span consistency: the bidirectional KL between the answer-token distributions of a
question's rationales, the count it averages over, and the views' argmax agreement.

Shape legend: B questions, K rationales per question, S answer-span tokens, V vocabulary,
P rationale pairs.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ConsistencyFormulation = Literal["exact", "release"]

# The authors' PyTorch release smooths both distributions with this constant (src/utils.powmax).
RELEASE_SMOOTHING_EPS = 7e-5

# Any logit this far below the row maximum has probability exactly 0 in float32.
_LOGIT_FLOOR = -1e30


def check_temperature(temperature) -> None:
    """Raises at trace time for a concrete temperature <= 0; a traced one cannot be checked."""
    try:
        value = float(temperature)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")


def _check_formulation(formulation) -> None:
    if formulation not in ("exact", "release"):
        raise ValueError(f"formulation must be 'exact' or 'release', got {formulation!r}")


def _exact_kl_sum(span_logits_BKSV, span_mask_BS, rationale_mask_BK, temperature):
    valid_BK = rationale_mask_BK.astype(bool)
    valid_BK11 = valid_BK[:, :, None, None]
    span_weights_BS = span_mask_BS.astype(jnp.float32)
    num_views_B = jnp.sum(valid_BK, axis=1).astype(jnp.float32)

    # The floor keeps masked-vocabulary logits (e.g. finfo.min) finite after dividing by T < 1;
    # such entries have probability exactly 0 in float32 with or without it.
    scaled_BKSV = jnp.maximum(span_logits_BKSV.astype(jnp.float32) / temperature, _LOGIT_FLOOR)
    # Missing views may hold garbage (padding); they are zeroed before entering any sum.
    logp_BKSV = jnp.where(valid_BK11, jax.nn.log_softmax(scaled_BKSV, axis=-1), 0.0)
    p_BKSV = jnp.where(valid_BK11, jnp.exp(logp_BKSV), 0.0)

    # sum_{i<j} <P_i - P_j, log P_i - log P_j> = n * sum_i <P_i - mean P, log P_i - mean log P>.
    # This centred form of the O(K) identity avoids the cancellation between the two large
    # entropy-like terms of the uncentred one when the views nearly agree.
    views_B11 = jnp.maximum(num_views_B, 1.0)[:, None, None]
    p_mean_BSV = jnp.sum(p_BKSV, axis=1) / views_B11
    logp_mean_BSV = jnp.sum(logp_BKSV, axis=1) / views_B11
    centred_BKSV = (p_BKSV - p_mean_BSV[:, None]) * (logp_BKSV - logp_mean_BSV[:, None])
    centred_sum_BS = jnp.sum(jnp.where(valid_BK11, centred_BKSV, 0.0), axis=(1, 3))

    # Mean over the n(n-1)/2 pairs of 0.5 * (KL_ij + KL_ji) = centred_sum / (n - 1).
    pair_mean_BS = centred_sum_BS / jnp.maximum(num_views_B - 1.0, 1.0)[:, None]
    num_span_B = jnp.sum(span_weights_BS, axis=1)
    question_kl_B = jnp.sum(pair_mean_BS * span_weights_BS, axis=1) / jnp.maximum(num_span_B, 1.0)
    counted_B = ((num_views_B >= 2) & (num_span_B > 0)).astype(jnp.float32)
    return jnp.sum(question_kl_B * counted_B), jnp.sum(counted_B)


def _release_smooth(probs_V: Array, eps: float) -> Array:
    shifted = probs_V + eps
    return shifted / (jnp.sum(shifted, axis=-1, keepdims=True) + eps)


def _release_direction_kl(estimate_logits, target_logits, temperature, eps):
    """KL(target || estimate) over the last axis, as the release computes one direction."""
    estimate = _release_smooth(jax.nn.softmax(estimate_logits, axis=-1), eps)
    target = _release_smooth(jax.nn.softmax(target_logits / temperature, axis=-1), eps)
    return jnp.sum(target * (jnp.log(target) - jnp.log(estimate)), axis=-1)


def _release_kl_sum(span_logits_BKSV, span_mask_BS, rationale_mask_BK, temperature):
    num_views = span_logits_BKSV.shape[1]
    first_P, second_P = np.triu_indices(num_views, k=1)
    logits_BKSV = span_logits_BKSV.astype(jnp.float32)
    first_BPSV, second_BPSV = logits_BKSV[:, first_P], logits_BKSV[:, second_P]
    # Differs from the exact definition on purpose, to match the authors' code: the temperature
    # scales the target side only, both sides are smoothed with eps = 7e-5, and the mean runs
    # over all (pair, span token) terms of the batch rather than per question.
    pair_kl_BPS = 0.5 * (
        _release_direction_kl(first_BPSV, second_BPSV, temperature, RELEASE_SMOOTHING_EPS)
        + _release_direction_kl(second_BPSV, first_BPSV, temperature, RELEASE_SMOOTHING_EPS))
    valid_BK = rationale_mask_BK.astype(bool)
    valid_BP = valid_BK[:, first_P] & valid_BK[:, second_P]
    weights_BPS = valid_BP[:, :, None].astype(jnp.float32) * span_mask_BS.astype(jnp.float32)[:, None]
    kl_sum = jnp.sum(jnp.where(weights_BPS > 0, pair_kl_BPS, 0.0) * weights_BPS)
    return kl_sum, jnp.sum(weights_BPS)


def consistency_kl_sum(span_logits: Array, span_mask: Array, rationale_mask: Array,
                       temperature: float = 1.0,
                       formulation: ConsistencyFormulation = "exact") -> tuple[Array, Array]:
    """(kl sum, count) of `answer_consistency_kl`, whose kl is sum / max(count, 1)."""
    check_temperature(temperature)
    _check_formulation(formulation)
    kl_sum = _exact_kl_sum if formulation == "exact" else _release_kl_sum
    return kl_sum(span_logits, span_mask, rationale_mask, temperature)


def answer_consistency_kl(span_logits: Array, span_mask: Array, rationale_mask: Array,
                          temperature: float = 1.0,
                          formulation: ConsistencyFormulation = "exact") -> tuple[Array, Array]:
    """Bidirectional KL between the answer-token distributions of a question's rationales.

    With P_{b,k,s} = softmax(span_logits[b, k, s] / T), the exact formulation is

        KL_b = mean_{valid s} mean_{valid i<j} 0.5 * (KL(P_i || P_j) + KL(P_j || P_i))

    averaged over the questions with at least two valid rationales and one valid span token.
    It is computed in O(K) through sum_{i<j} <P_i - P_j, log P_i - log P_j>
    = n * sum_i <P_i - mean P, log P_i - mean log P>. No T^2 factor; gradients flow into
    every view.

    `formulation="release"` reproduces the authors' PyTorch code instead: per direction,
    target = smooth(softmax(q / T)), estimate = smooth(softmax(p)) with
    smooth(x) = (x + 7e-5) / (sum(x + 7e-5) + 7e-5), KL(target || estimate); the two
    directions averaged, then the mean over all valid (pair, span token) terms of the batch.

    Args:
      span_logits: [B, K, S, V] logits at the positions that predict answer token s (after
        any soft-capping: see `span_logits`).
      span_mask: [B, S] 1 for real answer tokens.
      rationale_mask: [B, K] 1 where rationale k exists.
      temperature: T > 0; a Python number is checked when traced (ValueError).

    Returns:
      (kl, count): float32 scalars; kl is 0 when count is 0. count is the number of
      contributing questions ("exact") or of (pair, span token) terms ("release").
    """
    kl_sum, count = consistency_kl_sum(span_logits, span_mask, rationale_mask, temperature,
                                       formulation)
    return kl_sum / jnp.maximum(count, 1.0), count


def consistency_count(span_mask: Array, rationale_mask: Array,
                      formulation: ConsistencyFormulation = "exact") -> Array:
    """The count that `answer_consistency_kl` returns, from the masks alone (no logits).

    Lets a caller weight micro-batches before their forward pass: the exact gradient of the
    full-batch KL is the sum over micro-batches of grad(kl_i) * count_i / sum_j count_j.
    """
    _check_formulation(formulation)
    valid_BK = rationale_mask.astype(bool)
    num_views_B = jnp.sum(valid_BK, axis=1)
    if formulation == "exact":
        has_span_B = jnp.any(span_mask.astype(bool), axis=1)
        return jnp.sum(((num_views_B >= 2) & has_span_B).astype(jnp.float32))
    pairs_B = (num_views_B * (num_views_B - 1) // 2).astype(jnp.float32)
    return jnp.sum(pairs_B * jnp.sum(span_mask.astype(jnp.float32), axis=1))


def argmax_agreement_sum(span_logits: Array, span_mask: Array,
                         rationale_mask: Array) -> tuple[Array, Array]:
    """(agreeing span tokens, counted span tokens) of `span_argmax_agreement`."""
    valid_BK = rationale_mask.astype(bool)
    argmax_BKS = jnp.argmax(span_logits, axis=-1)
    reference_BS = jnp.take_along_axis(argmax_BKS, jnp.argmax(valid_BK, axis=1)[:, None, None],
                                       axis=1)[:, 0]
    agree_BS = jnp.all((argmax_BKS == reference_BS[:, None]) | ~valid_BK[:, :, None], axis=1)
    counted_BS = (jnp.sum(valid_BK, axis=1) >= 2)[:, None] & span_mask.astype(bool)
    return (jnp.sum((agree_BS & counted_BS).astype(jnp.float32)),
            jnp.sum(counted_BS.astype(jnp.float32)))


def span_argmax_agreement(span_logits: Array, span_mask: Array,
                          rationale_mask: Array) -> tuple[Array, Array]:
    """Share of span tokens where every valid view predicts the same argmax token.

    Only questions with at least two valid rationales are counted.

    Returns:
      (share, num_span_tokens): float32 scalars; share is 0 when no token counts.
    """
    agreeing, num_tokens = argmax_agreement_sum(span_logits, span_mask, rationale_mask)
    return agreeing / jnp.maximum(num_tokens, 1.0), num_tokens


def rationale_counts(span_mask: Array, rationale_mask: Array) -> dict[str, Array]:
    """What the batch holds for the consistency term, from the masks: float32 scalars
    kl_questions (questions with >= 2 rationales and an answer span), kl_pairs (their
    rationale pairs) and single_rationale_questions."""
    num_views_B = jnp.sum(rationale_mask.astype(jnp.float32), axis=1)
    counted_B = (num_views_B >= 2) & jnp.any(span_mask.astype(bool), axis=1)
    return {
        "kl_questions": jnp.sum(counted_B.astype(jnp.float32)),
        "kl_pairs": jnp.sum(jnp.where(counted_B, num_views_B * (num_views_B - 1) / 2, 0.0)),
        "single_rationale_questions": jnp.sum((num_views_B == 1).astype(jnp.float32)),
    }
