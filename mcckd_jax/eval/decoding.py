"""Batched autoregressive decoding of any student with its KV cache: greedy or sampled.

The student prefills and steps (`Student.start_generation` / `generation_step`): decoder-only
prompts are left-padded so that every row's next token is written at the same cache slot,
with RoPE positions counting real tokens only, as Hugging Face `generate`; encoder-decoder
prompts go to the encoder with their mask and the decoder starts from its start token.

The whole loop is one jitted call, compiled once per (model graph, batch, prompt length,
sampling config): bucket prompt lengths (`mcckd_jax.data.batching.bucket_for`) to bound the
number of compilations. It is a `lax.while_loop` over a fixed [B, N] buffer that stops as
soon as every row has emitted EOS.

Sampling draws token n with fold_in(key, n): one key for the whole batch (the eval runner), or
one key per row (`row_keys`, the local teacher), which makes a row's output independent of the
other rows and of its position in the batch.

Shape legend: B batch, L prompt length, N new tokens, V vocabulary, D hidden width.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mcckd_jax.sharding import constrain

_BATCH = ("act_batch", None)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (hashable: it is a static argument of the jitted loop)."""

    temperature: float = 0.0  # 0 = greedy (argmax); otherwise softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens holding this mass
    max_new_tokens: int = 256  # N, the width of the output buffer

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def nucleus_logits(logits_BV: jax.Array, top_p: float) -> jax.Array:
    """Logits with every token outside the top-p nucleus set to -inf.

    A token is kept when the probability of the tokens strictly more likely than it is below
    top_p (Hugging Face's `TopPLogitsWarper`, ties kept together); the most likely token is
    always kept, so top_p = 0 leaves the argmax alone.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.maximum(jnp.sum(mass_before_BV < top_p, axis=-1), 1)
    # Masking by the smallest kept logit instead of scattering back through the sort order.
    cutoff_B = jnp.take_along_axis(sorted_BV, kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BV >= cutoff_B, logits_BV, -jnp.inf)


def greedy_tokens(logits_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(logits_BV, axis=-1)` as int32 [B]: the first index on ties, the first NaN
    in a row that has one.

    Two plain reductions (a max, then the smallest index that reaches it): XLA's CPU backend
    runs argmax's variadic (value, index) reduce over SmolLM2's 49,152 logits about 3x slower
    (B = 16: 2.0 vs 0.5-0.8 ms), which is 3-4% of a decoding step.
    """
    vocab_size = logits_BV.shape[-1]
    nan_BV = jnp.isnan(logits_BV)
    best_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    hit_BV = jnp.where(jnp.any(nan_BV, axis=-1, keepdims=True), nan_BV, logits_BV == best_B1)
    vocab_ids_V = jnp.arange(vocab_size, dtype=jnp.int32)
    return jnp.min(jnp.where(hit_BV, vocab_ids_V, vocab_size), axis=-1)


def choose_tokens(logits_BV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens [B] int32: argmax at temperature 0, else a draw from the tempered nucleus.

    Args:
      key: one key for the whole batch, or [B] keys, one per row: then row b's draw depends on
        its own key and logits only, not on its neighbours or its position in the batch.
    """
    if sampling.temperature == 0.0:
        return greedy_tokens(logits_BV)
    scaled_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        scaled_BV = nucleus_logits(scaled_BV, sampling.top_p)
    if key.ndim == 0:
        return jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, scaled_BV).astype(jnp.int32)


def _step_key(rng: jax.Array, index: jax.Array) -> jax.Array:
    """The key(s) of token `index`: fold_in(rng, index), row by row for [B] row keys."""
    if rng.ndim == 0:
        return jax.random.fold_in(rng, index)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, index)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_token_ids",
                                             "pad_token_id"))
def _generate(graphdef, state, prompt_BL, prompt_mask_BL, rng, *, sampling: SamplingConfig,
              eos_token_ids: tuple[int, ...], pad_token_id: int):
    # rng: one key for the batch, or [B] row keys (then every draw is made row by row).
    model = nnx.merge(graphdef, state)
    prompt_BL = constrain(prompt_BL, _BATCH)
    prompt_mask_BL = constrain(prompt_mask_BL, _BATCH)
    num_new = sampling.max_new_tokens
    eos = jnp.asarray(eos_token_ids, jnp.int32)

    def emit(logits_BV, index, done_B):
        token_B = choose_tokens(logits_BV, _step_key(rng, index), sampling)
        token_B = jnp.where(done_B, pad_token_id, token_B)
        return token_B, done_B | jnp.isin(token_B, eos)

    # Token n is chosen from the logits of decoding token n - 1: N - 1 decoding steps and
    # N - 1 cache slots beyond the prompt (the last token is never fed back).
    logits_BV, decoder_state = model.start_generation(prompt_BL, prompt_mask_BL, num_new - 1)
    token_B, done_B = emit(logits_BV, 0, jnp.zeros(prompt_BL.shape[0], bool))
    tokens_BN = jnp.full((prompt_BL.shape[0], num_new), pad_token_id, jnp.int32)
    tokens_BN = constrain(tokens_BN.at[:, 0].set(token_B), _BATCH)

    def not_finished(carry):
        index, _, _, done_B, _ = carry
        return (index < num_new) & ~jnp.all(done_B)

    def body(carry):
        index, token_B, decoder_state, done_B, tokens_BN = carry
        logits_BV, decoder_state = model.generation_step(token_B, decoder_state)
        token_B, done_B = emit(logits_BV, index, done_B)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], index, 1)
        return index + 1, token_B, decoder_state, done_B, tokens_BN

    carry = (jnp.int32(1), token_B, decoder_state, done_B, tokens_BN)
    num_chosen, _, _, _, tokens_BN = jax.lax.while_loop(not_finished, body, carry)
    return tokens_BN, num_chosen - 1


def generate(model: nnx.Module, prompt_BL: jax.Array, prompt_mask_BL: jax.Array, *,
             sampling: SamplingConfig, eos_token_ids: tuple[int, ...], pad_token_id: int,
             rng: jax.Array | None = None, row_keys: jax.Array | None = None) -> jax.Array:
    """Continuations [B, N] int32 of a batch of prompts; after its EOS a row holds pad_token_id.

    Args:
      model: a student (`mcckd_jax.models.student.Student`); decoder-only prompts are
        left-padded, an encoder-decoder student reads the prompt with its encoder.
      prompt_mask_BL: 1 for real prompt tokens.
      rng: a `jax.random.key` for the whole batch (token n is drawn with fold_in(rng, n), so
        the same key gives the same output, but a row's draws depend on its position).
      row_keys: instead of rng, [B] keys, one per row: row b's token n is drawn with
        fold_in(row_keys[b], n), so that its output does not depend on the other rows or on
        its position. One of the two is required when sampling.temperature > 0.
    """
    return generate_with_step_count(model, prompt_BL, prompt_mask_BL, sampling=sampling,
                                    eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                    rng=rng, row_keys=row_keys)[0]


def generate_with_step_count(model: nnx.Module, prompt_BL: jax.Array, prompt_mask_BL: jax.Array,
                             *, sampling: SamplingConfig, eos_token_ids: tuple[int, ...],
                             pad_token_id: int, rng: jax.Array | None = None,
                             row_keys: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`generate`'s tokens [B, N] and the number of single-token decoding steps it ran after
    the prompt (int32 scalar): N - 1, or fewer when every row emitted EOS earlier."""
    if not hasattr(model, "start_generation"):
        raise TypeError(f"{type(model).__name__} is not a student (mcckd_jax.models.student)")
    if rng is not None and row_keys is not None:
        raise ValueError("give either rng (one key for the batch) or row_keys, not both")
    if sampling.temperature > 0 and rng is None and row_keys is None:
        raise ValueError(f"sampling at temperature {sampling.temperature} needs an rng key")
    if row_keys is not None and row_keys.shape != prompt_BL.shape[:1]:
        raise ValueError(f"row_keys must hold one key per prompt row ({prompt_BL.shape[0]}), "
                         f"got shape {row_keys.shape}")
    keys = row_keys if row_keys is not None else jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompt_BL, jnp.int32),
                     jnp.asarray(prompt_mask_BL, jnp.int32), keys, sampling=sampling,
                     eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id)


def greedy_generate(model: nnx.Module, prompt_BL: jax.Array, prompt_mask_BL: jax.Array, *,
                    max_new_tokens: int, eos_token_ids: tuple[int, ...] = (),
                    pad_token_id: int = 0) -> jax.Array:
    """Greedy continuation [B, N]: `generate` at temperature 0."""
    return generate(model, prompt_BL, prompt_mask_BL,
                    sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                    eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
