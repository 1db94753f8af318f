"""The API teacher against a real OpenAI-compatible server (llama-cpp-python's, serving
SmolLM2-135M-Instruct on loopback) through a fault-injecting proxy (tests/fault_proxy.py):
every fault kind is retried and the samples equal a fault-free run's, Retry-After is waited
for, a refused request fails at once and a persistent fault after max_attempts, blocks of n
are reproducible on resume, and the API key reaches the server but no file, log or message.

Independent references: a fault-free run straight to the server, one sample per request (what
the seeds define); the proxy's own counts of what it injected and forwarded, and its clock.
The backoff schedule, Retry-After parsing, token shares and blocks are checked as pure functions.
"""

import email.utils
import itertools
import json
import logging
import os
import random
import threading
import traceback

import pytest

from fault_proxy import Fault, FaultProxy
from mcckd_jax.data import records
from mcckd_jax.teacher import api, cache, prompts
from mcckd_jax.teacher.base import SampleRequest, SamplingParams, sample_seed

PARAMS = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=11)
FAST_BACKOFF = dict(backoff_base_s=0.05, backoff_cap_s=0.2)


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_below_a_doubling_capped_bound():
    highest = [api.backoff_delay(a, 0.5, 30, lambda low, high: high) for a in range(1, 10)]
    assert highest == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert api.backoff_delay(3, 0.5, 30, lambda low, high: low) == 0
    draws = [api.backoff_delay(3, 0.5, 30, random.Random(i).uniform) for i in range(2000)]
    assert 0 <= min(draws) < 0.05 and 1.95 < max(draws) <= 2.0  # the whole [0, 2], no floor
    assert api.backoff_delay(10_000, 0.5, 30, lambda low, high: high) == 30  # no overflow


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = 1_700_000_000.0
    assert api.parse_retry_after("3", now) == 3.0
    assert api.parse_retry_after(" 0.5 ", now) == 0.5
    assert api.parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert api.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-1", "nan", "inf"):
        assert api.parse_retry_after(unreadable, now) is None


def test_retry_after_replaces_the_backoff_up_to_a_cap():
    jitter = lambda low, high: high  # noqa: E731
    assert api.retry_delay(1, 3.0, 0.5, 30, jitter) == 3.0
    assert api.retry_delay(5, 0.0, 0.5, 30, jitter) == 0.0
    assert api.retry_delay(1, 1e9, 0.5, 30, jitter) == api.MAX_RETRY_AFTER_S
    assert api.retry_delay(2, None, 0.5, 30, jitter) == 1.0


def test_token_shares_are_proportional_and_sum_exactly():
    assert api.split_tokens(100, [10, 30]) == [25, 75]
    assert sorted(api.split_tokens(10, [1, 1, 1])) == [3, 3, 4]
    assert sum(api.split_tokens(7, [0, 0])) == 7 and api.split_tokens(5, []) == []


def _requests(question_key, indices, messages=(("user", "q"),)):
    return [SampleRequest(question_key, messages, i) for i in indices]


def test_blocks_are_fixed_whatever_is_already_cached():
    blocks = api.plan_blocks(_requests("a", [5, 2, 3, 9]) + _requests("b", [0]), 4)
    assert [(b.question_key, b.start, b.size, [i for i, _ in b.wanted]) for b in blocks] == [
        ("a", 0, 4, [2, 3]), ("a", 4, 2, [5]), ("a", 8, 2, [9]), ("b", 0, 1, [0])]
    for size in range(1, 9):
        for missing in itertools.combinations(range(8), size):
            for block in api.plan_blocks(_requests("a", missing), 4):
                assert all(i // 4 * 4 == block.start for i, _ in block.wanted)
                assert block.size == block.wanted[-1][0] - block.start + 1


def test_settings_and_the_key_variable_are_checked(monkeypatch):
    monkeypatch.delenv("MCCKD_NO_SUCH_KEY", raising=False)
    with pytest.raises(api.TeacherError, match="MCCKD_NO_SUCH_KEY") as caught:
        api.ApiTeacher("http://127.0.0.1:9/v1", "m", api_key_env="MCCKD_NO_SUCH_KEY")
    assert "\n" not in str(caught.value)
    assert api.ApiTeacher("http://127.0.0.1:9/v1", "m", api_key_env="").model_id == "openai-api:m"
    for bad in (dict(samples_per_request=0), dict(samples_per_request="all"),
                dict(concurrency=0), dict(max_attempts=0), dict(prices=(1.0,)),
                dict(backoff_base_s=2.0, backoff_cap_s=1.0)):
        with pytest.raises(ValueError):
            api.ApiTeacher("http://127.0.0.1:9/v1", "m", api_key_env="", **bad)


# --------------------------------------------------------------------------------------------
# Against the proxy alone (no request reaches a server)
# --------------------------------------------------------------------------------------------


def _unused_upstream():
    from openai_server import free_port

    return f"http://127.0.0.1:{free_port()}/v1"


def _run(teacher, requests, params=PARAMS):
    samples, threads = {}, set()

    def on_sample(request, sample):
        samples[(request.question_key, request.sample_index)] = sample.text
        threads.add(threading.get_ident())

    teacher.generate(requests, params, on_sample)
    assert threads <= {threading.get_ident()}  # on_sample runs in the calling thread
    return samples


def test_a_refused_request_fails_at_once_naming_status_and_message():
    faults = {1: Fault("status", status=400, message="max_tokens is too large")}
    with FaultProxy(_unused_upstream(), faults) as proxy:
        teacher = api.ApiTeacher(proxy.base_url, "m", api_key_env="", max_attempts=5)
        with pytest.raises(api.TeacherError) as caught:
            _run(teacher, _requests("svamp:7", [0]))
    message = str(caught.value)
    assert "\n" not in message and "question svamp:7" in message
    assert "HTTP 400: max_tokens is too large" in message
    assert len(proxy.arrivals) == 1 and teacher.stats.failed_requests == 1
    assert teacher.stats.retries == 0


def test_a_persistent_fault_fails_after_max_attempts():
    faults = {k: Fault("500") for k in range(1, 10)}
    with FaultProxy(_unused_upstream(), faults) as proxy:
        teacher = api.ApiTeacher(proxy.base_url, "m", api_key_env="", max_attempts=3,
                                 **FAST_BACKOFF)
        with pytest.raises(api.TeacherError) as caught:
            _run(teacher, _requests("svamp:7", [0]))
    assert str(caught.value) == ("question svamp:7, samples 0-0: failed 3 times; last fault: "
                                 "HTTP 500: injected by the test proxy")
    assert len(proxy.arrivals) == 3 and teacher.stats.faults["server_error"] == 3
    assert teacher.stats.retries == 2 and teacher.stats.requests == 3


# --------------------------------------------------------------------------------------------
# Against the real server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama_server):
    return llama_server


@pytest.fixture(scope="module")
def svamp_requests(shared_data):
    """Zero-shot requests for samples 0-2 of two SVAMP test questions."""
    template = prompts.load_prompt("zero_shot", "svamp")
    questions = records.read_records(shared_data / "mcckd_format/SVAMP/test.json").records[:2]
    return [request for record in questions
            for request in _requests(record.uid, range(3), template.messages(record.question))]


@pytest.fixture(scope="module")
def reference(server, svamp_requests):
    """The fault-free samples: straight to the server, one sample per request."""
    teacher = api.ApiTeacher(server[0], server[1], api_key_env="", samples_per_request=1)
    return _run(teacher, svamp_requests)


@pytest.mark.slow
def test_every_fault_is_retried_and_the_samples_equal_a_clean_run(server, svamp_requests,
                                                                   reference):
    faults = {2: Fault("429", retry_after="1"), 3: Fault("500"), 4: Fault("stall", seconds=10),
              5: Fault("drop")}
    with FaultProxy(server[0], faults) as proxy:
        teacher = api.ApiTeacher(proxy.base_url, server[1], api_key_env="", concurrency=2,
                                 timeout_s=6, **FAST_BACKOFF)
        assert _run(teacher, svamp_requests) == reference
    assert len(set(reference.values())) > 1  # sampled, not greedy: the seeds matter
    assert teacher.stats.faults == {"rate_limit": 1, "server_error": 1, "timeout": 1,
                                    "connection": 1}
    assert teacher.stats.retries == 4 and teacher.stats.failed_requests == 0
    assert dict(proxy.injected) == {"429": 1, "500": 1, "stall": 1, "drop": 1}
    # "auto": the first request asked n=3 and got one choice, then one sample per request.
    assert teacher.honours_n is False and proxy.forwarded == 6
    assert teacher.stats.requests == len(proxy.arrivals) == 10
    assert teacher.stats.samples == 6 and teacher.stats.completion_tokens > 0
    # The seeds are base.sample_seed's: the probe's of its block start, then one per index.
    sent = [json.loads(arrival.body) for arrival in proxy.arrivals]
    assert {(r["seed"], r["n"]) for r in sent} == {
        (sample_seed(PARAMS, r.question_key, r.sample_index), 3 if r == svamp_requests[0] else 1)
        for r in svamp_requests}
    assert all((r["temperature"], r["top_p"], r["max_tokens"]) == (0.9, 0.95, 24) for r in sent)
    limited = next(a for a in proxy.arrivals if a.fault == "429")
    retried = next(a for a in proxy.arrivals
                   if a.number > limited.number and a.body_digest == limited.body_digest)
    assert retried.received - limited.answered >= 0.98  # Retry-After: 1, not the 0.05 s backoff


@pytest.mark.slow
def test_blocks_with_a_server_that_honours_n_are_reproducible(server, svamp_requests, reference):
    first = [r for r in svamp_requests if r.question_key == svamp_requests[0].question_key]
    with FaultProxy(server[0], expand_n=True) as proxy:
        teacher = api.ApiTeacher(proxy.base_url, server[1], api_key_env="",
                                 samples_per_request=3, prices=(1.0, 2.0))
        block = _run(teacher, first)
        assert teacher.stats.requests == 1 and proxy.upstream_requests == 3
        # Choice 0 of a block seeded like its first index is that index's own sample.
        key = (first[0].question_key, 0)
        assert block[key] == reference[key]
        # A resumed run that misses only sample 2 asks the same block again: the same sample.
        resumed = api.ApiTeacher(proxy.base_url, server[1], api_key_env="", samples_per_request=3)
        assert _run(resumed, first[2:]) == {k: v for k, v in block.items() if k[1] == 2}
        # "auto" learns from its first request that n is honoured: one request per question.
        auto = api.ApiTeacher(proxy.base_url, server[1], api_key_env="")
        _run(auto, svamp_requests)
        assert auto.honours_n is True and auto.stats.requests == 2
    single = api.ApiTeacher(server[0], server[1], api_key_env="", samples_per_request=1)
    _run(single, first[:1])
    stats = teacher.stats
    assert stats.prompt_tokens == single.stats.prompt_tokens > 0  # one prompt, counted once
    assert stats.completion_tokens > single.stats.completion_tokens
    assert stats.cost_usd == pytest.approx((stats.prompt_tokens + 2 * stats.completion_tokens) / 1e6)


@pytest.mark.slow
def test_the_api_key_reaches_the_server_and_nothing_else(server, svamp_requests, tmp_path,
                                                         monkeypatch, caplog):
    key = "sk-mcckd-test-" + os.urandom(12).hex()
    monkeypatch.setenv("MCCKD_TEST_API_KEY", key)
    caplog.set_level(logging.DEBUG)
    teacher_kwargs = dict(api_key_env="MCCKD_TEST_API_KEY", **FAST_BACKOFF)
    with FaultProxy(server[0], {2: Fault("429", retry_after="0")}) as proxy, \
            cache.SampleCache(tmp_path / "cache") as store:
        teacher = api.ApiTeacher(proxy.base_url, server[1], **teacher_kwargs)
        teacher.generate(svamp_requests[:2], PARAMS, lambda request, sample: store.append(
            cache.request_key(teacher.model_id, request, PARAMS), request, sample))
        assert len(store) == 2
    assert proxy.arrivals[0].headers["authorization"] == f"Bearer {key}"
    echo = {1: Fault("status", status=401, message="Incorrect API key: {authorization}")}
    with FaultProxy(server[0], echo) as proxy:
        refused = api.ApiTeacher(proxy.base_url, server[1], **teacher_kwargs)
        with pytest.raises(api.TeacherError) as caught:
            _run(refused, svamp_requests[:1])
    assert "HTTP 401: Incorrect API key: Bearer <api key>" in str(caught.value)
    error = caught.value
    assert error.__cause__ is None and error.__context__ is None  # no client exception chained
    texts = [str(error), repr(error), "".join(traceback.format_exception(error)),
             repr(teacher), repr(teacher.stats.as_dict())]
    texts += [record.getMessage() + str(record.exc_text) for record in caplog.records]
    texts += [path.read_bytes().decode("utf-8", "replace") for path in tmp_path.rglob("*")
              if path.is_file()]
    assert any(record.name.startswith("openai") for record in caplog.records)  # DEBUG was on
    assert not [text for text in texts if key in text]
