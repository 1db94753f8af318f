"""Scaled dot-product attention with grouped-query heads, masks and an additive bias.

Shape legend: B batch, L query length, S key length, H query heads, K key/value heads,
G = H / K query heads per key/value head, Hd head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(query_BLHHd: jax.Array, key_BSKHd: jax.Array, value_BSKHd: jax.Array,
                          mask_BLS: jax.Array, *, scale: float,
                          bias_HLS: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v, with the softmax in float32.

    Args:
      mask_BLS: True where query l may attend key s. A query with no allowed key gets a
        uniform average (its output is padding and must be masked by the caller).
      bias_HLS: additive logit bias ([H, L, S] or broadcastable, e.g. [B, H, L, S]).

    Returns:
      [B, L, H, Hd] in the query's dtype.
    """
    batch, length, num_heads, head_dim = query_BLHHd.shape
    key_length, num_kv_heads = key_BSKHd.shape[1], key_BSKHd.shape[2]
    groups = num_heads // num_kv_heads
    # One batched matmul per key/value head with the G query heads stacked along the rows
    # ([G * L, Hd] x [Hd, S]) keeps the batch dims leading and the matmuls large, which XLA's
    # CPU backend runs about 3x faster than the equivalent five-index einsum.
    query_BKMHd = query_BLHHd.reshape(batch, length, num_kv_heads, groups, head_dim).transpose(
        0, 2, 3, 1, 4).reshape(batch, num_kv_heads, groups * length, head_dim)
    key_BKHdS = key_BSKHd.transpose(0, 2, 3, 1)
    value_BKSHd = value_BSKHd.transpose(0, 2, 1, 3)
    scores_BKMS = jnp.matmul(query_BKMHd, key_BKHdS, preferred_element_type=jnp.float32)
    scores_BKGLS = scores_BKMS.reshape(batch, num_kv_heads, groups, length, key_length) * scale
    if bias_HLS is not None:
        bias = jnp.asarray(bias_HLS, jnp.float32)
        bias_BHLS = jnp.broadcast_to(bias, (batch,) + bias.shape[-3:])
        scores_BKGLS = scores_BKGLS + bias_BHLS.reshape(batch, num_kv_heads, groups, length, -1)
    scores_BKGLS = jnp.where(mask_BLS[:, None, None], scores_BKGLS,
                             jnp.finfo(jnp.float32).min)
    probs_BKMS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(value_BSKHd.dtype).reshape(
        batch, num_kv_heads, groups * length, key_length)
    out_BKMHd = jnp.matmul(probs_BKMS, value_BKSHd)
    out_BKGLHd = out_BKMHd.reshape(batch, num_kv_heads, groups, length, head_dim)
    return out_BKGLHd.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def causal_mask(query_slots_BL: jax.Array, key_slots_BS: jax.Array,
                key_valid_BS: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """[B, L, S] bool: key s is valid, not in the future and (optionally) within the window."""
    query = query_slots_BL[:, :, None]
    key = key_slots_BS[:, None, :]
    mask = (key <= query) & key_valid_BS[:, None, :]
    if sliding_window is not None:
        mask = mask & (query - key < sliding_window)
    return mask
