"""LLaMA-family decoder (LLaMA 1/2/3, SmolLM2, Mistral-style) in Flax NNX.

The model returns final hidden states; `output_weight()` gives the [D, V] projection so the
train step can compute a chunked cross-entropy. Parameter names follow Hugging Face
(`embed_tokens`, `layers[i].self_attn.q_proj`, `input_layernorm`, `lm_head`, ...).

Shape legend: B batch, L length, S key/cache length, D hidden, H query heads, K key/value
heads, Hd head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mcckd_jax.models import layers
from mcckd_jax.models.attention import cached_attention, causal_mask, dot_product_attention
from mcckd_jax.models.kv_cache import KVCache, write_slots
from mcckd_jax.models.rope import RopeConfig, apply_rotary, inverse_frequencies, rotary_angles
from mcckd_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics; field names follow the Hugging Face config.json."""

    vocab_size: int = 32000  # V
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008  # F
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 32  # K; fewer than H is grouped-query attention
    head_dim: int | None = None  # Hd; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()  # rope_parameters of the HF config
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # output projection = embed_tokens^T
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on gate/up/down projections
    sliding_window: int | None = None  # Mistral-style local attention window, in tokens
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # stddev of the normal initialiser
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # per-layer remat: none, full, mlp, dots, dots_saveable
    lora: layers.LoRAConfig | None = None  # low-rank adapters; None trains every weight

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        layers.check_remat_policy(self.remat_policy)
        layers.dtype_of(self.dtype), layers.dtype_of(self.param_dtype)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "LlamaConfig":
        """From a Hugging Face config (a `PretrainedConfig` or its config.json dict)."""
        hf = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type {model_type!r} is not a LLaMA-family decoder")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
        eos = hf.get("eos_token_id", 2)
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02))
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as LlamaForCausalLM / MistralForCausalLM."""
        mistral = self.sliding_window is not None
        rope = {k: v for k, v in dataclasses.asdict(self.rope).items()
                if self.rope.rope_type != "default" or k in ("rope_theta", "rope_type")}
        if self.rope.rope_type == "linear":
            rope = {"rope_type": "linear", "rope_theta": self.rope.rope_theta,
                    "factor": self.rope.factor}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope, "rope_theta": self.rope.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            **({"sliding_window": self.sliding_window} if mistral else {}),
            "hidden_act": "silu", "bos_token_id": self.bos_token_id, "eos_token_id": eos,
            "pad_token_id": self.pad_token_id, "initializer_range": self.initializer_range,
            "torch_dtype": self.param_dtype, "dtype": self.param_dtype,
        }


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    return RopeConfig(**{k: v for k, v in params.items() if k in known})


def tiny(**overrides) -> LlamaConfig:
    """A few-thousand-parameter model for tests: GQA, untied head."""
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    return LlamaConfig(**{**fields, **overrides})


def smollm2_135m(**overrides) -> LlamaConfig:
    """SmolLM2-135M(-Instruct): 30 layers, width 576, 9 heads / 3 KV heads, tied embeddings."""
    fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  rms_norm_eps=1e-5, rope=RopeConfig(rope_theta=100000.0),
                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    return LlamaConfig(**{**fields, **overrides})


def llama2_7b(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**dict(max_position_embeddings=4096, rms_norm_eps=1e-5), **overrides})


def llama3_8b(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000,
                  eos_token_id=128001, rope=RopeConfig(rope_theta=500000.0))
    return LlamaConfig(**{**fields, **overrides})


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        width = config.hidden_size
        common = dict(use_bias=config.attention_bias, dtype=layers.dtype_of(config.dtype),
                      param_dtype=layers.dtype_of(config.param_dtype),
                      init_stddev=config.initializer_range, rngs=rngs)
        lora = config.lora
        self.q_proj = layers.Linear(width, self.num_heads * self.head_dim,
                                    logical_axes=("embed", "heads"),
                                    lora=layers.lora_for("q_proj", lora), **common)
        self.k_proj = layers.Linear(width, self.num_kv_heads * self.head_dim,
                                    logical_axes=("embed", "kv_heads"),
                                    lora=layers.lora_for("k_proj", lora), **common)
        self.v_proj = layers.Linear(width, self.num_kv_heads * self.head_dim,
                                    logical_axes=("embed", "kv_heads"),
                                    lora=layers.lora_for("v_proj", lora), **common)
        self.o_proj = layers.Linear(self.num_heads * self.head_dim, width,
                                    logical_axes=("heads", "embed"),
                                    lora=layers.lora_for("o_proj", lora), **common)

    def __call__(self, x_BLD, cos, sin, mask_BLS, cached_kv=None, cache_start=None):
        """Returns the attention output [B, L, D] and, with a cache, the layer's new (k, v)."""
        batch, length, _ = x_BLD.shape
        query = self.q_proj(x_BLD).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(x_BLD).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x_BLD).reshape(batch, length, self.num_kv_heads, self.head_dim)
        query = constrain(apply_rotary(query, cos, sin), ("act_batch", "act_length", "act_heads", None))
        key = constrain(apply_rotary(key, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        scale = self.head_dim ** -0.5
        if cached_kv is None:
            # Without a cache the mask is causal over one sequence (LlamaModel.__call__).
            out = dot_product_attention(query, key, value, mask_BLS, scale=scale, causal=True)
        else:
            key, value = write_slots(cached_kv, key, value, cache_start)
            out = cached_attention(query, key, value, mask_BLS, scale=scale)
        out = self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
        return out, ((key, value) if cached_kv is not None else None)


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        common = dict(use_bias=config.mlp_bias, dtype=layers.dtype_of(config.dtype),
                      param_dtype=layers.dtype_of(config.param_dtype),
                      init_stddev=config.initializer_range, rngs=rngs)
        width, inner, lora = config.hidden_size, config.intermediate_size, config.lora
        self.gate_proj = layers.Linear(width, inner, logical_axes=("embed", "mlp"),
                                       lora=layers.lora_for("gate_proj", lora), **common)
        self.up_proj = layers.Linear(width, inner, logical_axes=("embed", "mlp"),
                                     lora=layers.lora_for("up_proj", lora), **common)
        self.down_proj = layers.Linear(inner, width, logical_axes=("mlp", "embed"),
                                       lora=layers.lora_for("down_proj", lora), **common)

    def __call__(self, x_BLD):
        # Named for remat_policy "mlp", which keeps these two (the costliest matmuls to redo).
        gate_BLF = checkpoint_name(self.gate_proj(x_BLD), "mlp_gate")
        up_BLF = checkpoint_name(self.up_proj(x_BLD), "mlp_up")
        hidden_BLF = jax.nn.silu(gate_BLF) * up_BLF
        hidden_BLF = constrain(hidden_BLF, ("act_batch", "act_length", "act_mlp"))
        return self.down_proj(hidden_BLF)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=layers.dtype_of(config.dtype),
                    param_dtype=layers.dtype_of(config.param_dtype))
        self.input_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.mlp = LlamaMLP(config, rngs=rngs)

    def __call__(self, x_BLD, cos, sin, mask_BLS, cached_kv=None, cache_start=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x_BLD), cos, sin, mask_BLS,
                                          cached_kv, cache_start)
        x_BLD = x_BLD + attn_out
        x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed")), new_kv


def _run_layer(layer, x_BLD, cos, sin, mask_BLS):
    return layer(x_BLD, cos, sin, mask_BLS)[0]


class LlamaModel(nnx.Module):
    """Decoder-only student: tokens -> final hidden states (after the last RMSNorm)."""

    # Hugging Face LlamaForCausalLM names: "model.<path>", except the output head.
    HF_PREFIX = "model."
    HF_UNPREFIXED = ("lm_head",)

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = layers.Embed(config.vocab_size, config.hidden_size,
                                         dtype=layers.dtype_of(config.dtype),
                                         param_dtype=layers.dtype_of(config.param_dtype),
                                         init_stddev=config.initializer_range, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                   dtype=layers.dtype_of(config.dtype),
                                   param_dtype=layers.dtype_of(config.param_dtype))
        self.lm_head = None if config.tie_word_embeddings else layers.Linear(
            config.hidden_size, config.vocab_size, logical_axes=("embed", "vocab"),
            dtype=layers.dtype_of(config.dtype), param_dtype=layers.dtype_of(config.param_dtype),
            init_stddev=config.initializer_range, rngs=rngs)

    def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
                 attention_mask_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """Hidden states [B, L, D] for a full sequence (training, scoring).

        Args:
          positions_BL: RoPE positions; default 0..L-1 (pass per-segment positions when packing).
          attention_mask_BL: 1 for real tokens; padded keys are never attended.
          segment_ids_BL: packed sequences attend only within their own segment.
        """
        batch, length = tokens_BL.shape
        slots_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions_BL = slots_BL if positions_BL is None else positions_BL
        valid_BL = (jnp.ones((batch, length), bool) if attention_mask_BL is None
                    else attention_mask_BL.astype(bool))
        mask_BLS = causal_mask(slots_BL, slots_BL, valid_BL, self.config.sliding_window)
        if segment_ids_BL is not None:
            mask_BLS = mask_BLS & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
        cos, sin = rotary_angles(positions_BL, self._inverse_frequencies())

        x_BLD = constrain(self.embed_tokens(tokens_BL), ("act_batch", "act_length", "act_embed"))
        lora = self.config.lora
        if self.config.remat_policy != "none" and not (lora and lora.dropout > 0):
            x_BLD = self._scanned_layers(x_BLD, cos, sin, mask_BLS)
        else:
            for layer in self.layers:
                x_BLD = _run_layer(layer, x_BLD, cos, sin, mask_BLS)
        return self.norm(x_BLD)

    def _scanned_layers(self, x_BLD, cos, sin, mask_BLS):
        """The layers as one `lax.scan` over their stacked weights, rematerialised per layer.

        XLA's CPU scheduler hoists the recomputation of a rematerialised Python loop and keeps
        every layer's activations anyway; inside a scan the backward pass recomputes one layer
        at a time (benchmarks/remat_scan_memory.py: 1.1 instead of 3.5 GiB for a SmolLM2 step).
        The stacked copy of the weights costs one model size. Not used with LoRA dropout: RNG
        state advanced inside the scan would not be written back.
        """
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[nnx.split(layer)[1] for layer in self.layers])

        def one_layer(x_BLD, layer_state):
            return _run_layer(nnx.merge(graphdef, layer_state), x_BLD, cos, sin, mask_BLS), None

        policy = layers.REMAT_POLICIES[self.config.remat_policy]
        x_BLD, _ = jax.lax.scan(jax.checkpoint(one_layer, policy=policy), x_BLD, stacked)
        return x_BLD

    def decode(self, tokens_BL: jax.Array, cache: KVCache, *,
               positions_BL: jax.Array | None = None,
               attention_mask_BL: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Hidden states [B, L, D] for the next L tokens of every row, reading and extending
        the cache (a prompt prefill when L > 1, one decoding step when L = 1).

        Args:
          positions_BL: RoPE positions; default cache.length + 0..L-1 (pass
            cumsum(mask) - 1 style positions for left-padded prompts).
          attention_mask_BL: 0 for pad tokens (e.g. left padding), which are never attended.
        """
        batch, length = tokens_BL.shape
        start = cache.length
        slots_BL = start + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions_BL = slots_BL if positions_BL is None else positions_BL
        valid_BL = (jnp.ones((batch, length), bool) if attention_mask_BL is None
                    else attention_mask_BL.astype(bool))
        cache = cache.advance(valid_BL)
        key_slots_BS = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32),
                                        (batch, cache.max_length))
        mask_BLS = causal_mask(slots_BL, key_slots_BS, cache.key_mask, self.config.sliding_window)
        cos, sin = rotary_angles(positions_BL, self._inverse_frequencies())

        x_BLD = self.embed_tokens(tokens_BL)
        for index, layer in enumerate(self.layers):
            x_BLD, (keys, values) = layer(x_BLD, cos, sin, mask_BLS,
                                          (cache.keys[index], cache.values[index]), start)
            cache = cache.with_layer(index, keys, values)
        return self.norm(x_BLD), cache

    def _inverse_frequencies(self):
        return inverse_frequencies(self.config.rope, self.config.resolved_head_dim)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        config = self.config
        return KVCache.empty(num_layers=config.num_hidden_layers, batch=batch,
                             max_length=max_length, num_kv_heads=config.num_key_value_heads,
                             head_dim=config.resolved_head_dim,
                             dtype=layers.dtype_of(config.dtype))

    @staticmethod
    def hf_ignored(config: LlamaConfig, name: str) -> bool:
        """Checkpoint tensors that this model does not read (a tied head's copy)."""
        return config.tie_word_embeddings and name == "lm_head.weight"

    def output_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden_BLD: jax.Array) -> jax.Array:
        """Float32 logits [B, L, V] (full vocabulary: use for decoding and tests)."""
        return layers.project_to_vocab(hidden_BLD, self.output_weight())
