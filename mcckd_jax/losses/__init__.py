"""MCC-KD losses: multi-rationale token cross-entropy and answer-span consistency KL.

Pure `jax.numpy`; nothing from flax or the rest of the package is imported, so other JAX
codebases can use these functions on their own. Every reduction is masked, softmax and
accumulation run in float32 whatever the input dtype, and each loss returns its value together
with the count it averages over, so that micro-batches and hosts combine exactly:
`total = sum(value_i * count_i) / sum(count_i)`. Students whose logits are soft-capped
(Gemma 2: c * tanh((hidden @ W) / c)) pass `logit_softcap=c`.

Modules: `cross_entropy` (plain and chunked token cross-entropy), `consistency` (the answer-span
KL, its count and the argmax agreement), `objective` (the table of terms and `mcc_kd_loss`).

Shape legend: B questions, K rationales per question, L sequence length, S answer-span tokens,
V vocabulary, D model width, N flattened tokens, C tokens per chunk, J chunks.
"""

from mcckd_jax.losses.consistency import (RELEASE_SMOOTHING_EPS, ConsistencyFormulation,
                                          answer_consistency_kl, consistency_count,
                                          rationale_counts, span_argmax_agreement)
from mcckd_jax.losses.cross_entropy import (chunked_token_cross_entropy, softcap,
                                            token_cross_entropy)
from mcckd_jax.losses.objective import (TERMS, LossSettings, StudentOutputs, Term,
                                        evaluate_terms, gather_span_hidden, mcc_kd_loss,
                                        packed_student_outputs, packed_term_batch, span_logits,
                                        student_outputs, term_metrics, term_weights,
                                        weighted_loss)

__all__ = [
    "ConsistencyFormulation",
    "LossSettings",
    "RELEASE_SMOOTHING_EPS",
    "StudentOutputs",
    "TERMS",
    "Term",
    "answer_consistency_kl",
    "chunked_token_cross_entropy",
    "consistency_count",
    "evaluate_terms",
    "gather_span_hidden",
    "mcc_kd_loss",
    "packed_student_outputs",
    "packed_term_batch",
    "rationale_counts",
    "softcap",
    "span_argmax_agreement",
    "span_logits",
    "student_outputs",
    "term_metrics",
    "term_weights",
    "token_cross_entropy",
    "weighted_loss",
]
