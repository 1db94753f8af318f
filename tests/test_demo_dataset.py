"""Demo data set: disjoint splits, MCC-KD records, and the real mcckd-prepare on them."""

import collections
import json

import pytest

from mcckd_jax.cli import prepare as prepare_cli
from mcckd_jax.data import answers, records
from mcckd_jax.demo import dataset, problems, stories

CONFIG = dataset.DemoDataConfig(train=400, dev=60, test=80, seed=3)


@pytest.fixture(scope="module")
def splits():
    return dataset.draw_splits(CONFIG)


def test_split_of_shares_keys_in_proportion_to_the_sizes():
    sizes = {"train": 70, "dev": 10, "test": 20}
    counts = collections.Counter(dataset.split_of(("k", i), 0, sizes) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.7) < 0.02
    assert abs(counts["dev"] / 20000 - 0.1) < 0.02
    assert abs(counts["test"] / 20000 - 0.2) < 0.02
    assert dataset.split_of(("k", 1), 0, {"train": 0, "dev": 0, "test": 5}) == "test"


def test_splits_have_the_sizes_asked_and_disjoint_arithmetic(splits):
    assert {split: len(items) for split, items in splits.items()} == CONFIG.sizes()
    keys = {split: [p.key for p in items] for split, items in splits.items()}
    for split, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), split
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["dev"]) & set(keys["test"])
    questions = [{p.question for p in items} for items in splits.values()]
    assert sum(map(len, questions)) == len(set().union(*questions))
    for items in splits.values():
        assert {p.kind for p in items} == set(stories.KINDS)


def test_splits_depend_only_on_the_seed(splits):
    again = dataset.draw_splits(CONFIG)
    assert [p.question for p in again["test"]] == [p.question for p in splits["test"]]
    other = dataset.draw_splits(dataset.DemoDataConfig(train=400, dev=60, test=80, seed=4))
    assert [p.question for p in other["test"]] != [p.question for p in splits["test"]]


def test_running_out_of_distinct_problems_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(stories, "KINDS", {"share": stories.share})  # 343 distinct problems
    with pytest.raises(ValueError, match="only .* distinct train problems could be drawn"):
        dataset.draw_splits(dataset.DemoDataConfig(train=500, dev=0, test=0), patience=3000)


@pytest.mark.parametrize("field,value", [("train", -1), ("rationales_per_question", 0),
                                         ("wrong_share", 1.0), ("max_quantity", 9),
                                         ("max_quantity", 100)])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        dataset.DemoDataConfig(**{field: value})


def test_eval_records_read_back_with_labels_their_reference_states(splits, tmp_path):
    path = tmp_path / "test.json"
    path.write_text(dataset.json_list(dataset.eval_records(splits["test"])))
    read = records.read_records(path, task=problems.DEMO_TASK)
    assert [r.question for r in read.records] == [p.question for p in splits["test"]]
    for record in read.records:
        assert len(record.rationales) == 1
        assert record.rationales[0].endswith(f"Therefore, the answer is {record.label}.")
        assert answers.extract_answer(record.rationales[0], problems.DEMO_TASK,
                                      question=record.question) == record.label


def test_mcckd_prepare_drops_the_wrong_and_repeated_rationales_and_keeps_k(splits, tmp_path,
                                                                          capsys):
    rows, drafts = dataset.train_records(splits["train"], CONFIG)
    source = tmp_path / "train.json"
    source.write_text(dataset.json_list(rows))
    output = tmp_path / "train.jsonl"
    assert prepare_cli.main([str(source), "--task", problems.DEMO_TASK, "--output", str(output),
                             "--num_rationales", "4"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "train.jsonl.report.json").read_text())
    # Expected counts, from the generator's own bookkeeping rather than from prepare's code.
    wrong = sum(not r.correct for drawn in drafts for r in drawn)
    correct_texts = [[r.text for r in drawn if r.correct] for drawn in drafts]
    repeats = sum(len(texts) - len(set(texts)) for texts in correct_texts)
    drops = report["rationale_drops"]
    assert report["questions_in"] == report["questions_out"] == CONFIG.train
    assert report["rationales_in"] == CONFIG.train * CONFIG.rationales_per_question
    assert drops["wrong_answer"] == wrong > 0.2 * report["rationales_in"]
    # prepare counts a repeat of a near duplicate as near, so repeats split between the two.
    assert 0 < drops["exact_duplicate"] <= repeats
    assert repeats <= drops["exact_duplicate"] + drops["near_duplicate"]
    assert report["rationales_out"] + sum(drops.values()) == report["rationales_in"]
    assert drops["over_limit"] > 0
    per_question = report["rationales_per_question"]
    assert per_question["4"] > 0.9 * CONFIG.train
    assert report["mean_pairwise_jaccard"]["after"] < report["mean_pairwise_jaccard"][
        "correct_distinct"]
    prepared = [json.loads(line) for line in output.read_text().splitlines()]
    for row, problem in zip(prepared, splits["train"]):
        assert row["question"] == problem.question and row["answer"] == str(problem.answer)
        assert 1 <= len(row["rationales"]) <= 4
        assert all(r.endswith(f"Therefore, the answer is {problem.answer}.")
                   for r in row["rationales"])
