"""Float64 NumPy references for mcckd_jax.losses, written as explicit loops.

They follow the definitions of the method (README, "The method") term by term: no O(K)
identity, no vectorised masking, so that they share no structure with the code under test.
"""

import itertools

import numpy as np


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def _kl(p, q):
    """KL(p || q) over one vocabulary row, with 0 * log(0 / q) = 0."""
    nonzero = p > 0
    return float(np.sum(p[nonzero] * (np.log(p[nonzero]) - np.log(q[nonzero]))))


def softcap(logits, cap):
    """cap * tanh(logits / cap) in float64, entry by entry (Gemma 2's final-logit capping)."""
    logits = np.asarray(logits, np.float64)
    capped = np.empty_like(logits)
    for index in np.ndindex(*logits.shape):
        capped[index] = cap * np.tanh(logits[index] / cap)
    return capped


def token_cross_entropy(logits, targets, mask):
    """(mean nll, count) over positions with mask != 0, weighted by mask."""
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0.0
    for index in np.ndindex(*np.shape(targets)):
        weight = float(mask[index])
        if weight == 0:
            continue
        total -= weight * _log_softmax(logits[index])[int(targets[index])]
        count += weight
    return (total / count if count else 0.0), count


def consistency_kl(span_logits, span_mask, rationale_mask, temperature=1.0):
    """Mean over questions (>= 2 views, >= 1 span token) of the mean over valid pairs i<j and
    valid span tokens of 0.5 * (KL(P_i||P_j) + KL(P_j||P_i)), P = softmax(logits / T)."""
    logits = np.asarray(span_logits, np.float64)
    num_questions, num_views, span_len, _ = logits.shape
    per_question = []
    for b in range(num_questions):
        views = [k for k in range(num_views) if rationale_mask[b][k]]
        tokens = [s for s in range(span_len) if span_mask[b][s]]
        if len(views) < 2 or not tokens:
            continue
        terms = []
        for s in tokens:
            for i, j in itertools.combinations(views, 2):
                p_i = np.exp(_log_softmax(logits[b, i, s] / temperature))
                p_j = np.exp(_log_softmax(logits[b, j, s] / temperature))
                terms.append(0.5 * (_kl(p_i, p_j) + _kl(p_j, p_i)))
        per_question.append(np.mean(terms))
    return (float(np.mean(per_question)) if per_question else 0.0), len(per_question)


def _release_smooth(probs, eps):
    shifted = probs + eps
    return shifted / (np.sum(shifted) + eps)


def release_consistency_kl(span_logits, span_mask, rationale_mask, temperature=1.0, eps=7e-5):
    """The authors' formulation: per direction KL(smooth(softmax(q/T)) || smooth(softmax(p))),
    the two directions averaged, mean over all valid (pair, span token) terms."""
    logits = np.asarray(span_logits, np.float64)
    num_questions, num_views, span_len, _ = logits.shape
    terms = []
    for b in range(num_questions):
        views = [k for k in range(num_views) if rationale_mask[b][k]]
        for i, j in itertools.combinations(views, 2):
            for s in range(span_len):
                if not span_mask[b][s]:
                    continue
                directions = []
                for estimate, target in ((logits[b, i, s], logits[b, j, s]),
                                         (logits[b, j, s], logits[b, i, s])):
                    est = _release_smooth(np.exp(_log_softmax(estimate)), eps)
                    tgt = _release_smooth(np.exp(_log_softmax(target / temperature)), eps)
                    directions.append(_kl(tgt, est))
                terms.append(0.5 * sum(directions))
    return (float(np.mean(terms)) if terms else 0.0), len(terms)


def central_difference_grad(fn, x, step=1e-6):
    """d fn / d x by central finite differences in float64; fn maps an array to a float."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (fn(plus) - fn(minus)) / (2 * step)
    return grad
