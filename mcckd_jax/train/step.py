"""The pure train step `(state, batch) -> (state, metrics)` of MCC-KD.

The MCC-KD loss (README, "The method") through `mcckd_jax.losses`: a chunked cross-entropy
over all K rationales from hidden states, and the consistency KL from logits at the span
positions only.
Gradient accumulation is exact: each micro-batch's CE and KL are weighted by its share of the
whole batch's token and question counts, which the masks give before any forward pass.

Shape legend: A micro-batches, B questions, K rationales, L length, E encoder length, D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcckd_jax import losses
from mcckd_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The MCC-KD loss."""

    alpha: float = 1.0  # weight of the consistency KL; 0 is plain multi-rationale training
    temperature: float = 1.0  # softmax temperature of the answer distributions
    formulation: Literal["exact", "release"] = "exact"  # "release": the authors' PyTorch KL
    chunk_size: int | None = 1024  # tokens per cross-entropy chunk; None builds full logits

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")


def student_hidden(model: nnx.Module, batch: Batch) -> jax.Array:
    """Final hidden states [B, K, L, D] of every rationale; T5 encodes each question once."""
    tokens_BKL = batch["tokens"]
    batch_size, num_views, length = tokens_BKL.shape
    flat_tokens = tokens_BKL.reshape(batch_size * num_views, length)
    if "encoder_tokens" in batch:
        encoder_hidden_BED = model.encode(batch["encoder_tokens"], batch["encoder_mask"])
        hidden = model.decode_all(flat_tokens, jnp.repeat(encoder_hidden_BED, num_views, axis=0),
                                  jnp.repeat(batch["encoder_mask"], num_views, axis=0))
    else:
        # Right padding under a causal mask: real tokens never see pads, which the loss masks.
        hidden = model(flat_tokens)
    return hidden.reshape(batch_size, num_views, length, -1)


def split_micro_batches(batch: Batch, num_micro_batches: int) -> Batch:
    """[B, ...] -> [A, B / A, ...], strided so that every micro-batch keeps rows on every
    device of a batch-sharded array."""
    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"batch of {x.shape[0]} does not split into {num_micro_batches} "
                             "micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro_batches, num_micro_batches,
                                      *x.shape[1:]), 0, 1)
    return {name: split(value) for name, value in batch.items()}


_SUMMED = ("ce_tokens", "kl_count", "kl_questions", "kl_pairs", "span_tokens",
           "single_rationale_questions")


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    objective: ObjectiveConfig, learning_rate: Callable[[jax.Array], jax.Array],
                    num_micro_batches: int = 1) -> Callable[[TrainState, Batch],
                                                            tuple[TrainState, dict]]:
    """The pure step; jit it with the state's shardings and donate the state."""

    def micro_loss(params, model_state, micro, ce_total, kl_total):
        model = nnx.merge(graphdef, params, model_state)
        _, metrics = losses.mcc_kd_loss(
            student_hidden(model, micro), model.output_weight(), micro["targets"],
            micro["loss_mask"], micro["span_positions"], micro["span_mask"],
            micro["rationale_mask"], alpha=objective.alpha, temperature=objective.temperature,
            chunk_size=objective.chunk_size, formulation=objective.formulation)
        weighted = (metrics["ce"] * metrics["ce_tokens"] / ce_total
                    + objective.alpha * metrics["kl"] * metrics["kl_count"] / kl_total)
        return weighted, (metrics, nnx.state(model, nnx.RngState))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        ce_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        kl_total = jnp.maximum(losses.consistency_count(batch["span_mask"], batch["rationale_mask"],
                                                        objective.formulation), 1.0)

        def accumulate(carry, micro):
            grads, sums, model_state = carry
            (_, (metrics, rng_state)), micro_grads = grad_fn(state.params, model_state, micro,
                                                             ce_total, kl_total)
            model_state = nnx.merge_state(model_state, rng_state)
            sums = {"ce_sum": sums["ce_sum"] + metrics["ce"] * metrics["ce_tokens"],
                    "kl_sum": sums["kl_sum"] + metrics["kl"] * metrics["kl_count"],
                    "agree_sum": sums["agree_sum"] + metrics["argmax_agreement"] * metrics["span_tokens"],
                    **{k: sums[k] + metrics[k] for k in _SUMMED}}
            return (jax.tree.map(jnp.add, grads, micro_grads), sums, model_state), None

        zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "kl_sum", "agree_sum", *_SUMMED)}
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        (grads, sums, model_state), _ = jax.lax.scan(
            accumulate, (zero_grads, zero_sums, state.model_state),
            split_micro_batches(batch, num_micro_batches))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ce = sums["ce_sum"] / jnp.maximum(sums["ce_tokens"], 1.0)
        kl = sums["kl_sum"] / jnp.maximum(sums["kl_count"], 1.0)
        metrics = {"loss": ce + objective.alpha * kl, "ce": ce, "kl": kl,
                   "argmax_agreement": sums["agree_sum"] / jnp.maximum(sums["span_tokens"], 1.0),
                   "grad_norm": optax.tree.norm(grads),
                   # Of the updated parameters: the loop saves no state whose weights overflowed.
                   "param_norm": optax.tree.norm(params),
                   "learning_rate": learning_rate(state.step),
                   **{k: sums[k] for k in _SUMMED}}
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                               opt_state=opt_state)
        return new_state, metrics

    return step
