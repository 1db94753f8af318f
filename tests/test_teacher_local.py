"""The local teacher on a tiny random LLaMA saved as safetensors with the SmolLM2 tokenizer (its
ChatML chat template): greedy samples against transformers `generate` on the chat-templated
prompt; sampled ones the same on one device, on a (2,2,2) mesh, in any batch, order, batch
size or prompt bucket, and in two processes; counts and finish reasons; the checkpoint digest.
The real SmolLM2-135M-Instruct GGUF for one slow greedy comparison.

The tiny checkpoint is built here with a fixed torch seed (never downloaded). Its config lists a
second EOS id, a token that greedy decoding of the first question emits as its 4th token, so
that some samples stop and others are cut at max_tokens.
"""

import dataclasses
import json
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import data_testing
import hf_reference as ref
from cli_testing import environment
from mcckd_jax import sharding
from mcckd_jax.teacher import local
from mcckd_jax.data import batching
from mcckd_jax.data.tokenization import load_tokenizer
from mcckd_jax.teacher.base import Sample, SampleRequest, SamplingParams
from test_distributed import free_port, reports

SYSTEM = ("system", "You are a careful math tutor. Think step by step.")
QUESTIONS = {
    "q-short": "What is 3 + 4?",
    "q-mid": "Tom has 5 apples and buys 7 more. He gives 2 away. How many apples does he have?",
    "q-long": " ".join(["A train leaves the station at 9 am travelling at 60 miles per hour, and "
                        "a second train leaves two hours later at 80 miles per hour."] * 2)
              + " When does the second train catch up?",
}
BUCKETS = (64, 128)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=3)


def request(key, index=0):
    return SampleRequest(key, (SYSTEM, ("user", QUESTIONS[key])), index)


def collect(teacher, requests, params):
    """{(question key, sample index): Sample} and the keys in callback order."""
    got, order = {}, []

    def on_sample(req, sample):
        got[(req.question_key, req.sample_index)] = sample
        order.append((req.question_key, req.sample_index))

    teacher.generate(requests, params, on_sample)
    return got, order


def hf_chat_ids(tokenizer, req):
    """The prompt ids through transformers' own tokenizing chat template path."""
    messages = [{"role": role, "content": content} for role, content in req.messages]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, transformers model) of the tiny teacher with an extra EOS id in its config."""
    tokenizer = data_testing.smollm2_tokenizer()
    hf_model = ref.tiny_hf_llama(seed=0, vocab_size=len(tokenizer), initializer_range=0.3,
                                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    ids = hf_chat_ids(tokenizer, request("q-short"))
    with torch.no_grad():
        greedy = hf_model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                   eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    assert len(greedy) == 4 and greedy[3] not in greedy[:3] + [2]
    hf_model.config.eos_token_id = [2, greedy[3]]
    hf_model.generation_config.eos_token_id = [2, greedy[3]]
    folder = tmp_path_factory.mktemp("tiny_teacher")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, hf_model


@pytest.fixture(scope="module")
def one_device():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def requests():
    """Three samples of each question, their prompts in both buckets."""
    return [request(key, index) for key in QUESTIONS for index in range(3)]


@pytest.fixture(scope="module")
def reference(checkpoint, one_device, requests):
    """Samples of every request on one device, three rows a batch."""
    teacher = local.LocalTeacher(checkpoint[0], mesh=one_device, batch_size=3,
                                 prompt_buckets=BUCKETS)
    lengths = {len(teacher.encode(r.messages)) for r in requests}
    assert min(lengths) <= BUCKETS[0] < max(lengths) <= BUCKETS[1]  # both buckets are used
    return collect(teacher, requests, SAMPLED)[0]


def test_greedy_samples_equal_transformers_generate(checkpoint, mesh):
    folder, hf_model = checkpoint
    teacher = local.LocalTeacher(folder, mesh=mesh, batch_size=4, prompt_buckets=BUCKETS)
    tokenizer = data_testing.smollm2_tokenizer()
    assert teacher.eos_token_ids == tuple(sorted(hf_model.config.eos_token_id))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    got, _ = collect(teacher, [request(key) for key in QUESTIONS], params)
    stops = 0
    for key in QUESTIONS:
        ids = hf_chat_ids(tokenizer, request(key))
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=list(teacher.eos_token_ids),
                                    pad_token_id=2)[0, len(ids):].tolist()
        stopped = out[-1] in teacher.eos_token_ids
        expected = tokenizer.decode(out[:-1] if stopped else out, skip_special_tokens=True)
        assert got[(key, 0)] == Sample(text=expected, prompt_tokens=len(ids),
                                             completion_tokens=len(out),
                                             finish_reason="stop" if stopped else "length")
        stops += stopped
    assert got[("q-short", 0)].completion_tokens == 4 and stops < len(QUESTIONS)  # both kinds


def test_finish_reasons_and_counts(checkpoint, one_device):
    teacher = local.LocalTeacher(checkpoint[0], mesh=one_device, batch_size=2,
                                 prompt_buckets=BUCKETS)
    short = request("q-short")
    prompt_tokens = len(hf_chat_ids(data_testing.smollm2_tokenizer(), short))
    # Greedy, the 4th token is an EOS: a cut at 3 tokens is "length", at 4 or more "stop".
    for max_tokens, expected in ((3, (3, "length")), (4, (4, "stop")), (9, (4, "stop"))):
        got, _ = collect(teacher, [short], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        sample = got[("q-short", 0)]
        assert (sample.completion_tokens, sample.finish_reason) == expected
        assert sample.prompt_tokens == prompt_tokens
        assert sample.text.strip() and "<|im_end|>" not in sample.text
    cut, _ = collect(teacher, [short], SamplingParams(temperature=0.0, max_tokens=3))
    stop, _ = collect(teacher, [short], SamplingParams(temperature=0.0, max_tokens=4))
    assert cut[("q-short", 0)].text == stop[("q-short", 0)].text  # the EOS adds no text


def test_the_same_seed_gives_the_same_samples_on_one_device_and_on_a_mesh(
        checkpoint, mesh, requests, reference):
    teacher = local.LocalTeacher(checkpoint[0], mesh=mesh, batch_size=4, prompt_buckets=BUCKETS)
    sharded, order = collect(teacher, requests, SAMPLED)
    assert sharded == reference
    bucket = {key: batching.bucket_for(len(teacher.encode(request(key).messages)), BUCKETS)
              for key in QUESTIONS}
    assert order == sorted(reference, key=lambda k: (bucket[k[0]], k))  # canonical, by bucket
    other_seed, _ = collect(teacher, requests, dataclasses.replace(SAMPLED, seed=4))
    assert sum(other_seed[k].text != reference[k].text for k in reference) >= len(reference) - 1


def test_a_sample_does_not_depend_on_its_batch_order_size_or_bucket(
        checkpoint, one_device, requests, reference):
    shuffled = list(requests)
    random.Random(0).shuffle(shuffled)
    for batch_size, buckets, subset in ((5, BUCKETS, shuffled), (1, BUCKETS, shuffled[:2]),
                                        (2, (256,), shuffled[3:6])):
        teacher = local.LocalTeacher(checkpoint[0], mesh=one_device, batch_size=batch_size,
                                     prompt_buckets=buckets)
        got, _ = collect(teacher, subset, SAMPLED)
        assert got == {k: reference[k] for k in got} and len(got) == len(subset)


def test_sample_indices_differ_when_sampling_and_not_when_greedy(checkpoint, one_device, reference):
    for key in QUESTIONS:
        texts = {reference[(key, index)].text for index in range(3)}
        assert len(texts) == 3
    teacher = local.LocalTeacher(checkpoint[0], mesh=one_device, batch_size=3,
                                 prompt_buckets=BUCKETS)
    greedy, _ = collect(teacher, [request("q-mid", i) for i in range(3)],
                        SamplingParams(temperature=0.0, max_tokens=10))
    assert len({sample for sample in greedy.values()}) == 1


CHILD = """
import json, sys
from mcckd_jax import distributed, sharding
distributed.initialize_from_environment()
from mcckd_jax.teacher import local
from mcckd_jax.teacher.base import SampleRequest, SamplingParams
spec = json.loads(open(sys.argv[1]).read())
mesh = sharding.make_mesh((2, 1, 1), across_hosts=(2, 1, 1))
teacher = local.LocalTeacher(spec["checkpoint"], mesh=mesh, batch_size=2,
                             prompt_buckets=tuple(spec["buckets"]))
requests = [SampleRequest(k, tuple(map(tuple, m)), i) for k, m, i in spec["requests"]]
got = []
teacher.generate(requests, SamplingParams(**spec["params"]),
                 lambda r, s: got.append([r.question_key, r.sample_index, s.text,
                                          s.prompt_tokens, s.completion_tokens, s.finish_reason]))
print("REPORT " + json.dumps(got), flush=True)
"""


@pytest.mark.slow
def test_two_processes_give_the_samples_of_one(checkpoint, requests, reference, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "checkpoint": str(checkpoint[0]), "buckets": BUCKETS,
        "requests": [[r.question_key, r.messages, r.sample_index] for r in requests[::-1]],
        "params": dataclasses.asdict(SAMPLED)}))
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spec)],
        env=environment(devices=2, MCCKD_NUM_PROCESSES="2", MCCKD_PROCESS_ID=str(i),
                        MCCKD_COORDINATOR=f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    (first, _), (second, _) = reports(processes, timeout=300)
    assert first == second  # every process sees every sample, in the same order
    assert {(k, i): Sample(*rest) for k, i, *rest in first} == reference
    assert len(first) == len(reference)


def test_the_model_id_is_the_path_and_a_content_digest(checkpoint, one_device, tmp_path):
    folder = checkpoint[0]
    files = {f.name for f in local.checkpoint_files(folder)}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    digest = local.checkpoint_digest(folder)
    assert local.checkpoint_digest(copy) == digest  # content, not path or modification time
    with open(copy / "model.safetensors", "r+b") as handle:  # one weight byte
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-3, 2)
        handle.write(bytes([byte[0] ^ 1]))
    assert local.checkpoint_digest(copy) != digest
    shutil.copy(folder / "model.safetensors", copy / "model.safetensors")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert local.checkpoint_digest(copy) != digest
    # The chat template in use counts too (a tokenizer given apart from the checkpoint).
    tokenizer = load_tokenizer(folder)
    with_template = local.checkpoint_digest(folder, tokenizer=tokenizer)
    tokenizer.chat_template += " "
    assert with_template != digest != local.checkpoint_digest(folder, tokenizer=tokenizer)
    teacher = local.LocalTeacher(folder, mesh=one_device, batch_size=1, prompt_buckets=BUCKETS)
    assert teacher.model_id == f"{folder}@sha256:{with_template}"


def test_refusals(checkpoint, one_device):
    plain = load_tokenizer(checkpoint[0])
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        local.LocalTeacher(checkpoint[0], mesh=one_device, tokenizer=plain)
    with pytest.raises(ValueError, match="batch size"):
        local.LocalTeacher(checkpoint[0], mesh=sharding.make_mesh((2, 2, 2)), batch_size=2)
    teacher = local.LocalTeacher(checkpoint[0], mesh=one_device, batch_size=1, prompt_buckets=(32,))
    with pytest.raises(ValueError, match="q-long.*largest prompt bucket 32"):
        teacher.generate([request("q-long")], SAMPLED, lambda *_: None)


def test_planned_batches_are_canonical_bucketed_and_full():
    items = [local._Encoded(SampleRequest(key, (), index), (0,) * length)
             for key, length in (("b", 3), ("a", 10), ("c", 2)) for index in (1, 0)]
    plan = local.plan_batches(items[::-1], rows=3, buckets=(4, 16))
    keys = [(bucket, [(e.request.question_key, e.request.sample_index) for e in batch])
            for bucket, batch in plan]
    assert keys == [(4, [("b", 0), ("b", 1), ("c", 0)]), (4, [("c", 1)]),
                    (16, [("a", 0), ("a", 1)])]
    prompt_BL, mask_BL = local.left_padded([[5, 6], [7]], 3, pad_id=9)
    np.testing.assert_array_equal(prompt_BL, [[9, 5, 6], [9, 9, 7]])
    np.testing.assert_array_equal(mask_BL, [[0, 1, 1], [0, 0, 1]])


@pytest.mark.slow
def test_smollm2_gguf_greedy_samples_equal_transformers_generate(one_device):
    hf_model, tokenizer = ref.smollm2_hf()
    teacher = local.LocalTeacher(ref.smollm2_folder(), gguf_file=ref.SMOLLM2_GGUF,
                                 mesh=one_device, batch_size=2, prompt_buckets=BUCKETS)
    assert teacher.model_id.startswith(str(ref.smollm2_folder() / ref.SMOLLM2_GGUF) + "@sha256:")
    params = SamplingParams(temperature=0.0, max_tokens=24)
    chosen = [request("q-short"), request("q-mid")]
    got, _ = collect(teacher, chosen, params)
    for req in chosen:
        ids = hf_chat_ids(tokenizer, req)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=list(teacher.eos_token_ids),
                                    pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        stopped = out[-1] in teacher.eos_token_ids
        sample = got[(req.question_key, 0)]
        assert sample.text == tokenizer.decode(out[:-1] if stopped else out,
                                               skip_special_tokens=True)
        assert (sample.prompt_tokens, sample.completion_tokens) == (len(ids), len(out))
        assert len(sample.text) > 20  # a real answer, not an empty one
