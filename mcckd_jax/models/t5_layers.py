"""T5 v1.1 / Flan-T5 building blocks in Flax NNX: relative position bias, attention, FFN, blocks.

Attribute names are Hugging Face's (`SelfAttention.q`, `EncDecAttention`, `DenseReluDense.wi_0`,
`layer[i].layer_norm`, ...) so that `hf_names.hf_name` maps every parameter path to its
`T5ForConditionalGeneration` tensor name with an empty prefix.

Dropout sits where Hugging Face's T5 has it (attention probabilities, each sublayer's output
before the residual add, between the feed-forward's input and output maps). Its masks come
from a key passed in (`dropout_key`), split per site: no key means no dropout (evaluation,
decoding), and a key passed as an argument lets `lax.scan` run blocks with dropout.

Shape legend: B batch, L encoder length, T decoder length, S key length (T, L or cache slots),
D d_model, H heads, Hd d_kv (per-head width), F d_ff, N relative-position buckets.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcckd_jax.models import layers
from mcckd_jax.models.attention import cached_attention, dot_product_attention
from mcckd_jax.models.kv_cache import write_slots
from mcckd_jax.sharding import constrain

if TYPE_CHECKING:
    from mcckd_jax.models.t5 import T5Config

ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf)
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

_HEADS = ("act_batch", "act_length", "act_heads", None)
_EMBED = ("act_batch", "act_length", "act_embed")


def split_key(key: jax.Array | None, num: int) -> tuple[jax.Array | None, ...]:
    """`num` independent keys from `key`; `num` Nones when there is no key (no dropout)."""
    return (None,) * num if key is None else tuple(jax.random.split(key, num))


def dropout(module: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """x with `module`'s dropout drawn from `key`; x itself when key is None."""
    return module(x, deterministic=key is None, rngs=key)


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket index of each (key - query) offset, exactly as Hugging Face's T5Attention.

    Half the buckets hold exact small offsets, the rest logarithmic bins up to max_distance;
    a unidirectional (decoder) bias gives every future offset bucket 0. The logarithm runs in
    float32 in Hugging Face's operation order so that offsets on a bin edge round the same way.
    """
    relative_position = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # Distance 0 takes the exact branch; flooring it at 1 only avoids log(0) in the other.
    log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact))
                 * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + log_ratio.astype(np.int64), num_buckets - 1)
    return buckets + np.where(distance < max_exact, distance, large)


@functools.lru_cache(maxsize=None)
def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    # Offsets beyond +-(max_distance + 1) share the outermost buckets, so a table over that
    # range, indexed with clipped offsets, serves every sequence length. Computing it on the
    # host keeps the bucket edges identical on every backend (device logarithms may differ).
    offsets = np.arange(-(max_distance + 1), max_distance + 2)
    return relative_position_bucket(offsets, bidirectional=bidirectional,
                                    num_buckets=num_buckets,
                                    max_distance=max_distance).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """Learned per-head logit bias by bucketed offset; HF's `relative_attention_bias` [N, H]."""

    def __init__(self, config: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nnx.Param(
            layers.normal_init(config.initializer_factor * config.d_model ** -0.5)(
                rngs.params(), (self.num_buckets, config.num_heads),
                layers.dtype_of(config.param_dtype)),
            out_sharding=("relpos_buckets", "heads"))

    def __call__(self, query_positions_T: jax.Array, key_length: int) -> jax.Array:
        """Float32 bias [H, T, S] for queries at the given positions and keys at 0..S-1."""
        table = _bucket_table(self.bidirectional, self.num_buckets, self.max_distance)
        reach = self.max_distance + 1
        offsets_TS = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions_T[:, None]
        buckets_TS = jnp.take(table, jnp.clip(offsets_TS, -reach, reach) + reach)
        bias_TSH = jnp.take(self.embedding[...].astype(jnp.float32), buckets_TS, axis=0)
        return jnp.transpose(bias_TSH, (2, 0, 1))


def _linear(config: T5Config, name: str, in_features: int, out_features: int,
            logical_axes: tuple[str, str], stddev: float, rngs: nnx.Rngs) -> layers.Linear:
    return layers.Linear(in_features, out_features, logical_axes=logical_axes,
                         dtype=layers.dtype_of(config.dtype),
                         param_dtype=layers.dtype_of(config.param_dtype),
                         init_stddev=config.initializer_factor * stddev,
                         lora=layers.lora_for(name, config.lora), rngs=rngs)


def t5_layer_norm(config: T5Config) -> layers.RMSNorm:
    # T5's LayerNorm is an RMS norm: no mean subtraction, no bias.
    return layers.RMSNorm(config.d_model, eps=config.layer_norm_epsilon,
                          dtype=layers.dtype_of(config.dtype),
                          param_dtype=layers.dtype_of(config.param_dtype))


class T5Attention(nnx.Module):
    """Multi-head attention without the 1/sqrt(Hd) logit scale (T5 folds it into the weights)."""

    def __init__(self, config: T5Config, *, relative_bias: bool = False,
                 bidirectional: bool = True, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        width, inner = config.d_model, config.num_heads * config.d_kv
        # Standard deviations of Hugging Face's T5 initialiser (only used without a checkpoint).
        self.q = _linear(config, "q", width, inner, ("embed", "heads"), (width * config.d_kv) ** -0.5, rngs)
        self.k = _linear(config, "k", width, inner, ("embed", "heads"), width ** -0.5, rngs)
        self.v = _linear(config, "v", width, inner, ("embed", "heads"), width ** -0.5, rngs)
        self.o = _linear(config, "o", inner, width, ("heads", "embed"), inner ** -0.5, rngs)
        self.relative_attention_bias = (RelativePositionBias(config, bidirectional=bidirectional,
                                                             rngs=rngs) if relative_bias else None)
        self.dropout = nnx.Dropout(config.dropout_rate)  # on the attention probabilities

    def _split_heads(self, x_BSX: jax.Array) -> jax.Array:
        batch, length, _ = x_BSX.shape
        return constrain(x_BSX.reshape(batch, length, self.num_heads, self.head_dim), _HEADS)

    def key_values(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, H, Hd] of the attended sequence."""
        return self._split_heads(self.k(x_BSD)), self._split_heads(self.v(x_BSD))

    def __call__(self, x_BTD: jax.Array, keys: jax.Array, values: jax.Array,
                 mask_BTS: jax.Array, bias_HTS: jax.Array | None = None, *,
                 cache_layout: bool = False, dropout_key: jax.Array | None = None) -> jax.Array:
        """Attention output [B, T, D] of queries from x over the given keys and values: both
        [B, S, H, Hd] (`key_values`), or with cache_layout keys [B, H, Hd, S] and values
        [B, H, S, Hd] (`kv_cache.KVCache`). With a dropout_key (and a non-zero rate) the
        attention probabilities go through dropout."""
        batch, length, _ = x_BTD.shape
        query_BTHHd = self._split_heads(self.q(x_BTD))
        if dropout_key is not None and self.dropout.rate > 0:
            out_BTHHd = self._attend_with_dropout(query_BTHHd, keys, values, mask_BTS, bias_HTS,
                                                  dropout_key)
        else:
            attend = cached_attention if cache_layout else dot_product_attention
            # scale = 1: T5 never divides the logits by sqrt(Hd); its initialiser and pretrained
            # weights already account for it (the q std is (D * Hd) ** -0.5).
            out_BTHHd = attend(query_BTHHd, keys, values, mask_BTS, scale=1.0, bias_HLS=bias_HTS)
        return self.o(out_BTHHd.reshape(batch, length, self.num_heads * self.head_dim))

    def _attend_with_dropout(self, query_BTHHd, keys_BSHHd, values_BSHHd, mask_BTS, bias_HTS,
                             dropout_key):
        """Hugging Face's eager attention (logit scale 1, softmax in float32) with dropout on
        the probabilities.

        Training with dropout only. Unlike `dot_product_attention` (custom VJP) autodiff keeps
        the [B, H, T, S] probabilities (and their mask) for the backward pass.
        """
        scores_BHTS = jnp.einsum("bthd,bshd->bhts", query_BTHHd, keys_BSHHd,
                                 preferred_element_type=jnp.float32)
        if bias_HTS is not None:
            scores_BHTS = scores_BHTS + jnp.asarray(bias_HTS, jnp.float32)
        scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
        probs_BHTS = dropout(self.dropout, jax.nn.softmax(scores_BHTS, axis=-1), dropout_key)
        return jnp.einsum("bhts,bshd->bthd", probs_BHTS.astype(values_BSHHd.dtype), values_BSHHd)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, relative_bias: bool, bidirectional: bool,
                 rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(config, relative_bias=relative_bias,
                                         bidirectional=bidirectional, rngs=rngs)
        self.layer_norm = t5_layer_norm(config)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x_BTD, mask_BTS, bias_HTS, cached_kv=None, cache_start=None,
                 dropout_key=None):
        """Residual output [B, T, D] and, with a cache, the layer's updated (keys, values)."""
        attention_key, output_key = split_key(dropout_key, 2)
        normed_BTD = self.layer_norm(x_BTD)
        keys, values = self.SelfAttention.key_values(normed_BTD)
        if cached_kv is not None:
            keys, values = write_slots(cached_kv, keys, values, cache_start)
        out_BTD = self.SelfAttention(normed_BTD, keys, values, mask_BTS, bias_HTS,
                                     cache_layout=cached_kv is not None,
                                     dropout_key=attention_key)
        return (x_BTD + dropout(self.dropout, out_BTD, output_key),
                (keys, values) if cached_kv is not None else None)


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        # Cross-attention has no position bias (Hugging Face passes zeros).
        self.EncDecAttention = T5Attention(config, rngs=rngs)
        self.layer_norm = t5_layer_norm(config)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x_BTD, cross_kv, mask_BTL, *, cache_layout: bool = False,
                 dropout_key=None):
        attention_key, output_key = split_key(dropout_key, 2)
        out_BTD = self.EncDecAttention(self.layer_norm(x_BTD), *cross_kv, mask_BTL,
                                       cache_layout=cache_layout, dropout_key=attention_key)
        return x_BTD + dropout(self.dropout, out_BTD, output_key)


class T5DenseGatedActDense(nnx.Module):
    """act(x wi_0) * (x wi_1) wo: T5 v1.1 / Flan-T5 ("gated-gelu" with the tanh GELU)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        width, inner = config.d_model, config.d_ff
        self.activation = config.activation
        self.wi_0 = _linear(config, "wi_0", width, inner, ("embed", "mlp"), width ** -0.5, rngs)
        self.wi_1 = _linear(config, "wi_1", width, inner, ("embed", "mlp"), width ** -0.5, rngs)
        self.wo = _linear(config, "wo", inner, width, ("mlp", "embed"), inner ** -0.5, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x_BTD, dropout_key=None):
        hidden_BTF = ACTIVATIONS[self.activation](self.wi_0(x_BTD)) * self.wi_1(x_BTD)
        hidden_BTF = dropout(self.dropout, hidden_BTF, dropout_key)
        return self.wo(constrain(hidden_BTF, ("act_batch", "act_length", "act_mlp")))


class T5DenseActDense(nnx.Module):
    """act(x wi) wo: the original T5 ("relu")."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        width, inner = config.d_model, config.d_ff
        self.activation = config.activation
        self.wi = _linear(config, "wi", width, inner, ("embed", "mlp"), width ** -0.5, rngs)
        self.wo = _linear(config, "wo", inner, width, ("mlp", "embed"), inner ** -0.5, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x_BTD, dropout_key=None):
        hidden_BTF = dropout(self.dropout, ACTIVATIONS[self.activation](self.wi(x_BTD)),
                             dropout_key)
        return self.wo(constrain(hidden_BTF, ("act_batch", "act_length", "act_mlp")))


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(config, rngs=rngs)
        self.layer_norm = t5_layer_norm(config)
        self.dropout = nnx.Dropout(config.dropout_rate)

    def __call__(self, x_BTD, dropout_key=None):
        inner_key, output_key = split_key(dropout_key, 2)
        out_BTD = self.DenseReluDense(self.layer_norm(x_BTD), inner_key)
        return x_BTD + dropout(self.dropout, out_BTD, output_key)


class T5EncoderBlock(nnx.Module):
    """layer[0] bidirectional self-attention, layer[1] feed-forward."""

    def __init__(self, config: T5Config, *, relative_bias: bool, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(config, relative_bias=relative_bias, bidirectional=True, rngs=rngs),
            T5LayerFF(config, rngs=rngs)])

    def __call__(self, x_BLD, mask_BLL, bias_HLL, dropout_key=None):
        attention_key, ff_key = split_key(dropout_key, 2)
        x_BLD, _ = self.layer[0](x_BLD, mask_BLL, bias_HLL, dropout_key=attention_key)
        return constrain(self.layer[1](x_BLD, ff_key), _EMBED)


class T5DecoderBlock(nnx.Module):
    """layer[0] causal self-attention, layer[1] cross-attention, layer[2] feed-forward."""

    def __init__(self, config: T5Config, *, relative_bias: bool, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(config, relative_bias=relative_bias, bidirectional=False,
                                 rngs=rngs),
            T5LayerCrossAttention(config, rngs=rngs),
            T5LayerFF(config, rngs=rngs)])

    def cross_key_values(self, encoder_hidden_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This block's cross-attention keys and values [B, L, H, Hd]."""
        return self.layer[1].EncDecAttention.key_values(encoder_hidden_BLD)

    def __call__(self, x_BTD, mask_BTS, bias_HTS, cross_kv, cross_mask_BTL, cached_kv=None,
                 cache_start=None, dropout_key=None):
        """Output [B, T, D] and, with a cache, the updated self-attention (keys, values).

        cross_kv: `cross_key_values`, or with a cache (decoding) a block's keys and values of
        `t5.CrossKV`, in the cache layout.
        """
        self_key, cross_key, ff_key = split_key(dropout_key, 3)
        x_BTD, new_kv = self.layer[0](x_BTD, mask_BTS, bias_HTS, cached_kv, cache_start,
                                      dropout_key=self_key)
        x_BTD = self.layer[1](x_BTD, cross_kv, cross_mask_BTL, cache_layout=cached_kv is not None,
                              dropout_key=cross_key)
        return constrain(self.layer[2](x_BTD, ff_key), _EMBED), new_kv
