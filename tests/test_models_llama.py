"""The NNX LLaMA-family decoder against transformers' PyTorch LlamaForCausalLM/MistralForCausalLM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_reference as ref
from mcckd_jax import sharding
from mcckd_jax.models import decoder, llama
from mcckd_jax.models.rope import RopeConfig



def llama3_rope():  # a fresh dict each time: transformers adds rope_theta to the one it gets
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


def forward_logits(model, mesh, tokens, mask=None, positions=None, segment_ids=None):
    with sharding.activate(mesh):
        hidden = model(jnp.asarray(tokens), attention_mask_BL=None if mask is None else jnp.asarray(mask),
                       positions_BL=None if positions is None else jnp.asarray(positions),
                       segment_ids_BL=None if segment_ids is None else jnp.asarray(segment_ids))
        return np.asarray(model.logits(hidden))


def padded_batch(seed, vocab, batch=4, length=24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 17:] = 0
    mask[2, 6:] = 0
    return tokens, mask


CASES = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=llama3_rope(), rope_theta=500000.0),
    "linear_rope_biases": dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                               attention_bias=True, mlp_bias=True),
    "head_dim_16": dict(head_dim=16, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_right_padding(case, mesh):
    hf_model = ref.tiny_hf_llama(seed=1, **CASES[case])
    model = ref.load_into_ours(hf_model, mesh)
    tokens, mask = padded_batch(2, hf_model.config.vocab_size)
    ours = forward_logits(model, mesh, tokens, mask)
    expected = ref.hf_logits(hf_model, tokens, mask)
    assert np.abs(ours - expected)[mask.astype(bool)].max() < 1e-4


def test_logits_match_transformers_with_left_padding_and_positions(mesh):
    hf_model = ref.tiny_hf_llama(seed=3, rope_scaling=llama3_rope())
    model = ref.load_into_ours(hf_model, mesh)
    tokens, mask = padded_batch(4, hf_model.config.vocab_size)
    mask = mask[:, ::-1].copy()  # left padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = forward_logits(model, mesh, tokens, mask, positions)
    expected = ref.hf_logits(hf_model, tokens, mask, positions)
    assert np.abs(ours - expected)[mask.astype(bool)].max() < 1e-4


def test_mistral_sliding_window_matches_transformers(mesh):
    hf_model = ref.tiny_hf_llama(seed=5, mistral=True, sliding_window=5)
    hf_model.config._attn_implementation = "eager"
    model = ref.load_into_ours(hf_model, mesh)
    assert model.config.sliding_window == 5
    tokens, _ = padded_batch(6, hf_model.config.vocab_size)
    ours = forward_logits(model, mesh, tokens)
    expected = ref.hf_logits(hf_model, tokens)
    assert np.abs(ours - expected).max() < 1e-4
    unwindowed = ref.load_into_ours(hf_model, mesh, sliding_window=None)
    assert np.abs(forward_logits(unwindowed, mesh, tokens) - expected)[:, 6:].max() > 1e-3


def test_packed_segments_equal_separate_sequences(mesh):
    hf_model = ref.tiny_hf_llama(seed=7)
    model = ref.load_into_ours(hf_model, mesh)
    rng = np.random.default_rng(8)
    first, second = rng.integers(0, 96, (1, 9)), rng.integers(0, 96, (1, 7))
    packed = np.concatenate([first, second], axis=1)
    segments = np.array([[1] * 9 + [2] * 7])
    positions = np.array([list(range(9)) + list(range(7))])
    ours = forward_logits(model, mesh, np.repeat(packed, 4, 0), positions=np.repeat(positions, 4, 0),
                          segment_ids=np.repeat(segments, 4, 0))[0]
    np.testing.assert_allclose(ours[:9], ref.hf_logits(hf_model, first)[0], atol=1e-4)
    np.testing.assert_allclose(ours[9:], ref.hf_logits(hf_model, second)[0], atol=1e-4)


def test_cached_decoding_equals_the_uncached_forward_at_every_step(mesh):
    hf_model = ref.tiny_hf_llama(seed=9)
    model = ref.load_into_ours(hf_model, mesh)
    rng = np.random.default_rng(10)
    batch, prompt_len, steps = 4, 6, 8
    tokens = rng.integers(0, 96, (batch, prompt_len + steps))
    mask = np.ones_like(tokens)
    mask[1, :2] = 0  # left padding in the prompt
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = forward_logits(model, mesh, tokens, mask, positions)

    with sharding.activate(mesh):
        cache = model.init_cache(batch, prompt_len + steps)
        decode = jax.jit(lambda m, t, c, p, a: m.decode(t, c, positions_BL=p, attention_mask_BL=a))
        hidden, cache = decode(model, jnp.asarray(tokens[:, :prompt_len]), cache,
                               jnp.asarray(positions[:, :prompt_len]),
                               jnp.asarray(mask[:, :prompt_len]))
        step_logits = [np.asarray(model.logits(hidden))]
        for t in range(prompt_len, prompt_len + steps):
            hidden, cache = decode(model, jnp.asarray(tokens[:, t:t + 1]), cache,
                                   jnp.asarray(positions[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]))
            step_logits.append(np.asarray(model.logits(hidden)))
    cached = np.concatenate(step_logits, axis=1)
    valid = mask.astype(bool)
    assert np.abs(cached - full)[valid].max() < 1e-5
    assert int(cache.length) == prompt_len + steps


def test_config_round_trips_through_the_hf_config():
    config = llama.LlamaConfig.from_hf(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=llama3_rope(),
        tie_word_embeddings=True))
    assert config.rope == RopeConfig(rope_theta=10000.0, **llama3_rope())
    again = llama.LlamaConfig.from_hf(transformers.LlamaConfig(**config.to_hf()).to_dict())
    assert again == config
    legacy = llama.LlamaConfig.from_hf({**config.to_hf(), "rope_parameters": None,
                                        "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert legacy.rope == RopeConfig(rope_theta=10000.0, rope_type="linear", factor=4.0)


def test_parameters_carry_logical_axes_and_are_split_by_the_rules(mesh):
    config = llama.tiny(vocab_size=96)
    with sharding.activate(mesh):
        model = decoder.DecoderModel(config, rngs=nnx.Rngs(0))
    expected = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),
        ("layers", 0, "self_attn", "q_proj", "kernel"): P("fsdp", "tensor"),
        ("layers", 1, "self_attn", "k_proj", "kernel"): P("fsdp", "tensor"),
        ("layers", 0, "self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),
        ("layers", 0, "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
        ("layers", 0, "input_layernorm", "weight"): P(None),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
    }
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, spec in expected.items():
        assert params[path].get_value().sharding.spec == spec, path
    assert all(v.get_value().sharding.mesh.shape == mesh.shape for v in params.values())


def test_remat_policies_give_the_same_gradients(mesh):
    hf_model = ref.tiny_hf_llama(seed=11)
    tokens, mask = padded_batch(12, 96)

    def grads(policy):
        model = ref.load_into_ours(hf_model, mesh, remat_policy=policy)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            m = nnx.merge(graphdef, p)
            return jnp.mean(m.logits(m(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask))) ** 2)

        with sharding.activate(mesh):
            return jax.jit(jax.grad(loss))(params)

    plain = grads("none")
    for policy in ("full", "mlp"):
        for (path, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(grads(policy))):
            np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                       rtol=1e-5, atol=1e-8, err_msg=f"{policy} {path}")


def test_bfloat16_compute_stays_close_to_float32(mesh):
    hf_model = ref.tiny_hf_llama(seed=13)
    tokens, mask = padded_batch(14, 96)
    f32 = forward_logits(ref.load_into_ours(hf_model, mesh), mesh, tokens, mask)
    bf16_model = ref.load_into_ours(hf_model, mesh, dtype="bfloat16", param_dtype="bfloat16")
    assert bf16_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    bf16 = forward_logits(bf16_model, mesh, tokens, mask)
    valid = mask.astype(bool)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32)[valid].max() < 0.1 * np.abs(f32[valid]).max()


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        llama.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        llama.tiny(remat_policy="sometimes")
    with pytest.raises(ValueError, match="rope_type"):
        dataclasses.replace(llama.tiny(), rope=RopeConfig(rope_type="yarn"))
    with pytest.raises(ValueError, match="model_type"):
        llama.LlamaConfig.from_hf({"model_type": "gpt2"})


def test_gradients_match_torch_autograd(mesh):
    """Backward pass (the attention's custom VJP included) against PyTorch autograd."""
    import torch

    hf_model = ref.tiny_hf_llama(seed=15, rope_scaling=llama3_rope())
    model = ref.load_into_ours(hf_model, mesh)
    tokens, mask = padded_batch(16, 96)
    weights = np.random.default_rng(17).normal(size=(4, 24, 96)).astype(np.float32)
    weights *= mask[:, :, None]  # padded positions do not count

    torch_logits = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
    (torch_logits * torch.tensor(weights)).sum().backward()
    expected = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    hf_model.zero_grad()

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p)
        return jnp.sum(m.logits(m(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask)))
                       * weights)

    with sharding.activate(mesh):
        grads = jax.jit(jax.grad(loss))(params)
    from mcckd_jax.models.hf_names import hf_name

    checked = 0
    for path, variable in nnx.to_flat_state(grads):
        name, transposed = hf_name(path, prefix="model.", unprefixed=("lm_head",))
        got = np.asarray(variable.get_value())
        want = expected[name].T if transposed else expected[name]
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4,
                                   err_msg=name)
        checked += 1
    assert checked == len(expected)
