"""Rationale selection: n-gram Jaccard, deduplication, diverse choice, determinism.

Diversity is checked against an independent reference: the expected mean pairwise Jaccard of a
uniformly random K-subset, which equals the mean over all pairs of the candidates (every pair is
equally likely to be in a random subset).
"""

import itertools

import numpy as np
import pytest

from data_testing import hand_labels, prepared_svamp, svamp_sample
from mcckd_jax.data import records, selection
from mcckd_jax.data.selection import SelectionConfig, jaccard, select_rationales, word_ngrams


def test_word_ngrams_and_jaccard_by_hand():
    assert word_ngrams("A b, c", 2) == {("a", "b"), ("b", ","), (",", "c")}
    assert word_ngrams("short", 3) == {("short",)}
    # {ab, bc, cd} vs {ab, bc, ce}: 2 shared of 4.
    assert jaccard(word_ngrams("a b c d", 2), word_ngrams("a b c e", 2)) == 0.5
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert selection.mean_pairwise_jaccard([word_ngrams("x", 1)]) is None


def test_select_diverse_exhaustive_finds_the_least_similar_subset():
    similarity = np.array([[1.0, 0.9, 0.8, 0.1],
                           [0.9, 1.0, 0.2, 0.3],
                           [0.8, 0.2, 1.0, 0.7],
                           [0.1, 0.3, 0.7, 1.0]])
    # Pairs: {0,3} 0.1 is the least similar pair; triples: {0,1,3}=1.3, {0,2,3}=1.6,
    # {1,2,3}=1.2, {0,1,2}=1.9, so {1,2,3}.
    assert sorted(selection.select_diverse(similarity, 2, [0, 1, 2, 3], 100)) == [0, 3]
    assert sorted(selection.select_diverse(similarity, 3, [3, 2, 1, 0], 100)) == [1, 2, 3]
    # Greedy: starts at 3 (row sum 2.1 is the lowest), adds 0 (0.1), then 1 (0.9+0.3 < 0.8+0.7).
    assert selection.select_diverse(similarity, 3, [0, 1, 2, 3], 0) == [3, 0, 1]


def test_wrong_and_duplicate_rationales_are_dropped_by_hand():
    rationales = ["He has 5 + 3 = 8 apples.",
                  "he has 5 +  3 = 8 APPLES.",  # exact duplicate after case and spaces
                  "He has 5 + 3 = 9 apples.",  # wrong
                  "He had 5 apples and got 3 more, so 5 + 3 = 8 apples now.",
                  "He has 5 + 3 = 8 apples!"]  # near duplicate of the first
    chosen = select_rationales("How many apples?", rationales, "8", "svamp",
                               SelectionConfig(num_rationales=4, ngram=2,
                                               near_duplicate_threshold=0.6))
    assert chosen == selection.QuestionSelection(kept=(0, 3), wrong_answer=(2,),
                                                 exact_duplicate=(1,), near_duplicate=(4,))


def test_every_kept_rationale_is_correct_by_hand_label(shared_data):
    labelled = {(q, r): correct for q, r, correct in hand_labels()}
    sample = svamp_sample(shared_data)
    checked = 0
    for question in sorted({q for q, _ in labelled}):
        row = sample[question]
        chosen = select_rationales(row["instruction"], row["output"], row["label"], "svamp",
                                   SelectionConfig(num_rationales=4))
        for kept in chosen.kept:
            assert labelled[(question, kept)], (question, kept)
            checked += 1
    assert checked >= 80


def _mean_jaccard(grams, indices):
    pairs = list(itertools.combinations(indices, 2))
    return sum(jaccard(grams[i], grams[j]) for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("exhaustive_limit", [5000, 0], ids=["exhaustive", "greedy"])
def test_kept_set_is_no_more_similar_than_a_random_choice(shared_data, exhaustive_limit):
    config = SelectionConfig(num_rationales=3, exhaustive_limit=exhaustive_limit)
    kept_means, random_means = [], []
    for record in records.read_records(shared_data / "mcckd_format/SVAMP/"
                                       "train_multicot_sample.json").records:
        chosen = select_rationales(record.question, record.rationales, record.label, "svamp",
                                   config)
        candidates = sorted(chosen.kept + chosen.over_limit)
        if len(candidates) <= config.num_rationales:
            continue
        grams = [word_ngrams(r, config.ngram) for r in record.rationales]
        kept_means.append(_mean_jaccard(grams, chosen.kept))
        random_means.append(_mean_jaccard(grams, candidates))
        if exhaustive_limit:
            # The exact minimum is no larger than any subset, so than their mean.
            assert kept_means[-1] <= random_means[-1] + 1e-12
    assert len(kept_means) >= 50
    assert np.mean(kept_means) < np.mean(random_means)


def test_same_seed_same_choice_other_seed_other_ties(shared_data):
    read = records.read_records(shared_data / "mcckd_format/SVAMP/train_multicot_sample.json")

    def run(seed, policy):
        config = SelectionConfig(num_rationales=2, seed=seed, policy=policy)
        return [select_rationales(r.question, r.rationales, r.label, "svamp", config).kept
                for r in read.records]

    assert run(0, "diverse") == run(0, "diverse")
    assert run(0, "random") == run(0, "random")
    assert run(0, "random") != run(1, "random")
    first = run(0, "first")
    assert all(kept == tuple(sorted(kept)) for kept in first)


def test_prepared_sample_keeps_at_most_k(shared_data):
    result = prepared_svamp(shared_data)
    assert all(1 <= len(r.rationales) <= 4 for r in result.records)


@pytest.mark.parametrize("field,value", [("num_rationales", 0), ("ngram", 0),
                                         ("policy", "best"), ("near_duplicate_threshold", 0.0)])
def test_config_is_checked(field, value):
    with pytest.raises(ValueError, match=field):
        SelectionConfig(**{field: value})
