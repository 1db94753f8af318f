"""What every student family provides: the interface the train step, the eval decoder and the
checkpoint converters use, so that none of them names a family.

Shape legend: B questions (rows when decoding), K rationales, L length, E encoder length,
D hidden width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol

import jax

Layout = Literal["decoder_only", "encoder_decoder"]


class Student(Protocol):
    """A Flax NNX student model.

    The batch it reads is the train batch of the README's batch contract: `tokens` [B, K, L]
    (and, for encoder-decoder students, `encoder_tokens` / `encoder_mask` [B, E]). Decoder-only
    students also read packed batches (data/packing.py) with `packed_hidden(batch)`: hidden
    states [R, L, D] of `tokens` [R, L] at `positions`, attending within `segment_ids`.
    """

    LAYOUT: ClassVar[Layout]  # how mcckd-prepare's rationales are tokenized for it
    HF_PREFIX: ClassVar[str]  # prepended to parameter paths to get Hugging Face names
    HF_UNPREFIXED: ClassVar[tuple[str, ...]]  # top-level modules outside HF_PREFIX
    config: Any  # the family's config (frozen dataclass with from_hf / to_hf)

    def batch_hidden(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Final hidden states [B, K, L, D] of every rationale of a train batch."""

    def output_weight(self) -> jax.Array:
        """The [D, V] output projection (see `final_logit_softcap`)."""

    @property
    def final_logit_softcap(self) -> float | None:
        """c when the logits are c * tanh((hidden @ W) / c) (Gemma 2); None when they are
        hidden @ W."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [..., V] of hidden states [..., D] (full vocabulary)."""

    def start_generation(self, prompt_BL: jax.Array, prompt_mask_BL: jax.Array,
                         new_slots: int) -> tuple[jax.Array, Any]:
        """Prefill: logits [B, V] of the first new token and the decoding state (a pytree),
        with cache room for `new_slots` more tokens. Decoder-only prompts are left-padded."""

    def generation_step(self, token_B: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """Feeds one token per row: logits [B, V] of the next token and the new state."""

    @staticmethod
    def hf_ignored(config: Any, name: str) -> bool:
        """Checkpoint tensors that the model does not read (e.g. a tied head's copy)."""
