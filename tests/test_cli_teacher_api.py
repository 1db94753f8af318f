"""mcckd-teacher as a command against a real OpenAI-compatible server (llama-cpp-python's,
serving SmolLM2-135M-Instruct on loopback) through the counting proxy of tests/fault_proxy.py:

- killed with SIGKILL in the middle of a run and started again, it sends no request whose
  answer it already had (the proxy's record of both runs), asks again for the one that was in
  flight, and writes the uninterrupted run's output byte for byte;
- the API key, given in the environment, reaches the server with every request and appears in
  no file the runs write and in no line they print, with the progress bar on and at DEBUG log
  level (the openai client's and httpx's own loggers included).

A request is identified at the proxy by what defines its sample: the question's prompt and the
seed (sample_seed of the sample index; an n-sample probe carries its first index's seed).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_testing import environment
from fault_proxy import Fault, FaultProxy

NUM_QUESTIONS = 4
NUM_SAMPLES = 2
KILL_AT = 5  # the request the proxy holds while the first run is killed
KEY_ENV = "TEACHER_TEST_KEY"


def teacher_command(questions, output, proxy, model, *extra):
    return [sys.executable, "-m", "mcckd_jax.cli.teacher", str(questions), "--task", "svamp",
            "--output", str(output), "--base_url", proxy.base_url, "--model", model,
            "--api_key_env", KEY_ENV, "--num_samples", str(NUM_SAMPLES), "--max_tokens", "24",
            "--temperature", "0.9", "--seed", "5", "--concurrency", "1", *extra]


def sample_identity(arrival) -> tuple[str, int]:
    body = json.loads(arrival.body)
    return body["messages"][-1]["content"], body["seed"]


def finish(cmd, env) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.fixture
def questions(shared_data, tmp_path):
    rows = json.loads((shared_data / "mcckd_format/SVAMP/test.json").read_text())
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(rows[:NUM_QUESTIONS]))
    return path


@pytest.mark.slow
def test_a_killed_run_resumes_without_repeating_a_request_and_the_key_stays_secret(
        llama_server, questions, tmp_path):
    base_url, model = llama_server
    key = "sk-mcckd-cli-" + os.urandom(12).hex()
    env = environment(devices=1, **{KEY_ENV: key})
    printed = []

    with FaultProxy(base_url) as clean:
        done = finish(teacher_command(questions, tmp_path / "clean.json", clean, model,
                                      "--no_progress_bar"), env)
        printed += [done.stdout, done.stderr]
    expected = (tmp_path / "clean.json").read_bytes()
    wanted = {sample_identity(a) for a in clean.arrivals}
    assert len(wanted) == NUM_QUESTIONS * NUM_SAMPLES and clean.forwarded == len(clean.arrivals)

    output = tmp_path / "resumed.json"
    with FaultProxy(base_url, {KILL_AT: Fault("stall", seconds=300)}) as proxy:
        first_run = subprocess.Popen(teacher_command(questions, output, proxy, model,
                                                     "--log_level", "INFO"),
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 300
        while len(proxy.arrivals) < KILL_AT:
            assert first_run.poll() is None, first_run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never reached the held request"
            time.sleep(0.05)
        first_run.send_signal(signal.SIGKILL)
        printed += list(first_run.communicate(timeout=60))
        assert first_run.returncode == -signal.SIGKILL
        assert not output.exists()  # nothing written before the end
        before = list(proxy.arrivals)

        done = finish(teacher_command(questions, output, proxy, model, "--log_level", "DEBUG"),
                      env)
        printed += [done.stdout, done.stderr]
        after = proxy.arrivals[len(before):]

    answered = {sample_identity(a) for a in before if a.fault is None}
    asked_again = [sample_identity(a) for a in after]
    assert len(answered) == KILL_AT - 1 and before[-1].fault == "stall"
    assert not answered & set(asked_again)  # nothing the cache held was asked again
    assert len(asked_again) == len(set(asked_again)) == len(wanted) - len(answered)
    assert sample_identity(before[-1]) in asked_again  # the request cut short by the kill
    assert answered | set(asked_again) == wanted
    assert output.read_bytes() == expected
    report = json.loads((tmp_path / "resumed.json.report.json").read_text())
    assert (report["samples_from_cache"], report["samples_new"]) == (KILL_AT - 1,
                                                                     len(asked_again))

    # The key: sent with every request, written and printed nowhere.
    arrivals = clean.arrivals + proxy.arrivals
    assert {a.headers["authorization"] for a in arrivals} == {f"Bearer {key}"}
    assert "openai._base_client" in done.stderr  # DEBUG reached the client's loggers
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) >= 5  # the outputs, reports and caches of both runs, the questions
    assert not [path for path in written if key.encode() in path.read_bytes()]
    assert not [text for text in printed if key in text]
