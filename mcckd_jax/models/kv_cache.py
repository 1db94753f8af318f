"""Key/value cache for incremental decoding: an explicit pytree, updated functionally.

Shape legend: B batch, S cache slots, L new tokens, K key/value heads, Hd head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values [B, K, S, Hd], which slots hold real tokens, and the fill level.

    Head-major, so that attention reads each head's keys as one contiguous [S, Hd] matrix
    (`attention.dot_product_attention_head_major`) instead of transposing the cache every step.

    All rows of a batch advance together: slot t of every row is written at decoding step t.
    Left-padded prompts mark their pad slots False in `key_mask`.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array  # [B, S] bool
    length: jax.Array  # int32 scalar: slots [0, length) are written

    @classmethod
    def empty(cls, *, num_layers: int, batch: int, max_length: int, num_kv_heads: int,
              head_dim: int, dtype) -> "KVCache":
        shape = (batch, num_kv_heads, max_length, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(keys=zeros, values=zeros, key_mask=jnp.zeros((batch, max_length), bool),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    def advance(self, new_valid_BL: jax.Array) -> "KVCache":
        """Marks the next L slots as written, valid where new_valid_BL is True."""
        key_mask = jax.lax.dynamic_update_slice_in_dim(self.key_mask, new_valid_BL.astype(bool),
                                                       self.length, axis=1)
        return dataclasses.replace(self, key_mask=key_mask,
                                   length=self.length + new_valid_BL.shape[1])

    def with_layer(self, layer: int, keys_BKSHd: jax.Array, values_BKSHd: jax.Array) -> "KVCache":
        keys = self.keys[:layer] + (keys_BKSHd,) + self.keys[layer + 1:]
        values = self.values[:layer] + (values_BKSHd,) + self.values[layer + 1:]
        return dataclasses.replace(self, keys=keys, values=values)


def write_slots(cache_BKSHd: jax.Array, new_BKLHd: jax.Array, start: jax.Array) -> jax.Array:
    """Writes L new entries at slots [start, start + L)."""
    return jax.lax.dynamic_update_slice_in_dim(cache_BKSHd, new_BKLHd.astype(cache_BKSHd.dtype),
                                               start, axis=2)
