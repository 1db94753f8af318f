"""Scaled dot-product attention with grouped-query heads, masks and an additive bias.

Shape legend: B batch, L query length, S key length, H query heads, K key/value heads,
G = H / K query heads per key/value head, Hd head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _scaled_scores(query_BKMHd, key_BKSHd, scale, softcap, keys_transposed=False):
    """Unmasked float32 logits [B, K, M, S] (q k^T * scale, soft-capped when softcap is set)
    from queries stacked as M = G * L rows (keys [B, K, Hd, S] when keys_transposed, as the KV
    cache holds them)."""
    equation = "bkmd,bkds->bkms" if keys_transposed else "bkmd,bksd->bkms"
    scores_BKMS = jnp.einsum(equation, query_BKMHd, key_BKSHd,
                             preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores_BKMS = jnp.tanh(scores_BKMS / softcap) * softcap
    return scores_BKMS


def _grouped_scores(query_BKMHd, key_BKSHd, mask_BLS, bias_BKGLS, scale, groups, softcap=None,
                    keys_transposed=False):
    """Masked float32 logits [B, K, G, L, S]: `_scaled_scores` plus the bias."""
    batch, num_kv_heads, rows, _ = query_BKMHd.shape
    scores_BKMS = _scaled_scores(query_BKMHd, key_BKSHd, scale, softcap, keys_transposed)
    scores_BKGLS = scores_BKMS.reshape(batch, num_kv_heads, groups, rows // groups, -1)
    if bias_BKGLS is not None:
        scores_BKGLS = scores_BKGLS + bias_BKGLS
    return jnp.where(mask_BLS[:, None, None], scores_BKGLS, jnp.finfo(jnp.float32).min)


def _attend(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
            softcap=None, keys_transposed=False):
    scores_BKGLS = _grouped_scores(query_BKMHd, key_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
                                   softcap, keys_transposed)
    log_normalizer_BKGL = jax.nn.logsumexp(scores_BKGLS, axis=-1)
    probs_BKGLS = jnp.exp(scores_BKGLS - log_normalizer_BKGL[..., None])
    batch, num_kv_heads, rows, _ = query_BKMHd.shape
    probs_BKMS = probs_BKGLS.astype(value_BKSHd.dtype).reshape(batch, num_kv_heads, rows, -1)
    return jnp.einsum("bkms,bksd->bkmd", probs_BKMS, value_BKSHd), log_normalizer_BKGL


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
               softcap):
    return _attend(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
                   softcap)[0]


def _attention_fwd(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
                   softcap):
    out_BKMHd, log_normalizer_BKGL = _attend(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS,
                                             bias_BKGLS, scale, groups, softcap)
    # Only the inputs, the output and one normalizer per query are kept: the [L, S]
    # probabilities are recomputed in the backward pass instead of being stored for every
    # layer (they dominated the step's memory).
    return out_BKMHd, (query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, out_BKMHd,
                       log_normalizer_BKGL)


def _attention_bwd(scale, groups, softcap, residuals, out_grad_BKMHd):
    query, key, value, mask_BLS, bias_BKGLS, out, log_normalizer_BKGL = residuals
    scores_BKGLS = _grouped_scores(query, key, mask_BLS, bias_BKGLS, scale, groups, softcap)
    probs_BKGLS = jnp.exp(scores_BKGLS - log_normalizer_BKGL[..., None])
    batch, num_kv_heads, rows, _ = query.shape
    probs_BKMS = probs_BKGLS.reshape(batch, num_kv_heads, rows, -1)
    value_grad = jnp.einsum("bkms,bkmd->bksd", probs_BKMS.astype(out_grad_BKMHd.dtype),
                            out_grad_BKMHd, preferred_element_type=jnp.float32)
    probs_grad_BKMS = jnp.einsum("bkmd,bksd->bkms", out_grad_BKMHd, value,
                                 preferred_element_type=jnp.float32)
    # d softmax: p * (dp - sum_s p dp), with sum_s p dp = <dout, out> per query row.
    row_dot_BKM = jnp.sum(out_grad_BKMHd.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    scores_grad_BKMS = probs_BKMS * (probs_grad_BKMS - row_dot_BKM[..., None])
    scores_grad_BKGLS = scores_grad_BKMS.reshape(probs_BKGLS.shape)
    bias_grad = None
    if bias_BKGLS is not None:
        bias_grad = _sum_to_shape(scores_grad_BKGLS, bias_BKGLS.shape).astype(bias_BKGLS.dtype)
    if softcap is not None:
        # d(c tanh(x / c))/dx = 1 - tanh^2, from the capped scores before masking (the masked
        # entries' gradients are already zero).
        tanh_BKMS = _scaled_scores(query, key, scale, softcap) / softcap
        scores_grad_BKMS = scores_grad_BKMS * (1.0 - tanh_BKMS * tanh_BKMS)
    scaled_BKMS = (scores_grad_BKMS * scale).astype(query.dtype)
    query_grad = jnp.einsum("bkms,bksd->bkmd", scaled_BKMS, key)
    key_grad = jnp.einsum("bkms,bkmd->bksd", scaled_BKMS, query,
                          preferred_element_type=jnp.float32)
    return (query_grad.astype(query.dtype), key_grad.astype(key.dtype),
            value_grad.astype(value.dtype), None, bias_grad)


def _sum_to_shape(x, shape):
    """Sums the broadcast dimensions of x away so that it has `shape`."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(query_BLHHd: jax.Array, key_BSKHd: jax.Array, value_BSKHd: jax.Array,
                          mask_BLS: jax.Array, *, scale: float,
                          bias_HLS: jax.Array | None = None, causal: bool = False,
                          softcap: float | None = None) -> jax.Array:
    """softmax(cap(q k^T * scale) + bias, masked) v, with the softmax in float32.

    The backward pass recomputes the attention probabilities (a custom VJP) rather than
    keeping them, so a layer stores O(L) per query instead of O(L * S).

    Args:
      mask_BLS: True where query l may attend key s. A query with no allowed key gets a
        uniform average (its output is padding and must be masked by the caller).
      bias_HLS: additive logit bias ([H, L, S] or broadcastable, e.g. [B, H, L, S]); it
        receives gradients (T5's relative position table).
      softcap: c for Gemma 2's soft-capping cap(x) = c * tanh(x / c); None: cap(x) = x.
      causal: the caller guarantees that mask_BLS allows no key s > l (self-attention over
        one sequence, S = L). Queries are then taken in blocks of CAUSAL_BLOCK, each against
        the keys up to its last position only: about half the work of the full square.

    Returns:
      [B, L, H, Hd] in the query's dtype.
    """
    num_kv_heads = key_BSKHd.shape[2]
    query_BKMHd, bias_BKGLS, groups = _group_heads(query_BLHHd, bias_HLS, num_kv_heads)
    key_BKSHd, value_BKSHd = key_BSKHd.transpose(0, 2, 1, 3), value_BSKHd.transpose(0, 2, 1, 3)
    if causal and query_BLHHd.shape[1] > CAUSAL_BLOCK:
        out_BKMHd = _causal_blocks(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS,
                                   float(scale), groups, softcap)
    else:
        out_BKMHd = _attention(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS,
                               float(scale), groups, softcap)
    return _ungroup_heads(out_BKMHd, query_BLHHd.shape)


# Queries per block of causal attention. Smaller blocks skip more of the masked upper triangle
# (a fraction (n + 1) / (2 n) of the square remains with n blocks) but make more, smaller
# matmuls; 128 kept the SmolLM2 step's attention matmuls near their full-square speed.
CAUSAL_BLOCK = 128


def _causal_blocks(query_BKMHd, key_BKSHd, value_BKSHd, mask_BLS, bias_BKGLS, scale, groups,
                   softcap):
    """`_attention` block by block of query positions, each over the key prefix it can see;
    every block keeps the custom VJP, and autodiff sums the key/value gradients of the
    blocks that share a prefix."""
    batch, num_kv_heads, rows, head_dim = query_BKMHd.shape
    length = rows // groups
    query_BKGLHd = query_BKMHd.reshape(batch, num_kv_heads, groups, length, head_dim)
    outs = []
    for start in range(0, length, CAUSAL_BLOCK):
        stop = min(start + CAUSAL_BLOCK, length)
        block_BKMHd = query_BKGLHd[:, :, :, start:stop].reshape(
            batch, num_kv_heads, groups * (stop - start), head_dim)
        bias = None if bias_BKGLS is None else bias_BKGLS[..., start:stop, :stop]
        out = _attention(block_BKMHd, key_BKSHd[:, :, :stop], value_BKSHd[:, :, :stop],
                         mask_BLS[:, start:stop, :stop], bias, scale, groups, softcap)
        outs.append(out.reshape(batch, num_kv_heads, groups, stop - start, head_dim))
    return jnp.concatenate(outs, axis=3).reshape(query_BKMHd.shape)


def cached_attention(query_BLHHd: jax.Array, keys_BKHdS: jax.Array, values_BKSHd: jax.Array,
                     mask_BLS: jax.Array, *, scale: float,
                     bias_HLS: jax.Array | None = None,
                     softcap: float | None = None) -> jax.Array:
    """`dot_product_attention` over keys and values in the KV cache's layout, read in place.

    For decoding (no custom VJP: nothing is differentiated through a cache). Keys are stored
    transposed, so that both matmuls of a decoding step, [G, Hd] x [Hd, S] and [G, S] x [S, Hd]
    per key/value head, read the cache row-major: with keys as [S, Hd] the first one is about
    1.6x slower on XLA's CPU backend, and with the cache in the projections' [B, S, K, Hd]
    layout every layer would transpose its whole cache at every step.

    Args:
      keys_BKHdS: [B, K, Hd, S]; values_BKSHd: [B, K, S, Hd] (`kv_cache.KVCache`).
      mask_BLS, bias_HLS, softcap: as for `dot_product_attention`.

    Returns:
      [B, L, H, Hd] in the query's dtype.
    """
    query_BKMHd, bias_BKGLS, groups = _group_heads(query_BLHHd, bias_HLS, keys_BKHdS.shape[1])
    out_BKMHd, _ = _attend(query_BKMHd, keys_BKHdS, values_BKSHd, mask_BLS, bias_BKGLS,
                           float(scale), groups, softcap, keys_transposed=True)
    return _ungroup_heads(out_BKMHd, query_BLHHd.shape)


def _group_heads(query_BLHHd, bias_HLS, num_kv_heads):
    """Queries [B, K, M, Hd] with the G query heads of each key/value head stacked as
    M = G * L rows, the bias as [B or 1, K, G, L, S] (None stays None), and G.

    One batched matmul per key/value head ([G * L, Hd] x [Hd, S]) keeps the batch dims
    leading and the matmuls large, which XLA's CPU backend runs about 3x faster than the
    equivalent five-index einsum.
    """
    batch, length, num_heads, head_dim = query_BLHHd.shape
    groups = num_heads // num_kv_heads
    query_BKMHd = query_BLHHd.reshape(batch, length, num_kv_heads, groups, head_dim).transpose(
        0, 2, 3, 1, 4).reshape(batch, num_kv_heads, groups * length, head_dim)
    bias_BKGLS = None
    if bias_HLS is not None:
        bias = jnp.asarray(bias_HLS, jnp.float32)
        lead = bias.shape[0] if bias.ndim == 4 else 1
        bias_BKGLS = bias.reshape(lead, num_kv_heads, groups, length, bias.shape[-1])
    return query_BKMHd, bias_BKGLS, groups


def _ungroup_heads(out_BKMHd, query_shape):
    """[B, K, G * L, Hd] back to the queries' [B, L, H, Hd]."""
    batch, length, num_heads, head_dim = query_shape
    num_kv_heads = out_BKMHd.shape[1]
    out_BKGLHd = out_BKMHd.reshape(batch, num_kv_heads, num_heads // num_kv_heads, length,
                                   head_dim)
    return out_BKGLHd.transpose(0, 3, 1, 2, 4).reshape(query_shape)


def causal_mask(query_slots_BL: jax.Array, key_slots_BS: jax.Array,
                key_valid_BS: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """[B, L, S] bool: key s is valid, not in the future and (optionally) within the window."""
    query = query_slots_BL[:, :, None]
    key = key_slots_BS[:, None, :]
    mask = (key <= query) & key_valid_BS[:, None, :]
    if sliding_window is not None:
        mask = mask & (query - key < sliding_window)
    return mask
