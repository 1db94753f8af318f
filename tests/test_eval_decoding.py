"""Decoding against transformers `generate`: tiny random LLaMA and T5, and SmolLM2-135M-Instruct
(GGUF, slow) on real GSM8K prompts; sampling against float64 NumPy; sharded against one device.

Tiny references are built here with a fixed torch seed (never downloaded) and loaded into our
models through `hf_import.load_named_tensors`.

Shape legend: B batch, L prompt length, N new tokens, V vocabulary.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_reference as ref
from mcckd_jax import sharding
from mcckd_jax.eval import decoding
from mcckd_jax.eval.decoding import (SamplingConfig, generate, generate_with_step_count,
                                     greedy_generate)
from mcckd_jax.models import decoder, hf_import, llama, pretrained, t5

PAD = 0


def left_padded_prompts(seed, vocab, lengths, width):
    """Random prompts [B, L] (tokens >= 3) left-padded with PAD, and their mask."""
    rng = np.random.default_rng(seed)
    mask_BL = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        mask_BL[row, width - length:] = 1
    return (rng.integers(3, vocab, mask_BL.shape) * mask_BL).astype(np.int32), mask_BL


def hf_generate(hf_model, prompt_BL, mask_BL, num_new, eos_token_id, pad_token_id=PAD,
                use_cache=True):
    """transformers' greedy continuation; its width is < num_new when every row stopped."""
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(prompt_BL).long(),
                                attention_mask=torch.tensor(mask_BL).long(),
                                max_new_tokens=num_new, do_sample=False, use_cache=use_cache,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id).numpy()
    return out


def assert_equal_to_reference(ours_BN, steps, reference_BN, pad_token_id=PAD):
    """Ours equals transformers' tokens, holds pads where transformers stopped, and ran exactly
    as many decoding steps as transformers (which stops when every row has emitted EOS)."""
    width = reference_BN.shape[1]
    np.testing.assert_array_equal(ours_BN[:, :width], reference_BN)
    assert (ours_BN[:, width:] == pad_token_id).all()
    assert int(steps) == width - 1


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def tiny_llama(mesh):
    hf_model = ref.tiny_hf_llama(seed=0)
    return hf_model, ref.load_into_ours(hf_model, mesh)


def test_llama_greedy_equals_transformers_generate_and_stops_at_eos(tiny_llama, mesh):
    hf_model, model = tiny_llama
    prompt_BL, mask_BL = left_padded_prompts(0, 96, lengths=(9, 4, 12, 1), width=12)
    num_new = 16
    # An EOS that row 0 emits as its 4th token; whether the others stop, and when, is
    # transformers' to say.
    unstopped = hf_generate(hf_model, prompt_BL, mask_BL, num_new, eos_token_id=95)[:, 12:]
    eos = int(unstopped[0, 3])
    expected = hf_generate(hf_model, prompt_BL, mask_BL, num_new, eos_token_id=eos)[:, 12:]
    with sharding.activate(mesh):
        ours, steps = generate_with_step_count(
            model, prompt_BL, mask_BL, sampling=SamplingConfig(max_new_tokens=num_new),
            eos_token_ids=(eos,), pad_token_id=PAD)
    assert (np.asarray(ours)[0, 4:] == PAD).all()  # the case is not trivial: row 0 stopped
    assert_equal_to_reference(np.asarray(ours), steps, expected)


def test_decoding_stops_when_every_row_has_emitted_eos(tiny_llama, mesh):
    _, model = tiny_llama
    prompt_BL, mask_BL = left_padded_prompts(1, 96, lengths=(5, 7), width=7)
    sampling = SamplingConfig(max_new_tokens=24)
    with sharding.activate(mesh):
        free, free_steps = generate_with_step_count(model, prompt_BL, mask_BL, sampling=sampling,
                                                    eos_token_ids=(), pad_token_id=PAD)
        # Every token is an EOS: each row stops at its first token, so no step runs.
        stopped, stopped_steps = generate_with_step_count(
            model, prompt_BL, mask_BL, sampling=sampling, eos_token_ids=tuple(range(96)),
            pad_token_id=PAD)
    assert int(free_steps) == 23 and int(stopped_steps) == 0
    np.testing.assert_array_equal(np.asarray(stopped)[:, 0], np.asarray(free)[:, 0])
    assert (np.asarray(stopped)[:, 1:] == PAD).all()


def _tiny_hf_t5(tied, feed_forward_proj):
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, dropout_rate=0.0,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:
        # transformers >= 5 ties lm_head to `shared` at construction; give it its own head
        # (as test_models_t5 does) so that an untied head is really exercised.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(128, 32))
    return model


def _load_t5(hf_model, mesh):
    config = t5.T5Config.from_hf(hf_model.config)
    tensors = ((name, value.detach().numpy()) for name, value in hf_model.state_dict().items())
    return hf_import.load_named_tensors(
        lambda: t5.T5Model(config, rngs=nnx.Rngs(0)), tensors, mesh=mesh,
        hf_prefix=t5.T5Model.HF_PREFIX, hf_unprefixed=t5.T5Model.HF_UNPREFIXED,
        ignored_names=functools.partial(t5.hf_ignored, config))


@pytest.mark.parametrize("tied, feed_forward_proj", [(False, "gated-gelu"), (True, "relu")])
def test_t5_greedy_equals_transformers_generate(tied, feed_forward_proj, mesh):
    hf_model = _tiny_hf_t5(tied, feed_forward_proj)
    model = _load_t5(hf_model, mesh)
    # Encoder inputs right-padded, as the eval batches hold them, and one left-padded row.
    prompt_BL, mask_BL = left_padded_prompts(2, 128, lengths=(10, 3, 7, 10), width=10)
    prompt_BL[:3], mask_BL[:3] = prompt_BL[:3, ::-1], mask_BL[:3, ::-1]
    num_new = 20
    # transformers' encoder-decoder cache has num_layers (2), not num_decoder_layers (3),
    # entries and fails; without the cache it recomputes every step, a reference that shares
    # nothing with our cached decoding.
    reference = functools.partial(hf_generate, hf_model, prompt_BL, mask_BL, num_new,
                                  use_cache=False)
    # The first new token of row 1 as EOS, so that rows stop at different steps.
    eos = int(reference(eos_token_id=127)[1, 1])
    expected = reference(eos_token_id=eos)[:, 1:]
    with sharding.activate(mesh):
        ours, steps = generate_with_step_count(
            model, prompt_BL, mask_BL, sampling=SamplingConfig(max_new_tokens=num_new),
            eos_token_ids=(eos,), pad_token_id=PAD)
    assert (np.asarray(ours)[1, 1:] == PAD).all()
    assert_equal_to_reference(np.asarray(ours), steps, expected)


def _nucleus_probabilities(logits_V, temperature, top_p):
    """float64 softmax(logits / T) restricted to the top-p nucleus and renormalised, and the
    distance of the nucleus edge from top_p (how much rounding it takes to move a token in or
    out)."""
    scaled = np.asarray(logits_V, np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = order[mass_before < top_p]
    nucleus = np.zeros_like(probs)
    nucleus[kept] = probs[kept] / probs[kept].sum()
    return nucleus, np.abs(mass_before - top_p).min()


def test_greedy_tokens_equal_numpy_argmax_with_ties_nans_and_infinities():
    rng = np.random.default_rng(3)
    logits_BV = rng.standard_normal((8, 1000)).astype(np.float32)
    logits_BV[1, [10, 20]] = 50.0  # a tie: the first index wins
    logits_BV[2, [30, 40]] = np.nan  # the first NaN wins, as in argmax
    logits_BV[2, 5] = np.inf
    logits_BV[3] = -np.inf  # nothing finite: index 0
    logits_BV[4, 999] = np.inf
    logits_BV[5, [0, 999]] = 60.0
    tokens_B = decoding.greedy_tokens(jnp.asarray(logits_BV))
    assert tokens_B.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens_B), np.argmax(logits_BV, axis=-1))
    assert np.asarray(tokens_B)[:6].tolist() == [np.argmax(logits_BV[0]), 10, 30, 0, 999, 0]


def test_sampled_first_tokens_follow_the_tempered_nucleus(mesh):
    temperature, top_p, rows = 0.7, 0.8, 8192
    with sharding.activate(mesh):
        # A large initialiser so that the next-token distribution is far from uniform.
        model = decoder.DecoderModel(llama.tiny(initializer_range=0.3), rngs=nnx.Rngs(3))
        prompts_2L, masks_2L = left_padded_prompts(3, 128, lengths=(6, 3), width=6)
        logits_2V = np.asarray(model.logits(model(jnp.asarray(prompts_2L), positions_BL=jnp.asarray(
            np.maximum(np.cumsum(masks_2L, 1) - 1, 0)), attention_mask_BL=jnp.asarray(masks_2L))))
        tokens_B1 = generate(model, np.repeat(prompts_2L, rows, 0), np.repeat(masks_2L, rows, 0),
                             sampling=SamplingConfig(temperature, top_p, max_new_tokens=1),
                             eos_token_ids=(), pad_token_id=PAD, rng=jax.random.key(7))
    tokens_2R = np.asarray(tokens_B1).reshape(2, rows)
    for logits_V, tokens_R in zip(logits_2V[:, -1], tokens_2R):
        nucleus_V, edge_margin = _nucleus_probabilities(logits_V, temperature, top_p)
        kept = nucleus_V > 0
        assert 4 <= kept.sum() <= 64 and edge_margin > 1e-4  # a non-trivial, well-defined case
        counts_V = np.bincount(tokens_R, minlength=128)
        assert counts_V[~kept].sum() == 0
        # Pearson chi-square over the nucleus; the second check shows the test has the power
        # to reject a sampler that ignored the temperature.
        assert scipy.stats.chisquare(counts_V[kept], rows * nucleus_V[kept]).pvalue > 1e-3
        untempered_V, _ = _nucleus_probabilities(logits_V, 1.0, top_p)
        untempered_V = np.where(kept, untempered_V, 0)
        untempered_V[kept] += 1e-12
        untempered_V /= untempered_V.sum()
        assert scipy.stats.chisquare(counts_V[kept], rows * untempered_V[kept]).pvalue < 1e-6


def test_sampling_is_reproducible_and_a_vanishing_nucleus_is_greedy(tiny_llama, mesh):
    _, model = tiny_llama
    prompt_BL, mask_BL = left_padded_prompts(4, 96, lengths=(8, 5, 2, 8), width=8)
    run = functools.partial(generate, model, prompt_BL, mask_BL, eos_token_ids=(),
                            pad_token_id=PAD)
    sampled = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12)
    with sharding.activate(mesh):
        first = np.asarray(run(sampling=sampled, rng=jax.random.key(0)))
        again = np.asarray(run(sampling=sampled, rng=jax.random.key(0)))
        other = np.asarray(run(sampling=sampled, rng=jax.random.key(1)))
        greedy = np.asarray(run(sampling=SamplingConfig(max_new_tokens=12)))
        narrow = np.asarray(run(sampling=SamplingConfig(1.0, 1e-6, 12), rng=jax.random.key(2)))
        zero = np.asarray(run(sampling=SamplingConfig(1.0, 0.0, 12), rng=jax.random.key(3)))
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.5 and (first != greedy).mean() > 0.5
    np.testing.assert_array_equal(narrow, greedy)
    np.testing.assert_array_equal(zero, greedy)
    with pytest.raises(ValueError, match="rng"):
        run(sampling=sampled)


def test_sharded_decoding_equals_one_device():
    hf_model = ref.tiny_hf_llama(seed=1)
    prompt_BL, mask_BL = left_padded_prompts(5, 96, lengths=(7, 2, 9, 9, 4, 1, 6, 8), width=9)
    outputs = {}
    for shape in ((2, 2, 2), (1, 1, 1)):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
        model = ref.load_into_ours(hf_model, mesh)
        with sharding.activate(mesh):
            greedy = generate(model, prompt_BL, mask_BL, sampling=SamplingConfig(max_new_tokens=10),
                              eos_token_ids=(), pad_token_id=PAD)
            sampled = generate(model, prompt_BL, mask_BL, sampling=SamplingConfig(1.0, 0.9, 10),
                               eos_token_ids=(), pad_token_id=PAD, rng=jax.random.key(0))
        outputs[shape] = np.asarray(greedy), np.asarray(sampled)
        if shape == (2, 2, 2):  # really sharded: weights over fsdp x tensor, the batch over 4
            assert model.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
            assert len(greedy.sharding.device_set) == 8
    np.testing.assert_array_equal(outputs[(2, 2, 2)][0], outputs[(1, 1, 1)][0])
    np.testing.assert_array_equal(outputs[(2, 2, 2)][1], outputs[(1, 1, 1)][1])


def test_the_loop_compiles_once_per_shape(tiny_llama, mesh):
    _, model = tiny_llama
    sampling = SamplingConfig(max_new_tokens=6)
    run = functools.partial(generate, model, sampling=sampling, eos_token_ids=(2,),
                            pad_token_id=PAD)
    with sharding.activate(mesh):
        run(*left_padded_prompts(6, 96, lengths=(3, 5), width=8))
        compiled = decoding._generate._cache_size()
        # New prompts and another copy of the model with the same graph: no new compilation.
        run(*left_padded_prompts(7, 96, lengths=(8, 1), width=8))
        generate(ref.load_into_ours(ref.tiny_hf_llama(seed=2), mesh),
                 *left_padded_prompts(8, 96, lengths=(2, 2), width=8), sampling=sampling,
                 eos_token_ids=(2,), pad_token_id=PAD)
        assert decoding._generate._cache_size() == compiled
        run(*left_padded_prompts(9, 96, lengths=(3, 5), width=16))  # another bucket
        assert decoding._generate._cache_size() == compiled + 1


@pytest.fixture(scope="module")
def smollm2(shared_data):
    hf_model, tokenizer = ref.smollm2_hf()
    # One device: with the suite's 8, every weight would be copied 8 times for nothing.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
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


def _row_keys(seed, rows):
    return jax.random.split(jax.random.key(seed), rows)


def test_row_keys_make_a_row_independent_of_its_neighbours_and_position(tiny_llama, mesh):
    _, model = tiny_llama
    prompt_BL, mask_BL = left_padded_prompts(10, 96, lengths=(8, 5, 2, 8), width=8)
    keys_B = _row_keys(0, 4)
    run = functools.partial(generate, model, sampling=SamplingConfig(1.0, 0.95, 12),
                            eos_token_ids=(), pad_token_id=PAD)
    others_BL, other_mask_BL = left_padded_prompts(11, 96, lengths=(3, 8, 7, 1, 6, 4, 8),
                                                   width=8)
    permutation = np.asarray([2, 0, 3, 1])
    with sharding.activate(mesh):
        full = np.asarray(run(prompt_BL, mask_BL, row_keys=keys_B))
        permuted = np.asarray(run(prompt_BL[permutation], mask_BL[permutation],
                                  row_keys=keys_B[permutation]))
        alone = np.asarray(run(prompt_BL[1:2], mask_BL[1:2], row_keys=keys_B[1:2]))
        # Row 1 at position 5 of 8, among other prompts and keys.
        crowd = np.asarray(run(np.insert(others_BL, 5, prompt_BL[1], 0),
                               np.insert(other_mask_BL, 5, mask_BL[1], 0),
                               row_keys=jax.numpy.concatenate(
                                   [_row_keys(1, 5), keys_B[1:2], _row_keys(2, 2)])))
        # The control: one key for the batch makes a row's draws depend on its position.
        batch_key = np.asarray(run(prompt_BL, mask_BL, rng=jax.random.key(0)))
        batch_key_permuted = np.asarray(run(prompt_BL[permutation], mask_BL[permutation],
                                            rng=jax.random.key(0)))
        same_prompt_other_keys = np.asarray(run(prompt_BL[[1, 1]], mask_BL[[1, 1]],
                                                row_keys=_row_keys(3, 2)))
    np.testing.assert_array_equal(permuted, full[permutation])
    np.testing.assert_array_equal(alone[0], full[1])
    np.testing.assert_array_equal(crowd[5], full[1])
    assert (batch_key_permuted != batch_key[permutation]).mean() > 0.5
    assert (same_prompt_other_keys[0] != same_prompt_other_keys[1]).mean() > 0.5


def test_row_keys_draw_token_n_with_fold_in_of_the_row_key(mesh):
    temperature = 0.8
    with sharding.activate(mesh):
        model = decoder.DecoderModel(llama.tiny(initializer_range=0.3), rngs=nnx.Rngs(4))
        prompt_BL, mask_BL = left_padded_prompts(12, 128, lengths=(6, 3, 5, 1), width=6)
        logits_BV = np.asarray(model.logits(model(
            jnp.asarray(prompt_BL), positions_BL=jnp.asarray(
                np.maximum(np.cumsum(mask_BL, 1) - 1, 0)),
            attention_mask_BL=jnp.asarray(mask_BL))))[:, -1]
        keys_B = _row_keys(5, 4)
        tokens_B1 = np.asarray(generate(model, prompt_BL, mask_BL,
                                        sampling=SamplingConfig(temperature, 1.0, 1),
                                        eos_token_ids=(), pad_token_id=PAD, row_keys=keys_B))
    # Unbatched draws, one row at a time, from logits computed without the decoder.
    expected = [int(jax.random.categorical(jax.random.fold_in(keys_B[b], 0),
                                           jnp.asarray(logits_BV[b]) / temperature))
                for b in range(4)]
    assert tokens_B1[:, 0].tolist() == expected


def test_row_keys_sample_the_tempered_nucleus(mesh):
    temperature, top_p, rows = 0.7, 0.8, 8192
    with sharding.activate(mesh):
        model = decoder.DecoderModel(llama.tiny(initializer_range=0.3), rngs=nnx.Rngs(3))
        prompt_1L, mask_1L = left_padded_prompts(3, 128, lengths=(6,), width=6)
        logits_V = np.asarray(model.logits(model(
            jnp.asarray(prompt_1L), attention_mask_BL=jnp.asarray(mask_1L))))[0, -1]
        tokens_B1 = generate(model, np.repeat(prompt_1L, rows, 0), np.repeat(mask_1L, rows, 0),
                             sampling=SamplingConfig(temperature, top_p, max_new_tokens=1),
                             eos_token_ids=(), pad_token_id=PAD, row_keys=_row_keys(7, rows))
    nucleus_V, edge_margin = _nucleus_probabilities(logits_V, temperature, top_p)
    kept = nucleus_V > 0
    assert 4 <= kept.sum() <= 64 and edge_margin > 1e-4
    counts_V = np.bincount(np.asarray(tokens_B1)[:, 0], minlength=128)
    assert counts_V[~kept].sum() == 0
    assert scipy.stats.chisquare(counts_V[kept], rows * nucleus_V[kept]).pvalue > 1e-3


def test_left_padding_to_a_wider_bucket_changes_no_token(tiny_llama, mesh):
    _, model = tiny_llama
    narrow_BL, narrow_mask_BL = left_padded_prompts(13, 96, lengths=(8, 5, 2, 7), width=8)
    wide_BL = np.pad(narrow_BL, ((0, 0), (24, 0)), constant_values=PAD)
    wide_mask_BL = np.pad(narrow_mask_BL, ((0, 0), (24, 0)))
    keys_B = _row_keys(8, 4)
    outputs = []
    for prompt_BL, mask_BL in ((narrow_BL, narrow_mask_BL), (wide_BL, wide_mask_BL)):
        with sharding.activate(mesh):
            outputs.append([np.asarray(generate(
                model, prompt_BL, mask_BL, sampling=sampling, eos_token_ids=(),
                pad_token_id=PAD, row_keys=keys_B if sampling.temperature else None))
                for sampling in (SamplingConfig(max_new_tokens=16),
                                 SamplingConfig(1.0, 0.95, 16))])
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def test_row_keys_are_checked(tiny_llama):
    _, model = tiny_llama
    prompt_BL, mask_BL = left_padded_prompts(14, 96, lengths=(3, 2), width=4)
    run = functools.partial(generate, model, prompt_BL, mask_BL,
                            sampling=SamplingConfig(1.0, 1.0, 2), eos_token_ids=(),
                            pad_token_id=PAD)
    with pytest.raises(ValueError, match="not both"):
        run(rng=jax.random.key(0), row_keys=_row_keys(0, 2))
    with pytest.raises(ValueError, match="one key per prompt row"):
        run(row_keys=_row_keys(0, 3))
