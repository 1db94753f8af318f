"""The durable sample cache: round trip, fsync before append returns, a torn last line ignored
and repaired, a damaged middle line refused, one process per folder, and keys that change with
everything that determines a sample.

Independent reference: the key of one sample recomputed here from the documented canonical JSON
(a change of scheme would silently orphan every existing cache, so it must be deliberate).
"""

import dataclasses
import hashlib
import json
import os

import pytest

from mcckd_jax.teacher import cache
from mcckd_jax.teacher.base import Sample, SampleRequest, SamplingParams

PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=256, seed=3)
MESSAGES = (("system", "Solve it."), ("user", "Question: 2 + 3?"))


def _sample(i):
    return Sample(text=f"2 + 3 = 5, sample {i} \u2713.\nTherefore, the answer is 5.",
                  prompt_tokens=17, completion_tokens=9 + i,
                  finish_reason="stop" if i % 2 else "length")


def _request(i, question="svamp_test.json:4"):
    return SampleRequest(question_key=question, messages=MESSAGES, sample_index=i)


def _fill(folder, count):
    keys = []
    with cache.SampleCache(folder) as store:
        for i in range(count):
            key = cache.request_key("openai-api:m", _request(i), PARAMS)
            store.append(key, _request(i), _sample(i))
            keys.append(key)
    return keys


def test_round_trip(tmp_path):
    keys = _fill(tmp_path, 3)
    with cache.SampleCache(tmp_path) as store:
        assert len(store) == 3
        assert [store.get(key) for key in keys] == [_sample(i) for i in range(3)]
        assert store.get("0" * 64) is None
    lines = (tmp_path / cache.CACHE_FILE).read_text().splitlines()
    assert [json.loads(line)["sample_index"] for line in lines] == [0, 1, 2]


def test_a_stored_key_keeps_its_first_sample(tmp_path):
    keys = _fill(tmp_path, 1)
    with cache.SampleCache(tmp_path) as store:
        store.append(keys[0], _request(0), _sample(5))
        assert store.get(keys[0]) == _sample(0)
    assert len((tmp_path / cache.CACHE_FILE).read_text().splitlines()) == 1


def test_append_fsyncs_the_line_before_returning(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        real_fsync(descriptor)
        synced.append(os.fstat(descriptor).st_size)

    with cache.SampleCache(tmp_path) as store:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        store.append("k" * 64, _request(0), _sample(0))
        size = (tmp_path / cache.CACHE_FILE).stat().st_size
        assert synced == [size] and size > 0  # synced once, with the whole line in the file


@pytest.mark.parametrize("cut", ["mid_line", "before_newline"])
def test_torn_last_line_is_ignored_and_the_run_appends_after_it(tmp_path, cut):
    keys = _fill(tmp_path, 3)
    path = tmp_path / cache.CACHE_FILE
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    # A kill -9 in the middle of the third line's write, or just before its newline.
    torn = last_start + 25 if cut == "mid_line" else len(data) - 1
    path.write_bytes(data[:torn])
    with cache.SampleCache(tmp_path) as store:
        assert len(store) == 2 and store.get(keys[2]) is None
        store.append(keys[2], _request(2), _sample(2))
    assert path.read_bytes() == data  # the torn tail was cut off, not left mid-file
    with cache.SampleCache(tmp_path) as store:
        assert [store.get(key) for key in keys] == [_sample(i) for i in range(3)]


@pytest.mark.parametrize("damage,says", [
    (lambda line: b"#" + line[1:], "line 2: malformed JSON"),
    (lambda line: line.replace(b'"sample_index": 1', b'"sample_index": "1"'),
     "line 2, field 'sample_index': expected int, got str"),
    (lambda line: b"[1, 2]\n", "line 2: expected an object"),
    (lambda line: line[:5] + b"\xff" + line[6:], "line 2: not valid UTF-8"),
])
def test_damaged_middle_line_is_a_one_line_error(tmp_path, damage, says):
    _fill(tmp_path, 3)
    path = tmp_path / cache.CACHE_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = damage(lines[1])
    path.write_bytes(b"".join(lines))
    with pytest.raises(cache.CacheError) as caught:
        cache.SampleCache(tmp_path)
    assert str(caught.value).startswith(f"{path}, {says}")
    assert "\n" not in str(caught.value)


def test_one_process_per_cache_folder(tmp_path):
    with cache.SampleCache(tmp_path):
        with pytest.raises(cache.CacheError, match="in use by another process"):
            cache.SampleCache(tmp_path)
    with cache.SampleCache(tmp_path) as store:  # released on close
        assert len(store) == 0


def test_key_is_sha256_of_the_documented_canonical_json():
    expected = hashlib.sha256(
        ('{"messages":[["system","Solve it."],["user","Question: 2 + 3?"]],'
         '"model_id":"openai-api:m","question_key":"svamp_test.json:4","sample_index":1,'
         '"sampling":{"max_tokens":256,"seed":3,"temperature":0.7,"top_p":0.95},'
         '"scheme":1}').encode()).hexdigest()
    assert cache.cache_key("openai-api:m", MESSAGES, PARAMS, "svamp_test.json:4", 1) == expected
    assert cache.request_key("openai-api:m", _request(1), PARAMS) == expected


def test_keys_differ_when_anything_that_determines_the_sample_differs():
    base = dict(model_id="openai-api:m", messages=MESSAGES, params=PARAMS,
                question_key="svamp_test.json:4", sample_index=1)
    variants = [dict(base, model_id="openai-api:m2"),
                dict(base, messages=MESSAGES[:1] + (("user", "Question: 2 + 4?"),)),
                dict(base, messages=(("user", "Solve it."), MESSAGES[1])),
                dict(base, question_key="svamp_test.json:5"),
                dict(base, sample_index=2)]
    variants += [dict(base, params=dataclasses.replace(PARAMS, **{field: value}))
                 for field, value in (("temperature", 0.8), ("top_p", 0.9),
                                      ("max_tokens", 257), ("seed", 4))]
    keys = [cache.cache_key(**kwargs) for kwargs in [base] + variants]
    assert len(set(keys)) == len(keys)
    assert cache.cache_key(**base) == cache.cache_key(**dict(base, params=SamplingParams(
        temperature=0.7, top_p=0.95, max_tokens=256, seed=3)))


def test_the_file_never_holds_an_environment_secret(tmp_path, monkeypatch):
    secret = "sk-mcckd-cache-" + os.urandom(8).hex()
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    _fill(tmp_path, 2)
    assert secret.encode() not in (tmp_path / cache.CACHE_FILE).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.CACHE_FILE]


def test_a_read_only_cache_sees_the_writers_lines_and_writes_nothing(tmp_path):
    keys = _fill(tmp_path, 2)
    path = tmp_path / cache.CACHE_FILE
    with path.open("ab") as handle:
        handle.write(b'{"key": "torn')  # a write in progress: not a complete line
    before = path.read_bytes()
    with cache.SampleCache(tmp_path) as writer:  # holds the lock; cuts the torn tail
        reader = cache.SampleCache(tmp_path, read_only=True)  # no lock needed
        assert [reader.get(key) for key in keys] == [_sample(0), _sample(1)]
        new_key = cache.request_key("openai-api:m", _request(2), PARAMS)
        reader.append(new_key, _request(2), _sample(2))
        assert reader.get(new_key) == _sample(2) and writer.get(new_key) is None
    assert path.read_bytes() == before[:before.rfind(b"\n") + 1]
    assert cache.SampleCache(tmp_path, read_only=True).get(new_key) is None
