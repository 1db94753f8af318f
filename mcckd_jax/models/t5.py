"""T5 v1.1 / Flan-T5 encoder-decoder student in Flax NNX, matching `T5ForConditionalGeneration`.

The model returns decoder hidden states; `output_weight()` gives the [D, V] projection so the
train step can compute a chunked cross-entropy. With a tied head, Hugging Face multiplies the
decoder output by d_model ** -0.5 before projecting with the embedding; that factor is applied
to the hidden states this model returns, so `logits = hidden @ output_weight()` always holds.
Parameter paths are Hugging Face's tensor names without a prefix (`shared`,
`encoder.block[i].layer[0].SelfAttention.q`, `decoder.final_layer_norm`, `lm_head`, ...).

Shape legend: B batch, L encoder length, T decoder length, S cache slots, D d_model, H heads,
Hd d_kv, F d_ff, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mcckd_jax.models import layers
from mcckd_jax.models.attention import causal_mask
from mcckd_jax.models.kv_cache import KVCache, to_cache_layout
from mcckd_jax.models.t5_layers import ACTIVATIONS, T5DecoderBlock, T5EncoderBlock, t5_layer_norm
from mcckd_jax.sharding import constrain

_EMBED = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture and numerics; field names follow the Hugging Face config.json."""

    vocab_size: int = 32128  # V
    d_model: int = 768  # D
    d_kv: int = 64  # Hd, per-head width (d_model need not equal num_heads * d_kv)
    d_ff: int = 2048  # F
    num_layers: int = 12  # encoder blocks
    num_decoder_layers: int | None = None  # decoder blocks; None means num_layers
    num_heads: int = 12  # H
    relative_attention_num_buckets: int = 32  # buckets of the relative position bias
    relative_attention_max_distance: int = 128  # offsets beyond this share the last bucket
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-ACT" or "ACT"; "gated-gelu" uses tanh GELU
    tie_word_embeddings: bool = False  # head = shared^T and decoder output * d_model ** -0.5
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    decoder_start_token_id: int = 0  # first decoder input (T5 uses the pad token)
    initializer_factor: float = 1.0  # scales Hugging Face's initialiser stddevs
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # per block: none, full, mlp (= full: nothing named), dots, ...
    lora: layers.LoRAConfig | None = None  # adapters; target names "q", "k", "v", "o", "wi_0", ...

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") \
                or self.activation not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj must be 'gated-ACT' or 'ACT' with ACT in "
                             f"{sorted(ACTIVATIONS)}, got {self.feed_forward_proj!r}")
        layers.check_remat_policy(self.remat_policy)
        layers.dtype_of(self.dtype), layers.dtype_of(self.param_dtype)

    @property
    def resolved_num_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Name in `t5_layers.ACTIVATIONS`; as in transformers, "gated-gelu" means gelu_new."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "T5Config":
        """From a Hugging Face config (a `PretrainedConfig` or its config.json dict).

        Missing fields take transformers' T5Config defaults (original T5: relu, tied head).
        """
        hf = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        if hf.get("model_type", "t5") != "t5":
            raise ValueError(f"model_type {hf['model_type']!r} is not a T5 encoder-decoder")
        # transformers >= 5 always ties the weights at construction and keeps the config.json
        # flag as `scale_decoder_outputs` (it unties when a checkpoint holds a distinct
        # lm_head); a parsed config therefore reports tie_word_embeddings=True for untied
        # models, while a raw config.json has only the original flag.
        tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
        eos = hf.get("eos_token_id", 1)
        pad = hf.get("pad_token_id", 0)
        start = hf.get("decoder_start_token_id")
        fields = dict(
            vocab_size=hf.get("vocab_size", 32128), d_model=hf.get("d_model", 512),
            d_kv=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048),
            num_layers=hf.get("num_layers", 6),
            num_decoder_layers=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
            num_heads=hf.get("num_heads", 8),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=hf.get("feed_forward_proj", "relu"), tie_word_embeddings=bool(tied),
            pad_token_id=pad, eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            decoder_start_token_id=pad if start is None else start,
            initializer_factor=hf.get("initializer_factor", 1.0))
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as T5ForConditionalGeneration."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
            "d_ff": self.d_ff, "num_layers": self.num_layers,
            "num_decoder_layers": self.resolved_num_decoder_layers, "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "tie_word_embeddings": self.tie_word_embeddings, "is_encoder_decoder": True,
            "pad_token_id": self.pad_token_id, "eos_token_id": eos,
            "decoder_start_token_id": self.decoder_start_token_id,
            "initializer_factor": self.initializer_factor,
            "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
        }


def tiny(**overrides) -> T5Config:
    """A few-thousand-parameter model for tests: gated-GELU, untied head, 2 + 3 blocks.

    max_distance 16 with 8 buckets puts offsets of a 20-token test sequence in the
    logarithmic and saturated buckets too.
    """
    fields = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                  num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16)
    return T5Config(**{**fields, **overrides})


def flan_t5_base(**overrides) -> T5Config:
    """google/flan-t5-base (250M): 12 + 12 blocks, width 768, 12 heads."""
    return T5Config(**overrides)


def flan_t5_large(**overrides) -> T5Config:
    """google/flan-t5-large (780M): 24 + 24 blocks, width 1024, 16 heads."""
    fields = dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16)
    return T5Config(**{**fields, **overrides})


def flan_t5_xl(**overrides) -> T5Config:
    """google/flan-t5-xl (3B, the paper's FlanT5-XL student): 24 + 24 blocks, width 2048."""
    fields = dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32)
    return T5Config(**{**fields, **overrides})


def flan_t5_xxl(**overrides) -> T5Config:
    """google/flan-t5-xxl (11B, the paper's FlanT5-XXL student): 24 + 24 blocks, width 4096."""
    fields = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64)
    return T5Config(**{**fields, **overrides})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CrossKV:
    """Cross-attention keys and values of every decoder block, computed once per input.

    Projecting the encoder output anew at every decoding step would cost L times the
    self-attention projections; the encoder output does not change, so they are cached.
    """

    keys: tuple[jax.Array, ...]  # per decoder block [B, H, Hd, L] (the KV cache's layout)
    values: tuple[jax.Array, ...]  # per decoder block [B, H, L, Hd]
    key_mask: jax.Array  # [B, L] bool, True for real encoder tokens


def _maybe_remat(fn, policy_name: str):
    if policy_name == "none":
        return fn
    return nnx.remat(fn, policy=layers.REMAT_POLICIES[policy_name])


def _run_encoder_block(block, x_BLD, mask_BLL, bias_HLL):
    return block(x_BLD, mask_BLL, bias_HLL)


def _run_decoder_block(block, x_BTD, mask_BTT, bias_HTT, encoder_hidden_BLD, cross_mask_BTL):
    cross_kv = block.cross_key_values(encoder_hidden_BLD)
    return block(x_BTD, mask_BTT, bias_HTT, cross_kv, cross_mask_BTL)[0]


class T5Encoder(nnx.Module):
    """Embedded inputs -> encoder output (after `final_layer_norm`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.remat_policy = config.remat_policy
        # Only block 0 owns the relative position table; its bias is shared by all blocks.
        self.block = nnx.List([T5EncoderBlock(config, relative_bias=i == 0, rngs=rngs)
                               for i in range(config.num_layers)])
        self.final_layer_norm = t5_layer_norm(config)

    def __call__(self, x_BLD: jax.Array, valid_BL: jax.Array) -> jax.Array:
        batch, length, _ = x_BLD.shape
        positions_L = jnp.arange(length, dtype=jnp.int32)
        bias_HLL = self.block[0].layer[0].SelfAttention.relative_attention_bias(positions_L, length)
        # Bidirectional: every query sees every real key; padded queries are the caller's to mask.
        mask_BLL = jnp.broadcast_to(valid_BL[:, None, :], (batch, length, length))
        run_block = _maybe_remat(_run_encoder_block, self.remat_policy)
        for block in self.block:
            x_BLD = run_block(block, x_BLD, mask_BLL, bias_HLL)
        return self.final_layer_norm(x_BLD)


class T5Decoder(nnx.Module):
    """Embedded decoder inputs + encoder output -> decoder output (after `final_layer_norm`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.remat_policy = config.remat_policy
        self.block = nnx.List([T5DecoderBlock(config, relative_bias=i == 0, rngs=rngs)
                               for i in range(config.resolved_num_decoder_layers)])
        self.final_layer_norm = t5_layer_norm(config)

    def _position_bias(self, query_positions_T, key_length):
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(query_positions_T,
                                                                            key_length)

    def __call__(self, x_BTD, valid_BT, encoder_hidden_BLD, encoder_valid_BL):
        batch, length, _ = x_BTD.shape
        slots_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        mask_BTT = causal_mask(slots_BT, slots_BT, valid_BT)
        bias_HTT = self._position_bias(slots_BT[0], length)
        cross_mask_BTL = jnp.broadcast_to(encoder_valid_BL[:, None, :],
                                          (batch, length, encoder_valid_BL.shape[1]))
        run_block = _maybe_remat(_run_decoder_block, self.remat_policy)
        for block in self.block:
            x_BTD = run_block(block, x_BTD, mask_BTT, bias_HTT, encoder_hidden_BLD, cross_mask_BTL)
        return self.final_layer_norm(x_BTD)

    def cross_kv(self, encoder_hidden_BLD: jax.Array, encoder_valid_BL: jax.Array) -> CrossKV:
        pairs = [to_cache_layout(*block.cross_key_values(encoder_hidden_BLD))
                 for block in self.block]
        return CrossKV(keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs),
                       key_mask=encoder_valid_BL.astype(bool))

    def decode(self, x_BTD, valid_BT, cache: KVCache, cross: CrossKV):
        batch, length, _ = x_BTD.shape
        start = cache.length
        # Positions are cache slots, as Hugging Face counts past tokens (pads included).
        slots_BT = start + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        cache = cache.advance(valid_BT)
        key_slots_BS = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32),
                                        (batch, cache.max_length))
        mask_BTS = causal_mask(slots_BT, key_slots_BS, cache.key_mask)
        bias_HTS = self._position_bias(slots_BT[0], cache.max_length)
        cross_mask_BTL = jnp.broadcast_to(cross.key_mask[:, None, :],
                                          (batch, length, cross.key_mask.shape[1]))
        for index, block in enumerate(self.block):
            x_BTD, (keys, values) = block(
                x_BTD, mask_BTS, bias_HTS, (cross.keys[index], cross.values[index]),
                cross_mask_BTL, (cache.keys[index], cache.values[index]), start)
            cache = cache.with_layer(index, keys, values)
        return self.final_layer_norm(x_BTD), cache


def hf_ignored(config: T5Config, name: str) -> bool:
    """Checkpoint tensors the model does not read: copies of `shared` and a legacy table."""
    copies = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    # Old checkpoints carry an unused cross-attention bias table (transformers ignores it too).
    legacy = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    return name in copies or name == legacy or (config.tie_word_embeddings
                                                and name == "lm_head.weight")


def _valid(mask, shape) -> jax.Array:
    return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


class T5Model(nnx.Module):
    """Encoder-decoder student: (input ids, decoder input ids) -> decoder hidden states."""

    # Hugging Face T5ForConditionalGeneration names are the module paths themselves.
    HF_PREFIX = ""
    HF_UNPREFIXED = ()

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = layers.dtype_of(config.dtype), layers.dtype_of(config.param_dtype)
        self.shared = layers.Embed(config.vocab_size, config.d_model, dtype=dtype,
                                   param_dtype=param_dtype, init_stddev=config.initializer_factor,
                                   rngs=rngs)
        self.encoder = T5Encoder(config, rngs=rngs)
        self.decoder = T5Decoder(config, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else layers.Linear(
            config.d_model, config.vocab_size, logical_axes=("embed", "vocab"), dtype=dtype,
            param_dtype=param_dtype, init_stddev=config.initializer_factor, rngs=rngs)

    def encode(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        """Encoder output [B, L, D]; positions with attention_mask 0 are never attended."""
        x_BLD = constrain(self.shared(input_ids_BL), _EMBED)
        return self.encoder(x_BLD, _valid(attention_mask_BL, input_ids_BL.shape))

    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None,
                 decoder_input_ids_BT: jax.Array,
                 decoder_attention_mask_BT: jax.Array | None = None) -> jax.Array:
        """Decoder hidden states [B, T, D], ready for `output_weight()` (training, scoring).

        Args:
          attention_mask_BL: 1 for real encoder tokens (None: all real).
          decoder_input_ids_BT: the targets shifted right behind `decoder_start_token_id`.
          decoder_attention_mask_BT: 0 for decoder pads, never attended (None: all real).
        """
        encoder_hidden_BLD = self.encode(input_ids_BL, attention_mask_BL)
        return self.decode_all(decoder_input_ids_BT, encoder_hidden_BLD,
                               _valid(attention_mask_BL, input_ids_BL.shape),
                               decoder_attention_mask_BT)

    def decode_all(self, decoder_input_ids_BT: jax.Array, encoder_hidden_BLD: jax.Array,
                   encoder_mask_BL: jax.Array,
                   decoder_attention_mask_BT: jax.Array | None = None) -> jax.Array:
        """Decoder hidden states [B, T, D] from an encoder output computed once (e.g. shared
        by the K rationales of a question); ready for `output_weight()`."""
        x_BTD = constrain(self.shared(decoder_input_ids_BT), _EMBED)
        hidden_BTD = self.decoder(x_BTD, _valid(decoder_attention_mask_BT, decoder_input_ids_BT.shape),
                                  encoder_hidden_BLD, encoder_mask_BL.astype(bool))
        return self._scale_output(hidden_BTD)

    def cross_cache(self, encoder_hidden_BLD: jax.Array,
                    attention_mask_BL: jax.Array | None = None) -> CrossKV:
        """Cross-attention keys/values of every decoder block for `decode` (once per input)."""
        return self.decoder.cross_kv(encoder_hidden_BLD,
                                     _valid(attention_mask_BL, encoder_hidden_BLD.shape[:2]))

    def decode(self, decoder_input_ids_BT: jax.Array, cache: KVCache, cross: CrossKV, *,
               decoder_attention_mask_BT: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Decoder hidden states [B, T, D] for the next T decoder tokens of every row, reading
        and extending the self-attention cache (T = 1 for one greedy step).

        Args:
          cross: `cross_cache(encode(input_ids, mask), mask)`.
          decoder_attention_mask_BT: 0 for pad tokens, which are never attended.
        """
        x_BTD = self.shared(decoder_input_ids_BT)
        hidden_BTD, cache = self.decoder.decode(
            x_BTD, _valid(decoder_attention_mask_BT, decoder_input_ids_BT.shape), cache, cross)
        return self._scale_output(hidden_BTD), cache

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty self-attention cache for `max_length` decoder tokens."""
        config = self.config
        return KVCache.empty(num_layers=config.resolved_num_decoder_layers, batch=batch,
                             max_length=max_length, num_kv_heads=config.num_heads,
                             head_dim=config.d_kv, dtype=layers.dtype_of(config.dtype))

    def _scale_output(self, hidden_BTD: jax.Array) -> jax.Array:
        # A tied head reuses the input embedding, whose scale suits inputs, not logits; T5
        # (Mesh TensorFlow) rescales the decoder output by d_model ** -0.5 before projecting.
        # Doing it here keeps `logits = hidden @ output_weight()` for the chunked loss.
        if self.config.tie_word_embeddings:
            return hidden_BTD * jnp.asarray(self.config.d_model ** -0.5, hidden_BTD.dtype)
        return hidden_BTD

    @staticmethod
    def hf_ignored(config: T5Config, name: str) -> bool:
        """Checkpoint tensors that this model does not read (see module-level `hf_ignored`)."""
        return hf_ignored(config, name)

    def output_weight(self) -> jax.Array:
        """The [D, V] output projection (the shared embedding transposed when tied)."""
        if self.lm_head is None:
            return self.shared.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] (full vocabulary: use for decoding and tests)."""
        return layers.project_to_vocab(hidden_BTD, self.output_weight())
