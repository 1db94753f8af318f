"""The mcckd-teacher run (teacher/run.py): every question gets its samples in order, the cache
makes a resumed run ask for nothing twice and write the same output, adaptive sampling stops
at the target or the budget, and the output is what mcckd-prepare reads.

The teacher here is a scripted one (the thing under test is the run, not a teacher): its
rationale for (question, index) is fixed, right for some indices and wrong for others, and it
records what it was asked and can fail after a number of samples, as a killed run would.
"""

import json

import pytest

from mcckd_jax.data import prepare, records
from mcckd_jax.teacher import cache, prompts, run
from mcckd_jax.teacher.base import Sample, SamplingParams


class Interrupted(RuntimeError):
    pass


class ScriptedTeacher:
    """Rationale i of a question is right when `right(uid, i)`; varied wording so that the
    right ones are not near-duplicates."""

    def __init__(self, labels, right, fail_after=None):
        self.labels, self.right, self.fail_after = labels, right, fail_after
        self.asked = []

    @property
    def model_id(self):
        return "scripted"

    def generate(self, requests, params, on_sample):
        for request in requests:
            if self.fail_after is not None and len(self.asked) >= self.fail_after:
                raise Interrupted("killed")
            self.asked.append((request.question_key, request.sample_index))
            label = self.labels[request.question_key]
            answer = label if self.right(request.question_key, request.sample_index) else "12345"
            words = " ".join(f"step{request.sample_index}x{j}" for j in range(6))
            text = (f"Sample {request.sample_index} at seed {params.seed}: {words}. "
                    f"Therefore, the answer is {answer}.")
            on_sample(request, Sample(text=text, prompt_tokens=10, completion_tokens=20,
                                      finish_reason="stop"))


@pytest.fixture
def questions(shared_data):
    path = shared_data / "mcckd_format" / "SVAMP" / "test.json"
    return records.read_records(path).records[:5]


def start(questions, tmp_path, teacher, *, num_samples=3, adaptive=run.AdaptiveConfig(),
          cache_name="cache"):
    with cache.SampleCache(tmp_path / cache_name) as store:
        return run.run_teacher(questions, teacher, store, task="svamp",
                               template=prompts.load_prompt("zero_shot", "svamp"),
                               params=SamplingParams(seed=7), num_samples=num_samples,
                               adaptive=adaptive)


def labels_of(questions):
    return {r.uid: r.label for r in questions}


def test_every_question_gets_its_samples_in_order_and_prepare_reads_them(questions, tmp_path):
    teacher = ScriptedTeacher(labels_of(questions), right=lambda uid, i: i != 1)
    result = start(questions, tmp_path, teacher)
    assert [row["instruction"] for row in result.rows] == [r.question for r in questions]
    assert [row["label"] for row in result.rows] == [r.label for r in questions]
    for row in result.rows:
        assert [text.split()[1] for text in row["output"]] == ["0", "1", "2"]
    assert sorted(teacher.asked) == sorted((r.uid, i) for r in questions for i in range(3))
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(result.rows))
    prepared = prepare.prepare_records(records.read_records(raw).records,
                                       prepare.PrepareConfig(task="svamp"))
    assert prepared.report["rationale_drops"]["wrong_answer"] == len(questions)  # index 1
    assert prepared.report["rationales_out"] == 2 * len(questions)
    report = result.report
    assert (report["questions"], report["samples"], report["samples_new"]) == (5, 15, 15)
    assert report["samples_per_question"] == {"3": 5}
    assert report["completion_tokens"] == 15 * 20


def test_a_resumed_run_asks_for_nothing_twice_and_writes_the_same(questions, tmp_path):
    labels = labels_of(questions)
    whole = start(questions, tmp_path, ScriptedTeacher(labels, lambda uid, i: True),
                  cache_name="whole")
    with pytest.raises(Interrupted):
        start(questions, tmp_path, ScriptedTeacher(labels, lambda uid, i: True, fail_after=7))
    second = ScriptedTeacher(labels, lambda uid, i: True)
    resumed = start(questions, tmp_path, second)
    assert len(second.asked) == 15 - 7
    assert resumed.report["samples_from_cache"] == 7
    assert json.dumps(resumed.rows) == json.dumps(whole.rows)
    third = ScriptedTeacher(labels, lambda uid, i: True)
    start(questions, tmp_path, third)
    assert third.asked == []


def test_adaptive_sampling_stops_at_the_target_or_the_budget(questions, tmp_path):
    hopeless = questions[0].uid
    # Index i is right from index 4 on, never for the hopeless question.
    teacher = ScriptedTeacher(labels_of(questions), right=lambda uid, i: uid != hopeless and i >= 4)
    result = start(questions, tmp_path, teacher, num_samples=3,
                   adaptive=run.AdaptiveConfig(target=2, max_samples=9))
    counts = {row["instruction"]: len(row["output"]) for row in result.rows}
    # Rounds of 3: indices 4 and 5 are the first two right ones, so 6 samples suffice; the
    # hopeless question runs to the budget of 9.
    assert counts[questions[0].question] == 9
    assert all(counts[r.question] == 6 for r in questions[1:])
    assert result.report["adaptive"]["questions_short"] == [hopeless]
    assert result.report["rounds"] == 3
    for row, record in zip(result.rows[1:], questions[1:]):
        assert run.usable_count(record, row["output"], "svamp", 2) == 2


def test_repeated_question_ids_and_bad_settings_are_refused(questions, tmp_path):
    teacher = ScriptedTeacher(labels_of(questions), lambda uid, i: True)
    with pytest.raises(ValueError, match="question ids repeat"):
        start([questions[0], questions[0]], tmp_path, teacher)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        start(questions, tmp_path, teacher, num_samples=0)
    with pytest.raises(ValueError, match="adaptive.target"):
        run.AdaptiveConfig(target=-1)
