"""T5 v1.1 / Flan-T5 encoder-decoder student in Flax NNX, matching `T5ForConditionalGeneration`.

The model returns decoder hidden states; `output_weight()` gives the [D, V] projection so the
train step can compute a chunked cross-entropy. With a tied head, Hugging Face multiplies the
decoder output by d_model ** -0.5 before projecting with the embedding; that factor is applied
to the hidden states this model returns, so `logits = hidden @ output_weight()` always holds.
Parameter paths are Hugging Face's tensor names without a prefix (`shared`,
`encoder.block[i].layer[0].SelfAttention.q`, `decoder.final_layer_norm`, `lm_head`, ...).
The stacks (blocks as a loop, or as a rematerialised scan) are in `t5_stacks`, the blocks in
`t5_layers`.

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
from mcckd_jax.models.kv_cache import KVCache
from mcckd_jax.models.t5_layers import ACTIVATIONS
from mcckd_jax.models.t5_stacks import CrossKV, T5Decoder, T5Encoder
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
    dropout_rate: float = 0.0  # HF's dropout (its checkpoints say 0.1); training passes only
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
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
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
            initializer_factor=hf.get("initializer_factor", 1.0),
            dropout_rate=hf.get("dropout_rate", 0.1))
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
            "initializer_factor": self.initializer_factor, "dropout_rate": self.dropout_rate,
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
    """Encoder-decoder student: (input ids, decoder input ids) -> decoder hidden states.

    Dropout (`dropout_rate` > 0) applies only in passes with deterministic=False: by default
    in `batch_hidden`, the train step's entry point, whose masks come from the model's
    "dropout" RNG stream (the train step carries it in `model_state`); `__call__`, `encode`
    and `decode_all` default to deterministic, and decoding (`start_generation`,
    `generation_step`, `decode`) never applies dropout, so evaluation needs no switch.
    """

    LAYOUT = "encoder_decoder"
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
        # Drawn last, so that the parameters do not depend on dropout_rate.
        self.dropout_rngs = (nnx.Rngs(dropout=rngs.dropout()) if config.dropout_rate > 0
                             else None)

    def _dropout_key(self, deterministic: bool) -> jax.Array | None:
        """The masks' key of one pass (advancing the stream); None when nothing drops."""
        if deterministic or self.dropout_rngs is None:
            return None
        return self.dropout_rngs.dropout()

    def encode(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
        """Encoder output [B, L, D]; positions with attention_mask 0 are never attended."""
        x_BLD = constrain(self.shared(input_ids_BL), _EMBED)
        return self.encoder(x_BLD, _valid(attention_mask_BL, input_ids_BL.shape),
                            self._dropout_key(deterministic))

    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None,
                 decoder_input_ids_BT: jax.Array,
                 decoder_attention_mask_BT: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """Decoder hidden states [B, T, D], ready for `output_weight()` (training, scoring).

        Args:
          attention_mask_BL: 1 for real encoder tokens (None: all real).
          decoder_input_ids_BT: the targets shifted right behind `decoder_start_token_id`.
          decoder_attention_mask_BT: 0 for decoder pads, never attended (None: all real).
          deterministic: False applies dropout (training).
        """
        encoder_hidden_BLD = self.encode(input_ids_BL, attention_mask_BL,
                                         deterministic=deterministic)
        return self.decode_all(decoder_input_ids_BT, encoder_hidden_BLD,
                               _valid(attention_mask_BL, input_ids_BL.shape),
                               decoder_attention_mask_BT, deterministic=deterministic)

    def decode_all(self, decoder_input_ids_BT: jax.Array, encoder_hidden_BLD: jax.Array,
                   encoder_mask_BL: jax.Array,
                   decoder_attention_mask_BT: jax.Array | None = None, *,
                   deterministic: bool = True) -> jax.Array:
        """Decoder hidden states [B, T, D] from an encoder output computed once (e.g. shared
        by the K rationales of a question); ready for `output_weight()`."""
        x_BTD = constrain(self.shared(decoder_input_ids_BT), _EMBED)
        hidden_BTD = self.decoder(x_BTD, _valid(decoder_attention_mask_BT, decoder_input_ids_BT.shape),
                                  encoder_hidden_BLD, encoder_mask_BL.astype(bool),
                                  self._dropout_key(deterministic))
        return self._scale_output(hidden_BTD)

    def batch_hidden(self, batch: Mapping[str, jax.Array], *,
                     deterministic: bool = False) -> jax.Array:
        """Decoder hidden states [B, K, L, D] of the train batch's rationales `tokens`
        [B, K, L]; each question (`encoder_tokens` / `encoder_mask` [B, E]) is encoded once.
        A training pass: dropout applies unless deterministic."""
        tokens_BKL = batch["tokens"]
        batch_size, num_views, length = tokens_BKL.shape
        encoder_hidden_BED = self.encode(batch["encoder_tokens"], batch["encoder_mask"],
                                         deterministic=deterministic)
        hidden = self.decode_all(tokens_BKL.reshape(batch_size * num_views, length),
                                 jnp.repeat(encoder_hidden_BED, num_views, axis=0),
                                 jnp.repeat(batch["encoder_mask"], num_views, axis=0),
                                 deterministic=deterministic)
        return hidden.reshape(batch_size, num_views, length, -1)

    def start_generation(self, prompt_BL: jax.Array, prompt_mask_BL: jax.Array,
                         new_slots: int) -> tuple[jax.Array, tuple[KVCache, CrossKV]]:
        """Encoder pass, cross-attention keys/values, then the decoder on its start token:
        logits [B, V] of the first new token and the state (cache, cross keys/values)."""
        batch = prompt_BL.shape[0]
        cross = self.cross_cache(self.encode(prompt_BL, prompt_mask_BL), prompt_mask_BL)
        # One more slot than a decoder-only student: the start token occupies the first.
        cache = self.init_cache(batch, new_slots + 1).constrained()
        start_B = jnp.full((batch,), self.config.decoder_start_token_id, jnp.int32)
        return self.generation_step(start_B, (cache, cross))

    def generation_step(self, token_B: jax.Array, state: tuple[KVCache, CrossKV]
                        ) -> tuple[jax.Array, tuple[KVCache, CrossKV]]:
        cache, cross = state
        hidden_B1D, cache = self.decode(token_B[:, None], cache, cross)
        return self.logits(hidden_B1D[:, 0]), (cache, cross)

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

    @property
    def final_logit_softcap(self) -> float | None:
        return None

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        """Float32 logits [B, T, V] (full vocabulary: use for decoding and tests)."""
        return layers.project_to_vocab(hidden_BTD, self.output_weight())
