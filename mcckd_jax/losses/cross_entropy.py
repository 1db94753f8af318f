"""Token cross-entropy, plain and chunked (no [N, V] logits), with optional logit soft-capping.

Shape legend: V vocabulary, D model width, N flattened tokens, C tokens per chunk, J chunks,
R rows, P positions per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def softcap(logits: Array, cap: float | None) -> Array:
    """cap * tanh(logits / cap) (Gemma 2's final-logit soft-capping); the logits when None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def check_softcap(cap) -> float | None:
    """The cap as a Python float (it selects the computation, so it cannot be traced)."""
    if cap is None:
        return None
    cap = float(cap)
    if not cap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {cap}")
    return cap


def project_to_vocab(hidden: Array, output_weight_DV: Array,
                     logit_softcap: float | None = None) -> Array:
    """Float32 logits [..., V] of hidden states [..., D]; the cap applies in float32."""
    logits = jnp.einsum("...d,dv->...v", hidden, output_weight_DV,
                        preferred_element_type=jnp.float32)
    return softcap(logits, logit_softcap)


def token_nll_sum(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """(sum of mask * -log softmax(logits)[target], sum of mask): float32 scalars."""
    weights = mask.astype(jnp.float32)
    logits_f32 = logits.astype(jnp.float32)
    safe_targets = jnp.where(weights != 0, targets, 0)
    log_normalizer = jax.nn.logsumexp(logits_f32, axis=-1)
    target_logit = jnp.take_along_axis(logits_f32, safe_targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_normalizer - target_logit) * weights), jnp.sum(weights)


def token_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Masked mean of -log softmax(logits)[target].

    Args:
      logits: [..., V], any float dtype; upcast to float32 before the softmax.
      targets: [...] int. Entries where `mask` is 0 are never read (padding may hold any id).
      mask: [...] bool or 0/1; other values act as per-token weights.

    Returns:
      (mean_nll, token_count): float32 scalars; mean_nll is 0 when token_count is 0.
    """
    nll_sum, token_count = token_nll_sum(logits, targets, mask)
    return nll_sum / jnp.maximum(token_count, 1.0), token_count


def _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C, cap, with_grads: bool):
    """Weighted nll sum of one chunk and, optionally, its gradients w.r.t. hidden and weight."""
    logits_CV = project_to_vocab(hidden_CD, weight_DV, cap)
    log_normalizer_C = jax.nn.logsumexp(logits_CV, axis=-1)
    target_logit_C = jnp.take_along_axis(logits_CV, targets_C[:, None], axis=-1)[:, 0]
    nll_sum = jnp.sum((log_normalizer_C - target_logit_C) * weights_C)
    if not with_grads:
        return nll_sum, None, None
    probs_CV = jnp.exp(logits_CV - log_normalizer_C[:, None])
    target_onehot_CV = jax.nn.one_hot(targets_C, weight_DV.shape[1], dtype=jnp.float32)
    logits_grad_CV = (probs_CV - target_onehot_CV) * weights_C[:, None]
    if cap is not None:  # d/dx c * tanh(x / c) = 1 - tanh(x / c)^2, and tanh(x / c) = logits / c
        logits_grad_CV = logits_grad_CV * (1.0 - jnp.square(logits_CV / cap))
    # Same dtype handling as autodiff of the plain projection: the logits cotangent enters the
    # two matmuls in the activations' dtype, and the weight gradient accumulates in float32.
    logits_grad_CV = logits_grad_CV.astype(hidden_CD.dtype)
    hidden_grad_CD = jnp.einsum("cv,dv->cd", logits_grad_CV, weight_DV,
                                preferred_element_type=jnp.float32)
    weight_grad_DV = jnp.einsum("cd,cv->dv", hidden_CD, logits_grad_CV,
                                preferred_element_type=jnp.float32)
    return nll_sum, hidden_grad_CD, weight_grad_DV


def _unless_masked(weights_C, compute, zeros):
    """compute() for a chunk with a token to learn from, zeros() without running it: a chunk of
    prompt or padding positions costs no vocabulary-sized matmul."""
    return jax.lax.cond(jnp.any(weights_C != 0), compute, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll_sum(hidden_JCD: Array, weight_DV: Array, targets_JC: Array,
                     weights_JC: Array, cap: float | None) -> Array:
    """Sum over all chunks and tokens of weight * -log p(target); float32 scalar."""
    def one_chunk(nll_sum, chunk):
        hidden_CD, targets_C, weights_C = chunk
        chunk_nll = _unless_masked(
            weights_C, lambda: _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C,
                                                    cap, with_grads=False)[0],
            lambda: jnp.zeros((), jnp.float32))
        return nll_sum + chunk_nll, None

    nll_sum, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32),
                              (hidden_JCD, targets_JC, weights_JC))
    return nll_sum


def _chunked_nll_sum_fwd(hidden_JCD, weight_DV, targets_JC, weights_JC, cap):
    # The loss is a scalar, so its gradients are known up to the incoming cotangent already in
    # the forward pass: computing them here saves recomputing every chunk's logits backward
    # (3 vocabulary-sized matmuls instead of 4). Residuals are [J, C, D] and [D, V] only.
    def one_chunk(carry, chunk):
        nll_sum, weight_grad_DV = carry
        hidden_CD, targets_C, weights_C = chunk
        chunk_nll, hidden_grad_CD, chunk_weight_grad_DV = _unless_masked(
            weights_C, lambda: _chunk_nll_and_grads(hidden_CD, weight_DV, targets_C, weights_C,
                                                    cap, with_grads=True),
            lambda: (jnp.zeros((), jnp.float32), jnp.zeros(hidden_CD.shape, jnp.float32),
                     jnp.zeros(weight_DV.shape, jnp.float32)))
        return (nll_sum + chunk_nll, weight_grad_DV + chunk_weight_grad_DV), hidden_grad_CD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(weight_DV.shape, jnp.float32))
    (nll_sum, weight_grad_DV), hidden_grad_JCD = jax.lax.scan(
        one_chunk, init, (hidden_JCD, targets_JC, weights_JC))
    return nll_sum, (hidden_grad_JCD.astype(hidden_JCD.dtype), weight_grad_DV.astype(weight_DV.dtype))


def _chunked_nll_sum_bwd(cap, residuals, nll_sum_cotangent):
    del cap  # already in the residuals
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


def chunked_nll_sum(hidden: Array, output_weight: Array, targets: Array, mask: Array,
                    chunk_size: int = 1024, *,
                    logit_softcap: float | None = None) -> tuple[Array, Array]:
    """(nll sum, token count) of `chunked_token_cross_entropy`: float32 scalars."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    logit_softcap = check_softcap(logit_softcap)
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
                               to_chunks(weights), logit_softcap)
    return nll_sum, jnp.sum(weights)


def chunked_token_cross_entropy(hidden: Array, output_weight: Array, targets: Array, mask: Array,
                                chunk_size: int = 1024, *,
                                logit_softcap: float | None = None) -> tuple[Array, Array]:
    """`token_cross_entropy(softcap(hidden @ output_weight), targets, mask)` without
    materialising logits.

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
      logit_softcap: c for logits c * tanh((hidden @ W) / c) (Gemma 2), applied in float32;
        None for logits hidden @ W. A Python float.

    Returns:
      (mean_nll, token_count): float32 scalars; gradients flow to hidden and output_weight.
    """
    nll_sum, token_count = chunked_nll_sum(hidden, output_weight, targets, mask, chunk_size,
                                           logit_softcap=logit_softcap)
    return nll_sum / jnp.maximum(token_count, 1.0), token_count
