"""The MCC-KD objective as a table of terms: loss = sum over terms of weight * sum / count.

Each term is one function returning (sum, count), float32 scalars: the summed per-token (or
per-question, per-pair) loss and the number of things summed over. Sums and counts of
micro-batches and hosts add up, so `sum / count` of the totals is the full batch's mean, and a
term that enters the loss also gives its count from the masks alone (`Term.batch_count`), so
that a caller can weight micro-batches before their forward pass. `TERMS` also names each
term's metrics, its weight and how the progress bar and mcckd-plot show it: a new term is one
function, one weight and one entry here.

Shape legend: B questions, K rationales per question, L sequence length, S answer-span tokens,
V vocabulary, D model width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mcckd_jax.losses import consistency, cross_entropy

Array = jax.Array
Batch = Mapping[str, Array]  # the batch contract's fields (README, "The batch contract")


class StudentOutputs(NamedTuple):
    """What the terms read of the student's forward pass on one (micro-)batch."""

    hidden_BKLD: Array  # final hidden states, compute dtype
    output_weight_DV: Array  # the output projection (`embedding.T` when tied)
    logit_softcap: float | None  # logits are c * tanh((hidden @ W) / c) when set (Gemma 2)
    span_logits_BKSV: Array  # float32 logits at span_positions, soft-capped


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """How the terms are computed (not how they are weighted)."""

    temperature: float = 1.0  # softmax temperature of the answer distributions
    formulation: consistency.ConsistencyFormulation = "exact"  # "release": the authors' KL
    chunk_size: int | None = 1024  # tokens per cross-entropy chunk; None builds full logits


def gather_span_hidden(hidden_BKLD: Array, span_positions_BKS: Array) -> Array:
    """Hidden states [B, K, S, D] at the positions that predict each answer token.

    Positions outside [0, L) (padding) are clamped; mask them with span_mask.
    """
    return jnp.take_along_axis(hidden_BKLD, span_positions_BKS[..., None], axis=2, mode="clip")


def span_logits(hidden_BKLD: Array, output_weight_DV: Array, span_positions_BKS: Array, *,
                logit_softcap: float | None = None) -> Array:
    """Float32 logits [B, K, S, V] at the span positions only (soft-capped when a cap is set)."""
    return cross_entropy.project_to_vocab(gather_span_hidden(hidden_BKLD, span_positions_BKS),
                                          output_weight_DV,
                                          cross_entropy.check_softcap(logit_softcap))


def student_outputs(hidden_BKLD: Array, output_weight_DV: Array, span_positions_BKS: Array, *,
                    logit_softcap: float | None = None) -> StudentOutputs:
    """The terms' view of a forward pass; the span logits are computed once for all terms."""
    logit_softcap = cross_entropy.check_softcap(logit_softcap)
    return StudentOutputs(hidden_BKLD, output_weight_DV, logit_softcap,
                          span_logits(hidden_BKLD, output_weight_DV, span_positions_BKS,
                                      logit_softcap=logit_softcap))


def packed_student_outputs(hidden_RLD: Array, output_weight_DV: Array, span_index_BKS: Array, *,
                           logit_softcap: float | None = None) -> StudentOutputs:
    """The terms' view of a forward pass over packed rows (data/packing.py): the rows as B = R
    sequences of K = 1 view for the cross-entropy (`packed_term_batch` shapes the batch the
    same way), and the span logits gathered at `span_index` (row x L + position)."""
    logit_softcap = cross_entropy.check_softcap(logit_softcap)
    rows, length, width = hidden_RLD.shape
    span_hidden_BKSD = jnp.take(hidden_RLD.reshape(rows * length, width), span_index_BKS, axis=0,
                                mode="clip")
    return StudentOutputs(hidden_RLD[:, None], output_weight_DV, logit_softcap,
                          cross_entropy.project_to_vocab(span_hidden_BKSD, output_weight_DV,
                                                         logit_softcap))


def packed_term_batch(batch: Batch) -> dict[str, Array]:
    """A packed batch as the terms read it: targets and loss_mask [R, 1, L] (one view per row);
    span_mask and rationale_mask as they are."""
    return {"targets": batch["targets"][:, None], "loss_mask": batch["loss_mask"][:, None],
            "span_mask": batch["span_mask"], "rationale_mask": batch["rationale_mask"]}


# --------------------------------------------------------------------------------------------
# The terms: (outputs, batch, settings) -> (sum, count)
# --------------------------------------------------------------------------------------------


def cross_entropy_term(outputs: StudentOutputs, batch: Batch,
                       settings: LossSettings) -> tuple[Array, Array]:
    """(nll summed over every loss_mask token of all K rationales, number of those tokens)."""
    if settings.chunk_size is None:
        logits_BKLV = cross_entropy.project_to_vocab(outputs.hidden_BKLD, outputs.output_weight_DV,
                                                     outputs.logit_softcap)
        return cross_entropy.token_nll_sum(logits_BKLV, batch["targets"], batch["loss_mask"])
    return cross_entropy.chunked_nll_sum(outputs.hidden_BKLD, outputs.output_weight_DV,
                                         batch["targets"], batch["loss_mask"],
                                         settings.chunk_size, logit_softcap=outputs.logit_softcap)


def cross_entropy_count(batch: Batch, settings: LossSettings) -> Array:
    del settings
    return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def consistency_term(outputs: StudentOutputs, batch: Batch,
                     settings: LossSettings) -> tuple[Array, Array]:
    """(consistency KL sum, count): see `answer_consistency_kl`."""
    return consistency.consistency_kl_sum(outputs.span_logits_BKSV, batch["span_mask"],
                                          batch["rationale_mask"], settings.temperature,
                                          settings.formulation)


def consistency_batch_count(batch: Batch, settings: LossSettings) -> Array:
    return consistency.consistency_count(batch["span_mask"], batch["rationale_mask"],
                                         settings.formulation)


def agreement_term(outputs: StudentOutputs, batch: Batch,
                   settings: LossSettings) -> tuple[Array, Array]:
    """(span tokens on which all views' argmax agree, counted span tokens); not a loss."""
    del settings
    return consistency.argmax_agreement_sum(outputs.span_logits_BKSV, batch["span_mask"],
                                            batch["rationale_mask"])


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

TermFn = Callable[[StudentOutputs, Batch, LossSettings], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class Term:
    """One (sum, count) quantity of the objective; the metrics hold `name` = sum / count (0
    when count is 0) and `count_name` = count."""

    name: str  # metric of the mean, e.g. "ce"
    count_name: str  # metric of the count, e.g. "ce_tokens"
    value: TermFn  # (sum, count) of a (micro-)batch
    # The weight in the loss: a number, or the name of the weight (an `mcc_kd_loss` keyword and
    # a field of the train config's `objective`); None for a diagnostic outside the loss.
    weight: float | str | None = None
    # The count of `value` from the masks alone; every term in the loss has one.
    batch_count: Callable[[Batch, LossSettings], Array] | None = None
    symbol: str = ""  # in the loss formula, e.g. "CE"
    bar: str | None = None  # progress-bar label; None: not shown
    panel: tuple[str, str] | None = None  # mcckd-plot (title, y-axis label); None: not drawn


TERMS: tuple[Term, ...] = (
    Term("ce", "ce_tokens", cross_entropy_term, weight=1.0, batch_count=cross_entropy_count,
         symbol="CE", bar="ce", panel=("cross-entropy", "nats per rationale token")),
    Term("kl", "kl_count", consistency_term, weight="alpha", batch_count=consistency_batch_count,
         symbol="KL", bar="kl", panel=("consistency KL", "nats per answer token")),
    Term("argmax_agreement", "span_tokens", agreement_term),
)


def term_weights(named: Mapping[str, float], terms: tuple[Term, ...] = TERMS) -> dict[str, float]:
    """{term name: weight} for the terms in the loss; `named` gives the named weights
    (e.g. {"alpha": 0.5}, or a config's fields)."""
    if missing := [term.name for term in terms if term.weight is not None
                   and term.batch_count is None]:
        raise ValueError(f"terms {missing} are weighted but have no batch_count")
    return {term.name: named[term.weight] if isinstance(term.weight, str) else term.weight
            for term in terms if term.weight is not None}


def evaluate_terms(outputs: StudentOutputs, batch: Batch, settings: LossSettings,
                   terms: tuple[Term, ...] = TERMS) -> dict[str, tuple[Array, Array]]:
    """{term name: (sum, count)}; add these over micro-batches with `jax.tree.map(jnp.add, ...)`."""
    return {term.name: term.value(outputs, batch, settings) for term in terms}


def weighted_loss(sums: Mapping[str, tuple[Array, Array]], weights: Mapping[str, float],
                  totals: Mapping[str, Array] | None = None) -> Array:
    """sum over terms of weight * sum / count, with each term's count taken from `totals`
    (e.g. the whole batch's, for a micro-batch's share of the loss) or else from `sums`."""
    loss = jnp.zeros((), jnp.float32)
    for name, weight in weights.items():
        term_sum, count = sums[name]
        count = count if totals is None else totals[name]
        loss = loss + weight * term_sum / jnp.maximum(count, 1.0)
    return loss


def term_metrics(sums: Mapping[str, tuple[Array, Array]], weights: Mapping[str, float],
                 terms: tuple[Term, ...] = TERMS) -> dict[str, Array]:
    """loss, each term's mean under its name and its count under its count_name."""
    metrics = {"loss": weighted_loss(sums, weights)}
    for term in terms:
        term_sum, count = sums[term.name]
        metrics[term.name] = term_sum / jnp.maximum(count, 1.0)
        metrics[term.count_name] = count
    return metrics


def mcc_kd_loss(hidden: Array, output_weight: Array, targets: Array, loss_mask: Array,
                span_positions: Array, span_mask: Array, rationale_mask: Array, *,
                alpha: float, temperature: float = 1.0, chunk_size: int | None = 1024,
                formulation: consistency.ConsistencyFormulation = "exact",
                logit_softcap: float | None = None) -> tuple[Array, dict[str, Array]]:
    """CE over all rationale tokens + alpha * answer-span consistency KL (the terms of `TERMS`).

    The fields follow the batch contract (README, "The batch contract"). Full-vocabulary
    logits are never built for the cross-entropy when chunk_size is set; the KL projects only
    the span positions.

    Args:
      hidden: [B, K, L, D] final hidden states of the student (compute dtype).
      output_weight: [D, V] output projection (`embedding.T` for tied embeddings).
      targets, loss_mask: [B, K, L] next tokens and 1 where they are rationale/EOS tokens.
      span_positions: [B, K, S] int positions whose prediction is answer token s.
      span_mask: [B, S]; rationale_mask: [B, K].
      alpha: weight of the consistency term; 0 gives plain multi-rationale distillation.
      chunk_size: tokens per cross-entropy chunk, or None to build the full logits.
      logit_softcap: c when the student's logits are c * tanh((hidden @ W) / c) (Gemma 2),
        applied in float32 to every logit the terms use; None for hidden @ W.

    Returns:
      (loss, metrics): metrics holds float32 scalars: ce, kl, loss, ce_tokens, kl_count (the
      weight of kl, see `answer_consistency_kl`), kl_questions, kl_pairs, span_tokens,
      argmax_agreement and single_rationale_questions.
    """
    batch = {"targets": targets, "loss_mask": loss_mask, "span_positions": span_positions,
             "span_mask": span_mask, "rationale_mask": rationale_mask}
    settings = LossSettings(temperature=temperature, formulation=formulation,
                            chunk_size=chunk_size)
    outputs = student_outputs(hidden, output_weight, span_positions, logit_softcap=logit_softcap)
    metrics = term_metrics(evaluate_terms(outputs, batch, settings),
                           term_weights({"alpha": alpha}))
    metrics.update(consistency.rationale_counts(span_mask, rationale_mask))
    return metrics["loss"], metrics
