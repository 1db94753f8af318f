"""LoRA: a fresh adapter changes nothing, merging changes nothing, only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_reference as ref
from mcckd_jax import sharding
from mcckd_jax.models import layers, lora

LORA = layers.LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj",
                                                             "o_proj", "gate_proj"))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def hf_model():
    return ref.tiny_hf_llama(seed=31)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(32)
    return jnp.asarray(rng.integers(0, 96, (4, 10))), jnp.ones((4, 10), jnp.int32)


def logits(model, mesh, batch):
    with sharding.activate(mesh):
        return np.asarray(model.logits(model(batch[0], attention_mask_BL=batch[1])))


def test_fresh_adapters_leave_the_model_unchanged(hf_model, mesh, batch):
    base = logits(ref.load_into_ours(hf_model, mesh), mesh, batch)
    with_lora = ref.load_into_ours(hf_model, mesh, lora=LORA)
    assert with_lora.layers[0].self_attn.q_proj.lora_b is not None
    assert with_lora.layers[0].mlp.up_proj.lora_a is None  # not a target
    np.testing.assert_array_equal(logits(with_lora, mesh, batch), base)


def test_merged_model_equals_the_unmerged_lora_model(hf_model, mesh, batch):
    model = ref.load_into_ours(hf_model, mesh, lora=LORA)
    for layer in model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj):
            linear.lora_b[...] = jnp.full(linear.lora_b[...].shape, 0.05, jnp.float32)
    unmerged = logits(model, mesh, batch)
    base = logits(ref.load_into_ours(hf_model, mesh), mesh, batch)
    assert np.abs(unmerged - base).max() > 1e-3  # the adapters matter
    merged = lora.merge_lora(model)
    assert merged.config.lora is None and merged.layers[0].self_attn.q_proj.lora_a is None
    np.testing.assert_allclose(logits(merged, mesh, batch), unmerged, atol=1e-5)
    kernel = merged.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.sharding.spec == model.layers[0].self_attn.q_proj.kernel[...].sharding.spec
    # Hand check of one kernel: W + A @ B * alpha / rank.
    q = model.layers[0].self_attn.q_proj
    expected = np.asarray(q.kernel[...]) + np.asarray(q.lora_a[...]) @ np.asarray(q.lora_b[...]) * 2.0
    np.testing.assert_allclose(np.asarray(kernel), expected, atol=1e-6)


def test_only_adapters_are_trainable_and_get_gradients(hf_model, mesh, batch):
    model = ref.load_into_ours(hf_model, mesh, lora=LORA)
    trainable = lora.trainable_filter(model.config)
    assert trainable is nnx.LoRAParam
    graphdef, adapters, frozen = nnx.split(model, trainable, ...)
    names = {path[-1] for path, _ in nnx.to_flat_state(adapters)}
    assert names == {"lora_a", "lora_b"}
    assert len(list(nnx.to_flat_state(adapters))) == 2 * 5 * 2  # 2 layers x 5 targets x (A, B)

    def loss(adapter_state):
        m = nnx.merge(graphdef, adapter_state, frozen)
        return jnp.mean(m.logits(m(batch[0], attention_mask_BL=batch[1])) ** 2)

    with sharding.activate(mesh):
        grads = jax.jit(jax.grad(loss))(adapters)
    flat = dict(nnx.to_flat_state(grads))
    # With B = 0 the gradient reaches B (through A x) but not A (through B).
    b_grad = flat[("layers", 0, "self_attn", "q_proj", "lora_b")].get_value()
    a_grad = flat[("layers", 0, "self_attn", "q_proj", "lora_a")].get_value()
    assert np.abs(np.asarray(b_grad)).max() > 0 and np.abs(np.asarray(a_grad)).max() == 0
    assert lora.trainable_filter(ref.load_into_ours(hf_model, mesh).config) is nnx.Param
