"""Real weights: SmolLM2-135M-Instruct (GGUF) against transformers on real GSM8K prompts."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from mcckd_jax import sharding
from mcckd_jax.eval.decoding import greedy_generate
from mcckd_jax.models import pretrained


@pytest.fixture(scope="module")
def smollm2(shared_data):
    hf_model, tokenizer = ref.smollm2_hf()
    mesh = sharding.make_mesh((-1, 1, 1))
    model = pretrained.load_pretrained(ref.smollm2_folder(), mesh=mesh, gguf_file=ref.SMOLLM2_GGUF)
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()
    # Prompts of different lengths: the first few test questions and a long one.
    questions = [json.loads(lines[i])["question"] for i in (0, 1, 2, 5)]
    return hf_model, tokenizer, model, mesh, questions


@pytest.mark.slow
def test_logits_on_gsm8k_prompts_match_transformers(smollm2):
    hf_model, tokenizer, model, mesh, questions = smollm2
    tokenizer.padding_side = "right"
    encoded = tokenizer(questions, return_tensors="np", padding=True)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    with sharding.activate(mesh):
        ours = np.asarray(model.logits(model(jnp.asarray(encoded["input_ids"]),
                                             attention_mask_BL=jnp.asarray(encoded["attention_mask"]))))
    expected = ref.hf_logits(hf_model, encoded["input_ids"], encoded["attention_mask"])
    valid = encoded["attention_mask"].astype(bool)
    assert len(set(valid.sum(1))) == len(questions)  # really different lengths
    assert np.abs(ours - expected)[valid].max() < 1e-3


@pytest.mark.slow
def test_greedy_decoding_with_the_cache_equals_transformers_generate(smollm2):
    hf_model, tokenizer, model, mesh, questions = smollm2
    tokenizer.padding_side = "left"
    encoded = tokenizer(questions, return_tensors="np", padding=True)
    with torch.no_grad():
        expected = hf_model.generate(
            input_ids=torch.tensor(encoded["input_ids"]),
            attention_mask=torch.tensor(encoded["attention_mask"]), max_new_tokens=32,
            do_sample=False, pad_token_id=tokenizer.pad_token_id).numpy()
    expected = expected[:, encoded["input_ids"].shape[1]:]
    with sharding.activate(mesh):
        ours = np.asarray(greedy_generate(
            model, jnp.asarray(encoded["input_ids"]), jnp.asarray(encoded["attention_mask"]),
            max_new_tokens=32, eos_token_ids=(tokenizer.eos_token_id,),
            pad_token_id=tokenizer.pad_token_id))
    assert expected.shape == (len(questions), 32)
    np.testing.assert_array_equal(ours, expected)
