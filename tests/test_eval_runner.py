"""The eval runner on real SVAMP test questions with the test's sentencepiece tokenizer: fixed
global batches whose padding rows are dropped, prompt buckets compiled once each, greedy
outputs equal to `decoding.generate` on the same left-padded prompts, and self-consistency
votes recomputed by hand from a stub student whose samples are "8" or "9".

Expectations are built from the raw question file (json) and the tokenizer, not through the
data pipeline the runner uses. Mesh (2, 2, 2): a global batch of 4 rows splits over
data x fsdp = 4 devices.

Legend: B rows per batch, P prompt length, N new tokens, V vocabulary.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import data_testing
from mcckd_jax import sharding
from mcckd_jax.data import answers, records
from mcckd_jax.data.tokenization import DEFAULT_PROMPT_TEMPLATE, TokenizationConfig
from mcckd_jax.eval import decoding, runner
from mcckd_jax.models import decoder, llama

TOKENIZATION = TokenizationConfig(task="svamp", layout="decoder_only", max_length=256)
BATCH = 4
BUCKETS = (40, 56, 64, 96)
QUESTIONS = 14  # three full batches and one with two padding rows
GREEDY = decoding.SamplingConfig(max_new_tokens=8)
PAD, EOS = 0, 1  # the test tokenizer's ids (T5's layout)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    tokenizer = data_testing.t5_tokenizer(shared_data)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD, EOS)
    return tokenizer


@pytest.fixture(scope="module")
def question_file(shared_data):
    return shared_data / "mcckd_format" / "SVAMP" / "test.json"


@pytest.fixture(scope="module")
def raw_questions(question_file):
    """(question, label) of every row of the file, read with json alone."""
    return [(row["instruction"].strip(), row["label"])
            for row in json.loads(question_file.read_text())]


def prompt_ids(tokenizer, question):
    """The prompt as the tokenizer gives it, without the EOS it appends (a decoder prompt
    continues; it does not end)."""
    ids = tokenizer(DEFAULT_PROMPT_TEMPLATE.format(question=question))["input_ids"]
    assert ids[-1] == EOS
    return ids[:-1]


def smallest_bucket(length):
    return min(bucket for bucket in BUCKETS if bucket >= length)


def eval_config(question_file, **fields):
    settings = dict(datasets=(runner.EvalDataset("svamp", str(question_file)),),
                    batch_size=BATCH, prompt_buckets=BUCKETS, sampling=GREEDY,
                    max_questions=QUESTIONS, progress_bar=False)
    return runner.EvalConfig(**{**settings, **fields})


def run(model, config, tokenizer, mesh, **kwargs):
    [data] = runner.load_eval_data(config, tokenizer, TOKENIZATION)
    with sharding.activate(mesh):
        return runner.evaluate(model, data, tokenizer, config=config,
                               tokenization_config=TOKENIZATION, mesh=mesh, **kwargs)


def recording_student(inner):
    """`inner` behind a student whose class is new (so the decoding loop is traced afresh for
    it) and that records the prompt shape [B, P] each time the loop is traced, i.e. compiled."""
    traces = []

    class Recording(nnx.Module):
        def __init__(self, model):
            self.model = model

        def start_generation(self, prompt_BL, prompt_mask_BL, new_slots):
            traces.append(tuple(prompt_BL.shape))
            return self.model.start_generation(prompt_BL, prompt_mask_BL, new_slots)

        def generation_step(self, token_B, state):
            return self.model.generation_step(token_B, state)

    return Recording(inner), traces


@pytest.fixture(scope="module")
def greedy_run(mesh, tokenizer, question_file):
    """(student, predictions, summary, prompt shapes traced, new compilations) of one greedy
    evaluation of the first QUESTIONS questions with a tiny random LLaMA."""
    with sharding.activate(mesh):
        inner = decoder.DecoderModel(llama.tiny(vocab_size=1000), rngs=nnx.Rngs(0))
    model, traces = recording_student(inner)
    compiled = decoding._generate._cache_size()
    predictions, summary = run(model, eval_config(question_file), tokenizer, mesh)
    return model, predictions, summary, list(traces), decoding._generate._cache_size() - compiled


def test_every_question_is_answered_once_in_file_order(greedy_run, raw_questions, question_file):
    _, predictions, summary, _, _ = greedy_run
    assert len(predictions) == QUESTIONS  # the two padding rows of the last batch are gone
    assert [(p.question, p.label) for p in predictions] == raw_questions[:QUESTIONS]
    assert [p.uid for p in predictions] == [f"test.json:{i}" for i in range(QUESTIONS)]
    assert summary["role"] == "test" and summary["path"] == str(question_file)
    assert summary["questions"] == QUESTIONS
    assert summary["correct"] == sum(p.correct for p in predictions)
    assert summary["missing"] == sum(p.extracted is None for p in predictions)
    assert summary["accuracy"] == summary["correct"] / QUESTIONS


def test_prompts_take_the_smallest_bucket_and_each_bucket_compiles_once(
        greedy_run, tokenizer, raw_questions):
    _, _, _, traces, compiled = greedy_run
    lengths = [len(prompt_ids(tokenizer, q)) for q, _ in raw_questions[:QUESTIONS]]
    longest = [max(lengths[i:i + BATCH]) for i in range(0, QUESTIONS, BATCH)]
    buckets = [smallest_bucket(length) for length in longest]
    distinct = list(dict.fromkeys(buckets))
    assert 2 <= len(distinct) < len(buckets)  # several buckets, one of them used twice
    # A batch takes the bucket of its longest prompt: the smallest bucket would hold some
    # prompts on their own, but every batch has a longer one.
    assert min(lengths) <= BUCKETS[0] < min(longest)
    assert traces == [(BATCH, bucket) for bucket in distinct]
    assert compiled == len(distinct)


def test_greedy_outputs_equal_generate_on_the_same_left_padded_prompts(
        greedy_run, tokenizer, raw_questions, mesh):
    model, predictions, _, _, _ = greedy_run
    expected = []
    for first in range(0, QUESTIONS, BATCH):
        prompts = [prompt_ids(tokenizer, q)
                   for q, _ in raw_questions[first:min(first + BATCH, QUESTIONS)]]
        width = smallest_bucket(max(map(len, prompts)))
        prompt_BP = np.full((BATCH, width), PAD, np.int32)
        mask_BP = np.zeros((BATCH, width), np.int32)
        for row, ids in enumerate(prompts):  # rows past the last question stay padding
            prompt_BP[row, width - len(ids):], mask_BP[row, width - len(ids):] = ids, 1
        with sharding.activate(mesh):
            tokens_BN = np.asarray(decoding.generate(model, prompt_BP, mask_BP, sampling=GREEDY,
                                                     eos_token_ids=(EOS,), pad_token_id=PAD))
        for tokens_N in tokens_BN[:len(prompts)]:
            kept = tokens_N[:list(tokens_N).index(EOS)] if EOS in tokens_N else tokens_N
            expected.append(tokenizer.decode(kept.tolist(), skip_special_tokens=True).strip())
    assert [p.output for p in predictions] == expected
    assert len(set(expected)) >= QUESTIONS // 2  # the outputs tell the questions apart
    for p, (question, label) in zip(predictions, raw_questions):
        assert p.extracted == answers.extract_answer(p.output, "svamp", question=question)
        assert p.correct == answers.answers_match(p.extracted, label, "svamp")
        assert p.samples == () and p.sample_answers == ()


class TwoAnswers(nnx.Module):
    """A stub student: the first new token is `eight` or `nine` with probability 1/2 each,
    the second is EOS."""

    def __init__(self, vocab_size, eight, nine):
        self.vocab_size, self.eight, self.nine = vocab_size, eight, nine

    def _logits(self, rows, tokens):
        return jnp.full((rows, self.vocab_size), -1e9, jnp.float32).at[:, tokens].set(0.0)

    def start_generation(self, prompt_BL, prompt_mask_BL, new_slots):
        return self._logits(prompt_BL.shape[0], [self.eight, self.nine]), jnp.zeros((), jnp.int32)

    def generation_step(self, token_B, state):
        return self._logits(token_B.shape[0], [EOS]), state


def test_self_consistency_takes_the_majority_and_ties_go_to_the_first_answer(
        mesh, tokenizer, question_file, raw_questions):
    stub = TwoAnswers(1000, *tokenizer.convert_tokens_to_ids(["▁8", "▁9"]))
    sampled = decoding.SamplingConfig(temperature=1.0, max_new_tokens=3)
    cases = set()
    by_seed = {}
    for seed in (0, 1, 2, 0):
        config = eval_config(question_file, num_samples=4, sampling=sampled, seed=seed,
                             max_questions=8)
        predictions, summary = run(stub, config, tokenizer, mesh)
        if seed in by_seed:  # the same seed draws the same samples
            assert [p.samples for p in predictions] == by_seed[seed]
            continue
        by_seed[seed] = [p.samples for p in predictions]
        for p, (question, label) in zip(predictions, raw_questions):
            assert p.question == question and len(p.samples) == 4
            assert set(p.samples) <= {"8", "9"} and p.sample_answers == p.samples
            eights = p.samples.count("8")
            vote = "8" if eights > 2 else "9" if eights < 2 else p.samples[0]
            assert p.extracted == vote and p.output == p.samples[0]
            assert p.correct == (vote == label)  # labels: question 6 is 9, question 7 is 8
            cases.add("tie" if eights == 2 else "unanimous" if eights in (0, 4)
                      else "majority" if vote == p.samples[0] else "majority against the first")
        assert summary["correct"] == sum(p.correct for p in predictions)
    # Every rule was exercised: a real vote, ties, and samples that differ between seeds.
    assert cases >= {"tie", "majority against the first"}
    assert by_seed[0] != by_seed[1]


def test_stopping_between_batches_returns_nothing(greedy_run, mesh, tokenizer, question_file):
    model, _, _, _, _ = greedy_run
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) > 1  # after the first batch

    assert run(model, eval_config(question_file), tokenizer, mesh, should_stop=should_stop) is None
    assert len(asked) == 2


def test_a_prompt_longer_than_every_bucket_is_an_error(greedy_run, mesh, tokenizer,
                                                       question_file):
    model, _, _, _, _ = greedy_run
    with pytest.raises(ValueError, match="tokens exceeds the largest bucket 32"):
        run(model, eval_config(question_file, prompt_buckets=(16, 32)), tokenizer, mesh)


def test_a_batch_that_does_not_split_over_the_mesh_is_an_error(greedy_run, mesh, tokenizer,
                                                              question_file):
    model, _, _, _, _ = greedy_run
    # 2 rows per global batch, 4 data-parallel devices.
    with pytest.raises(ValueError, match=r"global batch of 2 questions .* --batch_size"):
        run(model, eval_config(question_file, batch_size=2), tokenizer, mesh)


def test_load_eval_data_reads_the_first_max_questions(tokenizer, question_file, raw_questions,
                                                      tmp_path):
    first, whole = (runner.load_eval_data(eval_config(question_file, max_questions=n),
                                          tokenizer, TOKENIZATION)[0] for n in (5, None))
    assert [r.question for r in first.records] == [q for q, _ in raw_questions[:5]]
    assert first.prompts.num_questions == 5 and list(first.prompts.prompt(3)) == prompt_ids(
        tokenizer, raw_questions[3][0])
    assert len(whole.records) == whole.prompts.num_questions == len(raw_questions) == 150
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(records.RecordError, match="no question to evaluate"):
        runner.load_eval_data(eval_config(empty), tokenizer, TOKENIZATION)


@pytest.mark.parametrize("fields, message", [
    (dict(batch_size=0), "batch_size and num_samples must be >= 1"),
    (dict(num_samples=0), "batch_size and num_samples must be >= 1"),
    (dict(num_samples=3), "set a temperature > 0"),
    (dict(datasets=(runner.EvalDataset("a", "x.json"), runner.EvalDataset("a", "y.json"))),
     "dataset names must be distinct"),
])
def test_eval_config_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        runner.EvalConfig(**fields)


@pytest.mark.parametrize("max_questions", [-1, 0])
def test_a_max_questions_below_one_is_rejected(tokenizer, question_file, max_questions):
    # -1 would slice records[:-1]: every question but the last, silently.
    with pytest.raises(ValueError, match="max_questions must be >= 1"):
        config = eval_config(question_file, max_questions=max_questions)
        runner.load_eval_data(config, tokenizer, TOKENIZATION)


def test_eval_settings_that_are_allowed():
    config = runner.EvalConfig(num_samples=3, sampling=decoding.SamplingConfig(temperature=0.7),
                               datasets=(runner.EvalDataset("a", "x.json", role="dev"),
                                         runner.EvalDataset("b", "x.json")))
    assert config.num_samples == 3 and [d.role for d in config.datasets] == ["dev", "test"]
    with pytest.raises(ValueError, match="role must be dev or test, got 'train'"):
        runner.EvalDataset("a", "x.json", role="train")
