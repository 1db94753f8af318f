"""The pure train step `(state, batch) -> (state, metrics)` of MCC-KD.

The MCC-KD loss (README, "The method") as the table of terms `mcckd_jax.losses.TERMS`: a
chunked cross-entropy over all K rationales from hidden states, and the consistency KL from
logits at the span positions only, each term a (sum, count) pair weighted by the objective
config (CE 1, KL alpha).
Gradient accumulation is exact: each micro-batch's term enters as its sum over the whole
batch's count, which the masks give before any forward pass; the (sum, count) pairs of the
micro-batches add up to the batch's.

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

    def loss_settings(self) -> losses.LossSettings:
        return losses.LossSettings(temperature=self.temperature, formulation=self.formulation,
                                   chunk_size=self.chunk_size)

    def term_weights(self) -> dict[str, float]:
        """{term name: weight} of the terms in the loss; named weights are fields of this
        config (`losses.Term.weight`)."""
        return losses.term_weights(dataclasses.asdict(self))


def real_token_count(batch: Batch) -> jax.Array:
    """Non-padding positions of a train batch (float32): in every sequence the positions up to
    its last loss_mask position (prompt and rationale come first, padding last), plus the real
    encoder tokens of an encoder-decoder batch."""
    if is_packed(batch):
        return jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))
    loss_mask_BKL = batch["loss_mask"].astype(bool)
    length = loss_mask_BKL.shape[-1]
    last_plus_one_BK = length - jnp.argmax(loss_mask_BKL[..., ::-1], axis=-1)
    count = jnp.sum(jnp.where(jnp.any(loss_mask_BKL, axis=-1), last_plus_one_BK, 0)
                    .astype(jnp.float32))
    if "encoder_mask" in batch:
        count += jnp.sum(batch["encoder_mask"].astype(jnp.float32))
    return count


def is_packed(batch: Batch) -> bool:
    """Whether a batch is packed (data/packing.py): rows of segments, not [B, K, L] views."""
    return "segment_ids" in batch


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


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    objective: ObjectiveConfig, learning_rate: Callable[[jax.Array], jax.Array],
                    num_micro_batches: int = 1) -> Callable[[TrainState, Batch],
                                                            tuple[TrainState, dict]]:
    """The pure step; jit it with the state's shardings and donate the state."""
    settings, weights = objective.loss_settings(), objective.term_weights()
    weighted_terms = [term for term in losses.TERMS if term.name in weights]

    def micro_loss(params, model_state, micro, totals):
        # copy: the dropout streams of model_state are advanced inside this trace.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        if is_packed(micro):
            outputs = losses.packed_student_outputs(
                model.packed_hidden(micro), model.output_weight(), micro["span_index"],
                logit_softcap=model.final_logit_softcap)
            micro = losses.packed_term_batch(micro)
        else:
            outputs = losses.student_outputs(model.batch_hidden(micro), model.output_weight(),
                                             micro["span_positions"],
                                             logit_softcap=model.final_logit_softcap)
        sums = losses.evaluate_terms(outputs, micro, settings)
        return losses.weighted_loss(sums, weights, totals), (sums, nnx.state(model, nnx.RngState))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        if is_packed(batch) and num_micro_batches > 1:
            # span_index points into the whole batch's rows; a micro-batch holds some of them.
            raise ValueError("packed batches take run.micro_batches=1")
        totals = {term.name: term.batch_count(batch, settings) for term in weighted_terms}

        def accumulate(carry, micro):
            grads, sums, model_state = carry
            (_, (micro_sums, rng_state)), micro_grads = grad_fn(state.params, model_state, micro,
                                                                totals)
            model_state = nnx.merge_state(model_state, rng_state)
            return (jax.tree.map(jnp.add, grads, micro_grads),
                    jax.tree.map(jnp.add, sums, micro_sums), model_state), None

        zero = jnp.zeros((), jnp.float32)
        zero_sums = {term.name: (zero, zero) for term in losses.TERMS}
        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        (grads, sums, model_state), _ = jax.lax.scan(
            accumulate, (zero_grads, zero_sums, state.model_state),
            split_micro_batches(batch, num_micro_batches))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**losses.term_metrics(sums, weights),
                   **losses.rationale_counts(batch["span_mask"], batch["rationale_mask"]),
                   "real_tokens": real_token_count(batch),
                   "grad_norm": optax.tree.norm(grads),
                   # Of the updated parameters: the loop saves no state whose weights overflowed.
                   "param_norm": optax.tree.norm(params),
                   "learning_rate": learning_rate(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                               opt_state=opt_state)
        return new_state, metrics

    return step
