"""Batched autoregressive decoding of a decoder-only student with its KV cache.

Prompts are left-padded so that every row's next token is written at the same cache slot;
RoPE positions count real tokens only (cumsum(mask) - 1), as Hugging Face `generate` does.

Shape legend: B batch, L prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _prefill(model, prompt_BL, prompt_mask_BL, max_new_tokens):
    batch, length = prompt_BL.shape
    cache = model.init_cache(batch, length + max_new_tokens)
    positions_BL = jnp.maximum(jnp.cumsum(prompt_mask_BL, axis=1) - 1, 0).astype(jnp.int32)
    hidden_BLD, cache = model.decode(prompt_BL, cache, positions_BL=positions_BL,
                                     attention_mask_BL=prompt_mask_BL)
    return model.logits(hidden_BLD[:, -1]), positions_BL[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_ids",
                                             "pad_token_id"))
def _greedy(graphdef, state, prompt_BL, prompt_mask_BL, *, max_new_tokens, eos_token_ids,
            pad_token_id):
    model = nnx.merge(graphdef, state)
    logits_BV, last_position_B, cache = _prefill(model, prompt_BL, prompt_mask_BL, max_new_tokens)
    eos = jnp.asarray(eos_token_ids, jnp.int32)

    def step(carry, _):
        logits_BV, position_B, cache, done_B = carry
        token_B = jnp.where(done_B, pad_token_id, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        done_B = done_B | jnp.isin(token_B, eos)
        hidden, cache = model.decode(token_B[:, None], cache, positions_BL=(position_B + 1)[:, None])
        return (model.logits(hidden[:, 0]), position_B + 1, cache, done_B), token_B

    done_B = jnp.zeros(prompt_BL.shape[0], bool)
    _, tokens_NB = jax.lax.scan(step, (logits_BV, last_position_B, cache, done_B), None,
                                length=max_new_tokens)
    return tokens_NB.T


def greedy_generate(model: nnx.Module, prompt_BL: jax.Array, prompt_mask_BL: jax.Array, *,
                    max_new_tokens: int, eos_token_ids: tuple[int, ...] = (),
                    pad_token_id: int = 0) -> jax.Array:
    """Greedy continuation [B, N] of left-padded prompts; after EOS a row emits pad_token_id.

    The whole loop is one jitted call (compiled once per shape); rows keep their own positions.
    """
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, prompt_BL, prompt_mask_BL.astype(jnp.int32),
                   max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos_token_ids),
                   pad_token_id=pad_token_id)
