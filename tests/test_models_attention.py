"""Attention over the KV cache's layout against a float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from mcckd_jax.models.attention import cached_attention, causal_mask, dot_product_attention
from mcckd_jax.models.kv_cache import KVCache, to_cache_layout, write_slots

B, L, S, H, K, HD = 2, 3, 7, 6, 2, 4  # G = 3 query heads per key/value head


def reference_attention(query_BLHHd, key_BSKHd, value_BSKHd, mask_BLS, scale, bias_BHLS):
    """Float64 softmax attention, one head at a time, keys shared by groups of query heads."""
    groups = H // K
    out = np.zeros(query_BLHHd.shape, np.float64)
    for b in range(B):
        for h in range(H):
            kv = h // groups
            logits = query_BLHHd[b, :, h] @ key_BSKHd[b, :, kv].T * scale + bias_BHLS[b, h]
            logits = np.where(mask_BLS[b], logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ value_BSKHd[b, :, kv]
    return out


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    query = rng.standard_normal((B, L, H, HD))
    key = rng.standard_normal((B, S, K, HD))
    value = rng.standard_normal((B, S, K, HD))
    bias = rng.standard_normal((B, H, L, S))
    valid = np.ones((B, S), bool)
    valid[1, :2] = False  # left padding in the second row
    slots = np.broadcast_to(np.arange(S), (B, S))
    mask = np.asarray(causal_mask(jnp.asarray(slots[:, -L:]), jnp.asarray(slots),
                                  jnp.asarray(valid)))
    return query, key, value, bias, mask


def test_cached_attention_matches_float64_reference_and_the_training_path(inputs):
    query, key, value, bias, mask = inputs
    expected = reference_attention(query, key, value, mask, 0.5, bias)
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    keys_BKHdS, values_BKSHd = to_cache_layout(as_f32(key), as_f32(value))
    assert keys_BKHdS.shape == (B, K, HD, S) and values_BKSHd.shape == (B, K, S, HD)
    cached = cached_attention(as_f32(query), keys_BKHdS, values_BKSHd, jnp.asarray(mask),
                              scale=0.5, bias_HLS=as_f32(bias))
    training = dot_product_attention(as_f32(query), as_f32(key), as_f32(value),
                                     jnp.asarray(mask), scale=0.5, bias_HLS=as_f32(bias))
    np.testing.assert_allclose(np.asarray(cached), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(training), expected, atol=2e-6)


def test_write_slots_places_new_entries_at_the_given_slots(inputs):
    _, key, value, _, _ = inputs
    cache = KVCache.empty(num_layers=1, batch=B, max_length=S, num_kv_heads=K, head_dim=HD,
                          dtype=jnp.float32)
    cached_kv = (cache.keys[0], cache.values[0])
    cached_kv = write_slots(cached_kv, jnp.asarray(key[:, :4], jnp.float32),
                            jnp.asarray(value[:, :4], jnp.float32), jnp.int32(0))
    cached_kv = write_slots(cached_kv, jnp.asarray(key[:, 5:6], jnp.float32),
                            jnp.asarray(value[:, 5:6], jnp.float32), jnp.int32(5))
    expected_keys, expected_values = np.zeros_like(key), np.zeros_like(value)
    expected_keys[:, :4], expected_values[:, :4] = key[:, :4], value[:, :4]
    expected_keys[:, 5], expected_values[:, 5] = key[:, 5], value[:, 5]
    # Back to [B, S, K, Hd] by hand: keys are stored [B, K, Hd, S], values [B, K, S, Hd].
    np.testing.assert_allclose(np.asarray(cached_kv[0]).transpose(0, 3, 1, 2), expected_keys,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(cached_kv[1]).transpose(0, 2, 1, 3), expected_values,
                               atol=1e-6)


@pytest.mark.parametrize("block", [2, 3, 16])
def test_causal_blocks_equal_the_full_square_in_values_and_gradients(monkeypatch, block):
    # 11 positions in blocks of 2 or 3 (the last block short), right padding in one row, GQA
    # and a bias: the blocked path skips only keys the mask forbids anyway.
    import jax

    from mcckd_jax.models import attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
    rng = np.random.default_rng(1)
    length = 11
    query = jnp.asarray(rng.standard_normal((B, length, H, HD)), jnp.float32)
    key = jnp.asarray(rng.standard_normal((B, length, K, HD)), jnp.float32)
    value = jnp.asarray(rng.standard_normal((B, length, K, HD)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((B, H, length, length)), jnp.float32)
    valid = np.ones((B, length), bool)
    valid[1, 8:] = False
    slots = jnp.broadcast_to(jnp.arange(length), (B, length))
    mask = causal_mask(slots, slots, jnp.asarray(valid))

    def loss(q, k, v, b, causal):
        out = dot_product_attention(q, k, v, mask, scale=0.5, bias_HLS=b, causal=causal)
        return jnp.sum(jnp.sin(out) * jnp.asarray(valid)[:, :, None, None])

    full = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(query, key, value, bias, False)
    blocked = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(query, key, value, bias, True)
    np.testing.assert_allclose(float(blocked[0]), float(full[0]), rtol=1e-6)
    for got, want in zip(blocked[1], full[1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    expected = reference_attention(np.asarray(query, np.float64), np.asarray(key, np.float64),
                                   np.asarray(value, np.float64), np.asarray(mask), 0.5,
                                   np.asarray(bias, np.float64))
    out = dot_product_attention(query, key, value, mask, scale=0.5, bias_HLS=bias, causal=True)
    np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], atol=2e-6)
