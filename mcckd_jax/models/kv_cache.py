"""Key/value cache for incremental decoding: an explicit pytree, updated functionally.

Shape legend: B batch, S cache slots, L new tokens, K key/value heads, Hd head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mcckd_jax.sharding import constrain

_CACHE = ("act_batch", "act_kv_heads", None, None)  # keys and values: [B, K, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys [B, K, Hd, S] and values [B, K, S, Hd], which slots hold real tokens, and
    the fill level.

    Head-major, with the keys transposed: the layout `attention.cached_attention` reads in
    place (`to_cache_layout` converts the projections' [B, L, K, Hd]).

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
        keys = tuple(jnp.zeros((batch, num_kv_heads, head_dim, max_length), dtype)
                     for _ in range(num_layers))
        values = tuple(jnp.zeros((batch, num_kv_heads, max_length, head_dim), dtype)
                       for _ in range(num_layers))
        return cls(keys=keys, values=values, key_mask=jnp.zeros((batch, max_length), bool),
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

    def constrained(self) -> "KVCache":
        """The cache pinned to the batch/heads layout of the activations, so that every
        decoding step's update stays local to its shard (it is created inside jitted code)."""
        return dataclasses.replace(self, keys=tuple(constrain(k, _CACHE) for k in self.keys),
                                   values=tuple(constrain(v, _CACHE) for v in self.values))

    def with_layer(self, layer: int, keys_BKHdS: jax.Array, values_BKSHd: jax.Array) -> "KVCache":
        keys = self.keys[:layer] + (keys_BKHdS,) + self.keys[layer + 1:]
        values = self.values[:layer] + (values_BKSHd,) + self.values[layer + 1:]
        return dataclasses.replace(self, keys=keys, values=values)


def to_cache_layout(keys_BLKHd: jax.Array,
                    values_BLKHd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys [B, K, Hd, L] and values [B, K, L, Hd] from the projections' [B, L, K, Hd]."""
    return keys_BLKHd.transpose(0, 2, 3, 1), values_BLKHd.transpose(0, 2, 1, 3)


def write_slots(cached_kv: tuple[jax.Array, jax.Array], keys_BLKHd: jax.Array,
                values_BLKHd: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's (keys [B, K, Hd, S], values [B, K, S, Hd]) with L new entries, given in the
    projections' [B, L, K, Hd] layout, written at slots [start, start + L)."""
    cached_keys, cached_values = cached_kv
    new_keys, new_values = to_cache_layout(keys_BLKHd, values_BLKHd)
    return (jax.lax.dynamic_update_slice_in_dim(cached_keys, new_keys.astype(cached_keys.dtype),
                                                start, axis=3),
            jax.lax.dynamic_update_slice_in_dim(cached_values,
                                                new_values.astype(cached_values.dtype),
                                                start, axis=2))
