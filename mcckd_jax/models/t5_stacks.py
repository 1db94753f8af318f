"""The T5 student's encoder and decoder stacks: blocks as a Python loop or as one `lax.scan`.

With a remat policy the blocks of each stack run as a `lax.scan` over their stacked weights,
each block rematerialised: XLA's CPU scheduler hoists the recomputation of a rematerialised
Python loop and keeps every block's activations anyway, while inside a scan the backward pass
recomputes one block at a time (benchmarks/RESULTS.md, "T5: scanned remat blocks"). Without
remat, and for cached decoding, the blocks run as a loop.

Dropout keys are split per block outside the scan and scanned over with the weights, so the
loop and the scan draw the same masks.

Shape legend: B batch, L encoder length, T decoder length, S cache slots, D d_model, H heads,
Hd d_kv, N blocks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from mcckd_jax.models import layers
from mcckd_jax.models.attention import causal_mask
from mcckd_jax.models.kv_cache import KVCache, to_cache_layout
from mcckd_jax.models.t5_layers import T5DecoderBlock, T5EncoderBlock, dropout, t5_layer_norm

if TYPE_CHECKING:
    from mcckd_jax.models.t5 import T5Config


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


def scans_blocks(config: T5Config) -> bool:
    """Whether the stacks run their blocks as a rematerialised `lax.scan`.

    Not with LoRA dropout: the adapters' nnx.Dropout streams would advance inside the scan
    and their RNG state would not be written back, so those models keep the loop (the blocks'
    own dropout, `dropout_rate`, takes its keys as scanned inputs and scans).
    """
    lora = config.lora
    return config.remat_policy != "none" and not (lora and lora.dropout > 0)


def _stacked_blocks(blocks: nnx.List) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph of block 0, block 0's position table, every block's other state stacked [N]).

    Block 0 also holds the relative position table, which no block reads (the bias comes in
    as an argument): its other weights are stacked with the other blocks' and the table rides
    along unscanned, so that one graph serves every block and the parameter paths stay
    Hugging Face's.
    """
    table = nnx.PathContains("relative_attention_bias")
    graphdef, table_state, first_state = nnx.split(blocks[0], table, ...)
    others = [nnx.split(block, table, ...)[2] for block in blocks[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first_state, *others)
    return graphdef, table_state, stacked


def run_blocks(blocks: nnx.List, run_block, x, context: tuple, keys_N: jax.Array | None,
               config: T5Config) -> jax.Array:
    """x through every block, `run_block(block, x, *context, dropout_key)` each.

    keys_N: one dropout key per block, or None (no dropout).
    """
    policy_name = config.remat_policy
    if not scans_blocks(config):
        run = run_block if policy_name == "none" else nnx.remat(
            run_block, policy=layers.REMAT_POLICIES[policy_name])
        for index, block in enumerate(blocks):
            x = run(block, x, *context, None if keys_N is None else keys_N[index])
        return x
    graphdef, table_state, stacked = _stacked_blocks(blocks)

    def one_block(x, inputs):
        block_state, key = inputs
        return run_block(nnx.merge(graphdef, table_state, block_state), x, *context, key), None

    one_block = jax.checkpoint(one_block, policy=layers.REMAT_POLICIES[policy_name])
    x, _ = jax.lax.scan(one_block, x, (stacked, keys_N))
    return x


def _stack_keys(dropout_key, num_blocks: int):
    """(input dropout key, per-block keys [N], output dropout key); all None without a key."""
    if dropout_key is None:
        return None, None, None
    input_key, blocks_key, output_key = jax.random.split(dropout_key, 3)
    return input_key, jax.random.split(blocks_key, num_blocks), output_key


def _run_encoder_block(block, x_BLD, mask_BLL, bias_HLL, dropout_key):
    return block(x_BLD, mask_BLL, bias_HLL, dropout_key)


def _run_decoder_block(block, x_BTD, mask_BTT, bias_HTT, encoder_hidden_BLD, cross_mask_BTL,
                       dropout_key):
    cross_kv = block.cross_key_values(encoder_hidden_BLD)
    return block(x_BTD, mask_BTT, bias_HTT, cross_kv, cross_mask_BTL,
                 dropout_key=dropout_key)[0]


class T5Encoder(nnx.Module):
    """Embedded inputs -> encoder output (after `final_layer_norm`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        # Only block 0 owns the relative position table; its bias is shared by all blocks.
        self.block = nnx.List([T5EncoderBlock(config, relative_bias=i == 0, rngs=rngs)
                               for i in range(config.num_layers)])
        self.final_layer_norm = t5_layer_norm(config)
        self.dropout = nnx.Dropout(config.dropout_rate)  # on the embeddings and the output

    def __call__(self, x_BLD: jax.Array, valid_BL: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """dropout_key: the masks of this pass (None: no dropout)."""
        batch, length, _ = x_BLD.shape
        positions_L = jnp.arange(length, dtype=jnp.int32)
        bias_HLL = self.block[0].layer[0].SelfAttention.relative_attention_bias(positions_L, length)
        # Bidirectional: every query sees every real key; padded queries are the caller's to mask.
        mask_BLL = jnp.broadcast_to(valid_BL[:, None, :], (batch, length, length))
        input_key, keys_N, output_key = _stack_keys(dropout_key, len(self.block))
        x_BLD = run_blocks(self.block, _run_encoder_block, dropout(self.dropout, x_BLD, input_key),
                           (mask_BLL, bias_HLL), keys_N, self.config)
        return dropout(self.dropout, self.final_layer_norm(x_BLD), output_key)


class T5Decoder(nnx.Module):
    """Embedded decoder inputs + encoder output -> decoder output (after `final_layer_norm`)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.block = nnx.List([T5DecoderBlock(config, relative_bias=i == 0, rngs=rngs)
                               for i in range(config.resolved_num_decoder_layers)])
        self.final_layer_norm = t5_layer_norm(config)
        self.dropout = nnx.Dropout(config.dropout_rate)  # on the embeddings and the output

    def _position_bias(self, query_positions_T, key_length):
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(query_positions_T,
                                                                            key_length)

    def __call__(self, x_BTD, valid_BT, encoder_hidden_BLD, encoder_valid_BL, dropout_key=None):
        """dropout_key: the masks of this pass (None: no dropout)."""
        batch, length, _ = x_BTD.shape
        slots_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        mask_BTT = causal_mask(slots_BT, slots_BT, valid_BT)
        bias_HTT = self._position_bias(slots_BT[0], length)
        cross_mask_BTL = jnp.broadcast_to(encoder_valid_BL[:, None, :],
                                          (batch, length, encoder_valid_BL.shape[1]))
        input_key, keys_N, output_key = _stack_keys(dropout_key, len(self.block))
        x_BTD = run_blocks(self.block, _run_decoder_block, dropout(self.dropout, x_BTD, input_key),
                           (mask_BTT, bias_HTT, encoder_hidden_BLD, cross_mask_BTL), keys_N,
                           self.config)
        return dropout(self.dropout, self.final_layer_norm(x_BTD), output_key)

    def cross_kv(self, encoder_hidden_BLD: jax.Array, encoder_valid_BL: jax.Array) -> CrossKV:
        pairs = [to_cache_layout(*block.cross_key_values(encoder_hidden_BLD))
                 for block in self.block]
        return CrossKV(keys=tuple(k for k, _ in pairs), values=tuple(v for _, v in pairs),
                       key_mask=encoder_valid_BL.astype(bool))

    def decode(self, x_BTD, valid_BT, cache: KVCache, cross: CrossKV):
        """Cached decoding: a loop over the blocks (each writes its cache layer), no dropout."""
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
