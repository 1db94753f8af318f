"""MCC-KD losses: multi-rationale token cross-entropy and answer-span consistency KL.

Pure `jax.numpy`; nothing from flax or the rest of the package is imported, so other JAX
codebases can use this module on its own. Every reduction is masked, softmax and
accumulation run in float32 whatever the input dtype, and each loss returns its value together
with the count it averages over, so that micro-batches and hosts combine exactly:
`total = sum(value_i * count_i) / sum(count_i)`.

Shape legend: B questions, K rationales per question, L sequence length, S answer-span tokens,
V vocabulary, D model width, N flattened tokens, C tokens per chunk, J chunks.
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


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


def token_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Masked mean of -log softmax(logits)[target].

    Args:
      logits: [..., V], any float dtype; upcast to float32 before the softmax.
      targets: [...] int. Entries where `mask` is 0 are never read (padding may hold any id).
      mask: [...] bool or 0/1; other values act as per-token weights.

    Returns:
      (mean_nll, token_count): float32 scalars; mean_nll is 0 when token_count is 0.
    """
    weights = mask.astype(jnp.float32)
    logits_f32 = logits.astype(jnp.float32)
    safe_targets = jnp.where(weights != 0, targets, 0)
    log_normalizer = jax.nn.logsumexp(logits_f32, axis=-1)
    target_logit = jnp.take_along_axis(logits_f32, safe_targets[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((log_normalizer - target_logit) * weights)
    token_count = jnp.sum(weights)
    return nll_sum / jnp.maximum(token_count, 1.0), token_count


def _project_to_vocab(hidden_CD: Array, weight_DV: Array) -> Array:
    """Logits [C, V] in float32, from activations in their own (compute) dtype."""
    return jnp.einsum("cd,dv->cv", hidden_CD, weight_DV, preferred_element_type=jnp.float32)


def _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C, with_grads: bool):
    """Weighted nll sum of one chunk and, optionally, its gradients w.r.t. hidden and weight."""
    logits_CV = _project_to_vocab(hidden_CD, weight_DV)
    log_normalizer_C = jax.nn.logsumexp(logits_CV, axis=-1)
    target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    nll_sum = jnp.sum((log_normalizer_C - target_logit_C) * weights_C)
    if not with_grads:
        return nll_sum, None, None
    probs_CV = jnp.exp(logits_CV - log_normalizer_C[:, None])
    target_onehot_CV = jax.nn.one_hot(targets_C, weight_DV.shape[1], dtype=jnp.float32)
    # Same dtype handling as autodiff of the plain projection: the logits cotangent enters the
    # two matmuls in the activations' dtype, and the weight gradient accumulates in float32.
    logits_grad_CV = ((probs_CV - target_onehot_CV) * weights_C[:, None]).astype(hidden_CD.dtype)
    hidden_grad_CD = jnp.einsum("cv,dv->cd", logits_grad_CV, weight_DV,
                                preferred_element_type=jnp.float32)
    weight_grad_DV = jnp.einsum("cd,cv->dv", hidden_CD, logits_grad_CV,
                                preferred_element_type=jnp.float32)
    return nll_sum, hidden_grad_CD, weight_grad_DV


def _unless_masked(weights_C, compute, zeros):
    """compute() for a chunk with a token to learn from, zeros() without running it: a chunk of
    prompt or padding positions costs no vocabulary-sized matmul."""
    return jax.lax.cond(jnp.any(weights_C != 0), compute, zeros)


@jax.custom_vjp
def _chunked_nll_sum(hidden_JCD: Array, weight_DV: Array, targets_JC: Array,
                     weights_JC: Array) -> Array:
    """Sum over all chunks and tokens of weight * -log p(target); float32 scalar."""
    def one_chunk(nll_sum, chunk):
        hidden_CD, targets_C, weights_C = chunk
        chunk_nll = _unless_masked(
            weights_C, lambda: _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C,
                                                    with_grads=False)[0],
            lambda: jnp.zeros((), jnp.float32))
        return nll_sum + chunk_nll, None

    nll_sum, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32),
                              (hidden_JCD, targets_JC, weights_JC))
    return nll_sum


def _chunked_nll_sum_fwd(hidden_JCD, weight_DV, targets_JC, weights_JC):
    # The loss is a scalar, so its gradients are known up to the incoming cotangent already in
    # the forward pass: computing them here saves recomputing every chunk's logits backward
    # (3 vocabulary-sized matmuls instead of 4). Residuals are [J, C, D] and [D, V] only.
    def one_chunk(carry, chunk):
        nll_sum, weight_grad_DV = carry
        hidden_CD, targets_C, weights_C = chunk
        chunk_nll, hidden_grad_CD, chunk_weight_grad_DV = _unless_masked(
            weights_C, lambda: _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C,
                                                    with_grads=True),
            lambda: (jnp.zeros((), jnp.float32), jnp.zeros(hidden_CD.shape, jnp.float32),
                     jnp.zeros(weight_DV.shape, jnp.float32)))
        return (nll_sum + chunk_nll, weight_grad_DV + chunk_weight_grad_DV), hidden_grad_CD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(weight_DV.shape, jnp.float32))
    (nll_sum, weight_grad_DV), hidden_grad_JCD = jax.lax.scan(
        one_chunk, init, (hidden_JCD, targets_JC, weights_JC))
    return nll_sum, (hidden_grad_JCD.astype(hidden_JCD.dtype), weight_grad_DV.astype(weight_DV.dtype))


def _chunked_nll_sum_bwd(residuals, nll_sum_cotangent):
    hidden_grad_JCD, weight_grad_DV = residuals
    return (nll_sum_cotangent.astype(hidden_grad_JCD.dtype) * hidden_grad_JCD,
            nll_sum_cotangent.astype(weight_grad_DV.dtype) * weight_grad_DV, None, None)


_chunked_nll_sum.defvjp(_chunked_nll_sum_fwd, _chunked_nll_sum_bwd)


def _chunk_layout(shape: tuple[int, ...], chunk_size: int) -> tuple[int, int, int, bool]:
    """(rows R, positions per row P, chunks J, by_position) for hidden states of `shape`[:-1].

    With a position axis ([..., L, D], rows = the leading dimensions) a chunk is a block of
    consecutive positions of every row; otherwise ([N, D]) chunks are strided."""
    if len(shape) >= 3:
        rows, positions = int(np.prod(shape[:-2])), shape[-2]
        block = max(1, chunk_size // rows)
        return rows, positions, -(-positions // block), True
    num_tokens = int(np.prod(shape[:-1]))
    return num_tokens, 1, max(1, -(-num_tokens // chunk_size)), False


def chunked_token_cross_entropy(hidden: Array, output_weight: Array, targets: Array, mask: Array,
                                chunk_size: int = 1024) -> tuple[Array, Array]:
    """`token_cross_entropy(hidden @ output_weight, targets, mask)` without materialising logits.

    The tokens are cut into chunks of about chunk_size, and only one chunk's float32 logits
    ([C, V] instead of [N, V]) exist at a time. Under differentiation a custom VJP computes each
    chunk's gradients in the same pass as its loss. A chunk without any masked-in token (all
    prompt or padding) is skipped at run time: no logits, no matmul.

    Layout. With a position axis, hidden [..., L, D], a chunk is a block of consecutive
    positions of every row (rows: the leading dimensions), so that prompt positions, which
    come first in every row, and trailing padding make whole chunks to skip. With hidden
    [N, D], token t belongs to chunk t mod J. Either way a sharded leading (batch) dimension
    stays sharded inside every chunk and each device works on its share.

    Args:
      hidden: [..., D] final hidden states (after the final norm), compute dtype.
      output_weight: [D, V] output projection. For tied embeddings pass `embedding.T`.
      targets: [...] int; mask: [...] bool or 0/1 weights (as in `token_cross_entropy`).
      chunk_size: tokens per chunk, across all devices; a Python int.

    Returns:
      (mean_nll, token_count): float32 scalars; gradients flow to hidden and output_weight.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    model_dim = hidden.shape[-1]
    rows, positions, num_chunks, by_position = _chunk_layout(hidden.shape, chunk_size)
    per_chunk = -(-positions // num_chunks) if by_position else -(-rows // num_chunks)
    weights = mask.astype(jnp.float32).reshape(rows, positions)
    targets = jnp.where(weights != 0, targets.reshape(rows, positions), 0)
    hidden = hidden.reshape(rows, positions, model_dim)
    if by_position:  # [R, P] -> [J, R * C/R]: position block j of every row
        padding = num_chunks * per_chunk - positions

        def to_chunks(x):
            x = jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))
            x = x.reshape(rows, num_chunks, per_chunk, *x.shape[2:])
            return jnp.moveaxis(x, 1, 0).reshape(num_chunks, rows * per_chunk, *x.shape[3:])
    else:  # [N, 1] -> [J, C]: token t in chunk t mod J
        padding = num_chunks * per_chunk - rows

        def to_chunks(x):
            x = jnp.pad(x[:, 0], [(0, padding)] + [(0, 0)] * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(per_chunk, num_chunks, *x.shape[1:]), 1, 0)

    nll_sum = _chunked_nll_sum(to_chunks(hidden), output_weight, to_chunks(targets),
                               to_chunks(weights))
    token_count = jnp.sum(weights)
    return nll_sum / jnp.maximum(token_count, 1.0), token_count


# --------------------------------------------------------------------------------------------
# Answer-span consistency
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature) -> None:
    """Raises at trace time for a concrete temperature <= 0; a traced one cannot be checked."""
    try:
        value = float(temperature)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")


def _exact_consistency_kl(span_logits_BKSV, span_mask_BS, rationale_mask_BK, temperature):
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
    num_questions = jnp.sum(counted_B)
    return jnp.sum(question_kl_B * counted_B) / jnp.maximum(num_questions, 1.0), num_questions


def _release_smooth(probs_V: Array, eps: float) -> Array:
    shifted = probs_V + eps
    return shifted / (jnp.sum(shifted, axis=-1, keepdims=True) + eps)


def _release_direction_kl(estimate_logits, target_logits, temperature, eps):
    """KL(target || estimate) over the last axis, as the release computes one direction."""
    estimate = _release_smooth(jax.nn.softmax(estimate_logits, axis=-1), eps)
    target = _release_smooth(jax.nn.softmax(target_logits / temperature, axis=-1), eps)
    return jnp.sum(target * (jnp.log(target) - jnp.log(estimate)), axis=-1)


def _release_consistency_kl(span_logits_BKSV, span_mask_BS, rationale_mask_BK, temperature):
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
    num_terms = jnp.sum(weights_BPS)
    kl_sum = jnp.sum(jnp.where(weights_BPS > 0, pair_kl_BPS, 0.0) * weights_BPS)
    return kl_sum / jnp.maximum(num_terms, 1.0), num_terms


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
      span_logits: [B, K, S, V] logits at the positions that predict answer token s.
      span_mask: [B, S] 1 for real answer tokens.
      rationale_mask: [B, K] 1 where rationale k exists.
      temperature: T > 0; a Python number is checked when traced (ValueError).

    Returns:
      (kl, count): float32 scalars; kl is 0 when count is 0. count is the number of
      contributing questions ("exact") or of (pair, span token) terms ("release").
    """
    _check_temperature(temperature)
    if formulation == "exact":
        return _exact_consistency_kl(span_logits, span_mask, rationale_mask, temperature)
    if formulation == "release":
        return _release_consistency_kl(span_logits, span_mask, rationale_mask, temperature)
    raise ValueError(f"formulation must be 'exact' or 'release', got {formulation!r}")


def consistency_count(span_mask: Array, rationale_mask: Array,
                      formulation: ConsistencyFormulation = "exact") -> Array:
    """The count that `answer_consistency_kl` returns, from the masks alone (no logits).

    Lets a caller weight micro-batches before their forward pass: the exact gradient of the
    full-batch KL is the sum over micro-batches of grad(kl_i) * count_i / sum_j count_j.
    """
    valid_BK = rationale_mask.astype(bool)
    num_views_B = jnp.sum(valid_BK, axis=1)
    if formulation == "exact":
        has_span_B = jnp.any(span_mask.astype(bool), axis=1)
        return jnp.sum(((num_views_B >= 2) & has_span_B).astype(jnp.float32))
    if formulation == "release":
        pairs_B = (num_views_B * (num_views_B - 1) // 2).astype(jnp.float32)
        return jnp.sum(pairs_B * jnp.sum(span_mask.astype(jnp.float32), axis=1))
    raise ValueError(f"formulation must be 'exact' or 'release', got {formulation!r}")


def span_argmax_agreement(span_logits: Array, span_mask: Array,
                          rationale_mask: Array) -> tuple[Array, Array]:
    """Share of span tokens where every valid view predicts the same argmax token.

    Only questions with at least two valid rationales are counted.

    Returns:
      (share, num_span_tokens): float32 scalars; share is 0 when no token counts.
    """
    valid_BK = rationale_mask.astype(bool)
    argmax_BKS = jnp.argmax(span_logits, axis=-1)
    reference_BS = jnp.take_along_axis(argmax_BKS, jnp.argmax(valid_BK, axis=1)[:, None, None],
                                       axis=1)[:, 0]
    agree_BS = jnp.all((argmax_BKS == reference_BS[:, None]) | ~valid_BK[:, :, None], axis=1)
    counted_BS = (jnp.sum(valid_BK, axis=1) >= 2)[:, None] & span_mask.astype(bool)
    num_tokens = jnp.sum(counted_BS.astype(jnp.float32))
    share = jnp.sum((agree_BS & counted_BS).astype(jnp.float32)) / jnp.maximum(num_tokens, 1.0)
    return share, num_tokens


# --------------------------------------------------------------------------------------------
# The MCC-KD objective
# --------------------------------------------------------------------------------------------


def gather_span_hidden(hidden_BKLD: Array, span_positions_BKS: Array) -> Array:
    """Hidden states [B, K, S, D] at the positions that predict each answer token.

    Positions outside [0, L) (padding) are clamped; mask them with span_mask.
    """
    return jnp.take_along_axis(hidden_BKLD, span_positions_BKS[..., None], axis=2, mode="clip")


def mcc_kd_loss(hidden: Array, output_weight: Array, targets: Array, loss_mask: Array,
                span_positions: Array, span_mask: Array, rationale_mask: Array, *,
                alpha: float, temperature: float = 1.0, chunk_size: int | None = 1024,
                formulation: ConsistencyFormulation = "exact") -> tuple[Array, dict[str, Array]]:
    """CE over all rationale tokens + alpha * answer-span consistency KL.

    The fields follow the batch contract (README, "The batch contract"). Full-vocabulary
    logits are never built for the cross-entropy when chunk_size is set; the KL projects only
    the span positions.

    Args:
      hidden: [B, K, L, D] final hidden states of the student (compute dtype).
      output_weight: [D, V] output projection (`embedding.T` for tied embeddings).
      targets, loss_mask: [B, K, L] next tokens and 1 where they are rationale/EOS tokens.
      span_positions: [B, K, S] int positions whose prediction is answer token s.
      span_mask: [B, S]; rationale_mask: [B, K].
      alpha: weight of the consistency term; 0 gives plain multi-rationale distillation.
      chunk_size: tokens per cross-entropy chunk, or None to build the full logits.

    Returns:
      (loss, metrics): metrics holds float32 scalars: ce, kl, loss, ce_tokens, kl_count (the
      weight of kl, see `answer_consistency_kl`), kl_questions, kl_pairs, span_tokens,
      argmax_agreement and single_rationale_questions.
    """
    if chunk_size is None:
        logits = jnp.einsum("...d,dv->...v", hidden, output_weight,
                            preferred_element_type=jnp.float32)
        ce, ce_tokens = token_cross_entropy(logits, targets, loss_mask)
    else:
        ce, ce_tokens = chunked_token_cross_entropy(hidden, output_weight, targets, loss_mask,
                                                    chunk_size)

    span_logits_BKSV = jnp.einsum("bksd,dv->bksv", gather_span_hidden(hidden, span_positions),
                                  output_weight, preferred_element_type=jnp.float32)
    kl, kl_count = answer_consistency_kl(span_logits_BKSV, span_mask, rationale_mask,
                                         temperature, formulation)
    agreement, span_tokens = span_argmax_agreement(span_logits_BKSV, span_mask, rationale_mask)

    num_views_B = jnp.sum(rationale_mask.astype(jnp.float32), axis=1)
    has_span_B = jnp.any(span_mask.astype(bool), axis=1)
    counted_B = (num_views_B >= 2) & has_span_B
    loss = ce + alpha * kl
    metrics = {
        "loss": loss,
        "ce": ce,
        "kl": kl,
        "ce_tokens": ce_tokens,
        "kl_count": kl_count,
        "kl_questions": jnp.sum(counted_B.astype(jnp.float32)),
        "kl_pairs": jnp.sum(jnp.where(counted_B, num_views_B * (num_views_B - 1) / 2, 0.0)),
        "span_tokens": span_tokens,
        "argmax_agreement": agreement,
        "single_rationale_questions": jnp.sum((num_views_B == 1).astype(jnp.float32)),
    }
    return loss, metrics


__all__ = [
    "ConsistencyFormulation",
    "RELEASE_SMOOTHING_EPS",
    "answer_consistency_kl",
    "chunked_token_cross_entropy",
    "consistency_count",
    "gather_span_hidden",
    "mcc_kd_loss",
    "span_argmax_agreement",
    "token_cross_entropy",
]
