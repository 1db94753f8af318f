"""The decoder-only student in Flax NNX: LLaMA, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Gemma 2/3.

One transformer whose differences between families are the switches of `DecoderConfig`.
The model returns final hidden states; `output_weight()` gives the [D, V] projection so the
train step can compute a chunked cross-entropy (then `final_logit_softcap`, Gemma 2).
Parameter names follow Hugging Face (`embed_tokens`, `layers[i].self_attn.q_proj`,
`input_layernorm`, `lm_head`, ...).

Shape legend: B batch, L length, S key/cache length, D hidden, H query heads, K key/value
heads, Hd head dim, F MLP width, V vocabulary, N layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mcckd_jax.models import layers
from mcckd_jax.models.attention import cached_attention, causal_mask, dot_product_attention
from mcckd_jax.models.decoder_config import DecoderConfig
from mcckd_jax.models.kv_cache import KVCache, write_slots
from mcckd_jax.models.rope import apply_rotary, inverse_frequencies, rotary_angles
from mcckd_jax.sharding import constrain

_ACT = ("act_batch", "act_length", "act_embed")


def _numerics(config: DecoderConfig) -> dict:
    return dict(dtype=layers.dtype_of(config.dtype), param_dtype=layers.dtype_of(config.param_dtype))


def _norm(config: DecoderConfig, features: int) -> layers.RMSNorm:
    return layers.RMSNorm(features, eps=config.rms_norm_eps, offset=config.norm_offset,
                          **_numerics(config))


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        width, lora = config.hidden_size, config.lora
        common = dict(init_stddev=config.initializer_range, rngs=rngs, **_numerics(config))

        def projection(name, fan_in, fan_out, axes, bias):
            return layers.Linear(fan_in, fan_out, logical_axes=axes, use_bias=bias,
                                 lora=layers.lora_for(name, lora), **common)

        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = projection("q_proj", width, inner, ("embed", "heads"), config.attention_bias)
        self.k_proj = projection("k_proj", width, kv_inner, ("embed", "kv_heads"),
                                 config.attention_bias)
        self.v_proj = projection("v_proj", width, kv_inner, ("embed", "kv_heads"),
                                 config.attention_bias)
        self.o_proj = projection("o_proj", inner, width, ("heads", "embed"),
                                 config.attention_out_bias)
        self.q_norm = _norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = _norm(config, self.head_dim) if config.qk_norm else None

    def __call__(self, x_BLD, cos, sin, mask_BLS, cached_kv=None, cache_start=None):
        """Returns the attention output [B, L, D] and, with a cache, the layer's new (k, v)."""
        batch, length, _ = x_BLD.shape
        query = self.q_proj(x_BLD).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.k_proj(x_BLD).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x_BLD).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query = constrain(apply_rotary(query, cos, sin), ("act_batch", "act_length", "act_heads", None))
        key = constrain(apply_rotary(key, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        if cached_kv is None:
            # Without a cache the mask is causal over one sequence (DecoderModel.__call__).
            out = dot_product_attention(query, key, value, mask_BLS, scale=self.scale,
                                        causal=True, softcap=self.softcap)
        else:
            key, value = write_slots(cached_kv, key, value, cache_start)
            out = cached_attention(query, key, value, mask_BLS, scale=self.scale,
                                   softcap=self.softcap)
        out = self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
        return out, ((key, value) if cached_kv is not None else None)


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh GELU)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        common = dict(use_bias=config.mlp_bias, init_stddev=config.initializer_range, rngs=rngs,
                      **_numerics(config))
        width, inner, lora = config.hidden_size, config.intermediate_size, config.lora
        self.gelu = config.hidden_act == "gelu_pytorch_tanh"
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
        act_BLF = jax.nn.gelu(gate_BLF, approximate=True) if self.gelu else jax.nn.silu(gate_BLF)
        hidden_BLF = constrain(act_BLF * up_BLF, ("act_batch", "act_length", "act_mlp"))
        return self.down_proj(hidden_BLF)


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP residual blocks; with sandwich norms (Gemma 2/3) each
    block's output is normed too, and `post_attention_layernorm` is the attention's output
    norm rather than the MLP's input norm."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        width = config.hidden_size
        self.input_layernorm = _norm(config, width)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = _norm(config, width)
        self.pre_feedforward_layernorm = _norm(config, width) if config.sandwich_norms else None
        self.post_feedforward_layernorm = _norm(config, width) if config.sandwich_norms else None
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_BLD, cos, sin, mask_BLS, cached_kv=None, cache_start=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x_BLD), cos, sin, mask_BLS,
                                          cached_kv, cache_start)
        if self.pre_feedforward_layernorm is None:
            x_BLD = x_BLD + attn_out
            x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
        else:
            x_BLD = x_BLD + self.post_attention_layernorm(attn_out)
            mlp_out = self.mlp(self.pre_feedforward_layernorm(x_BLD))
            x_BLD = x_BLD + self.post_feedforward_layernorm(mlp_out)
        return constrain(x_BLD, _ACT), new_kv


def _run_layer(layer, x_BLD, cos, sin, mask_BLS):
    return layer(x_BLD, cos, sin, mask_BLS)[0]


class DecoderModel(nnx.Module):
    """Decoder-only student: tokens -> final hidden states (after the last RMSNorm)."""

    LAYOUT = "decoder_only"
    # Hugging Face *ForCausalLM names: "model.<path>", except the output head.
    HF_PREFIX = "model."
    HF_UNPREFIXED = ("lm_head",)

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = layers.Embed(config.vocab_size, config.hidden_size,
                                         init_stddev=config.initializer_range, rngs=rngs,
                                         **_numerics(config))
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = _norm(config, config.hidden_size)
        self.lm_head = None if config.tie_word_embeddings else layers.Linear(
            config.hidden_size, config.vocab_size, logical_axes=("embed", "vocab"),
            init_stddev=config.initializer_range, rngs=rngs, **_numerics(config))

    def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
                 attention_mask_BL: jax.Array | None = None,
                 segment_ids_BL: jax.Array | None = None,
                 prompt_segment_ids_BL: jax.Array | None = None) -> jax.Array:
        """Hidden states [B, L, D] for a full sequence (training, scoring).

        Args:
          positions_BL: RoPE positions; default 0..L-1 (pass per-segment positions when packing).
          attention_mask_BL: 1 for real tokens; padded keys are never attended.
          segment_ids_BL: packed sequences attend only within their own segment.
          prompt_segment_ids_BL: with segment_ids, the one other segment each position may
            attend (a shared prompt; data/packing.py).
        """
        batch, length = tokens_BL.shape
        slots_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions_BL = slots_BL if positions_BL is None else positions_BL
        valid_BL = (jnp.ones((batch, length), bool) if attention_mask_BL is None
                    else attention_mask_BL.astype(bool))
        same_segment_BLS = None if segment_ids_BL is None else (
            segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
        if prompt_segment_ids_BL is not None:
            same_segment_BLS = same_segment_BLS | (
                prompt_segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
        context = self._layer_context(slots_BL, slots_BL, valid_BL, positions_BL, same_segment_BLS)
        x_BLD = constrain(self._embed(tokens_BL), _ACT)
        lora = self.config.lora
        if self.config.remat_policy != "none" and not (lora and lora.dropout > 0):
            x_BLD = self._scanned_layers(x_BLD, context)
        else:
            for layer, sliding in zip(self.layers, self.config.sliding_layers):
                x_BLD = _run_layer(layer, x_BLD, *context[sliding])
        return self.norm(x_BLD)

    def _embed(self, tokens_BL):
        x_BLD = self.embed_tokens(tokens_BL)
        if self.config.scale_embeddings:
            x_BLD = x_BLD * jnp.asarray(self.config.hidden_size ** 0.5, x_BLD.dtype)
        return x_BLD

    def _layer_context(self, query_slots_BL, key_slots_BS, key_valid_BS, positions_BL,
                       same_segment_BLS=None) -> dict[bool, tuple]:
        """Per kind of layer present (sliding window or not): its (cos, sin, mask [B, L, S])."""
        config = self.config
        context = {}
        for sliding in sorted(set(config.sliding_layers)):
            mask_BLS = causal_mask(query_slots_BL, key_slots_BS, key_valid_BS,
                                   config.sliding_window if sliding else None)
            if same_segment_BLS is not None:
                mask_BLS = mask_BLS & same_segment_BLS
            inv_freq = inverse_frequencies(config.rope_of(sliding), config.resolved_head_dim)
            context[sliding] = (*rotary_angles(positions_BL, inv_freq), mask_BLS)
        return context

    def _scanned_layers(self, x_BLD, context):
        """The layers as one `lax.scan` over their stacked weights, rematerialised per layer.

        XLA's CPU scheduler hoists the recomputation of a rematerialised Python loop and keeps
        every layer's activations anyway; inside a scan the backward pass recomputes one layer
        at a time (benchmarks/remat_scan_memory.py: 1.1 instead of 3.5 GiB for a SmolLM2 step).
        The stacked copy of the weights costs one model size. Layers of both kinds (sliding
        window or not) pick their RoPE and mask by a scanned flag. Not used with LoRA dropout:
        RNG state advanced inside the scan would not be written back.
        """
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[nnx.split(layer)[1] for layer in self.layers])
        sliding_N = jnp.asarray(self.config.sliding_layers)

        def one_layer(x_BLD, inputs):
            layer_state, sliding = inputs
            if len(context) == 1:
                cos, sin, mask_BLS = next(iter(context.values()))
            else:
                cos, sin, mask_BLS = jax.tree.map(lambda s, f: jnp.where(sliding, s, f),
                                                  context[True], context[False])
            layer = nnx.merge(graphdef, layer_state)
            return _run_layer(layer, x_BLD, cos, sin, mask_BLS), None

        policy = layers.REMAT_POLICIES[self.config.remat_policy]
        x_BLD, _ = jax.lax.scan(jax.checkpoint(one_layer, policy=policy), x_BLD,
                                (stacked, sliding_N))
        return x_BLD

    def batch_hidden(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Hidden states [B, K, L, D] of the train batch's rationales `tokens` [B, K, L]."""
        tokens_BKL = batch["tokens"]
        batch_size, num_views, length = tokens_BKL.shape
        # Right padding under a causal mask: real tokens never see pads, which the loss masks.
        hidden = self(tokens_BKL.reshape(batch_size * num_views, length))
        return hidden.reshape(batch_size, num_views, length, -1)

    def packed_hidden(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Hidden states [R, L, D] of a packed batch's rows `tokens` [R, L] (data/packing.py):
        each sequence at its own positions, attending within its segment only."""
        return self(batch["tokens"], positions_BL=batch["positions"],
                    segment_ids_BL=batch["segment_ids"],
                    prompt_segment_ids_BL=batch.get("prompt_segment_ids"))

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
        context = self._layer_context(slots_BL, key_slots_BS, cache.key_mask, positions_BL)
        x_BLD = self._embed(tokens_BL)
        for index, (layer, sliding) in enumerate(zip(self.layers, self.config.sliding_layers)):
            x_BLD, (keys, values) = layer(x_BLD, *context[sliding],
                                          (cache.keys[index], cache.values[index]), start)
            cache = cache.with_layer(index, keys, values)
        return self.norm(x_BLD), cache

    def start_generation(self, prompt_BL: jax.Array, prompt_mask_BL: jax.Array,
                         new_slots: int) -> tuple[jax.Array, tuple[jax.Array, KVCache]]:
        """Prefill of left-padded prompts: logits [B, V] of the first new token and the state
        (last RoPE position [B], cache). Positions count real tokens only, as HF `generate`."""
        batch, length = prompt_BL.shape
        cache = self.init_cache(batch, length + new_slots).constrained()
        positions_BL = jnp.maximum(jnp.cumsum(prompt_mask_BL, axis=1) - 1, 0).astype(jnp.int32)
        hidden_BLD, cache = self.decode(prompt_BL, cache, positions_BL=positions_BL,
                                        attention_mask_BL=prompt_mask_BL)
        return self.logits(hidden_BLD[:, -1]), (positions_BL[:, -1], cache)

    def generation_step(self, token_B: jax.Array, state: tuple[jax.Array, KVCache]
                        ) -> tuple[jax.Array, tuple[jax.Array, KVCache]]:
        position_B, cache = state
        position_B = position_B + 1
        hidden_B1D, cache = self.decode(token_B[:, None], cache, positions_BL=position_B[:, None])
        return self.logits(hidden_B1D[:, 0]), (position_B, cache)

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        config = self.config
        return KVCache.empty(num_layers=config.num_hidden_layers, batch=batch,
                             max_length=max_length, num_kv_heads=config.num_key_value_heads,
                             head_dim=config.resolved_head_dim,
                             dtype=layers.dtype_of(config.dtype))

    @staticmethod
    def hf_ignored(config: DecoderConfig, name: str) -> bool:
        """Checkpoint tensors that this model does not read (a tied head's copy)."""
        return config.tie_word_embeddings and name == "lm_head.weight"

    def output_weight(self) -> jax.Array:
        """The [D, V] output projection (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    @property
    def final_logit_softcap(self) -> float | None:
        return self.config.final_logit_softcapping

    def logits(self, hidden_BLD: jax.Array) -> jax.Array:
        """Float32 logits [B, L, V] (full vocabulary: use for decoding and tests)."""
        return layers.softcap(layers.project_to_vocab(hidden_BLD, self.output_weight()),
                              self.final_logit_softcap)
