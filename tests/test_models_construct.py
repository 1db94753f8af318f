"""`abstract_model` and `build_with_base_weights`: a model created around supplied base weights,
on a (2, 2, 2) mesh, against a model the factory creates directly.

The probe for "computes nothing" is a factory whose base initialisers are `jax.pure_callback`s
that count their calls and fill the weight with 7.25: a call means the base weights were
computed by the factory, and 7.25 in the result means they were kept.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mcckd_jax import sharding
from mcckd_jax.models import construct, decoder, layers, llama

LORA = layers.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
CONFIG = llama.tiny(lora=LORA)
SEED = 3

# Hand-written from the parameters' logical axes and sharding.DEFAULT_RULES (vocab, heads and
# mlp -> "tensor", embed -> "fsdp", norm replicated); shapes from llama.tiny (V 128, D 32,
# 4 heads / 2 KV heads of 8, F 64).
EXPECTED = {
    ("embed_tokens", "embedding"): ((128, 32), P("tensor", "fsdp")),
    ("layers", 0, "self_attn", "q_proj", "kernel"): ((32, 32), P("fsdp", "tensor")),
    ("layers", 0, "self_attn", "k_proj", "kernel"): ((32, 16), P("fsdp", "tensor")),
    ("layers", 1, "self_attn", "o_proj", "kernel"): ((32, 32), P("tensor", "fsdp")),
    ("layers", 1, "mlp", "down_proj", "kernel"): ((64, 32), P("tensor", "fsdp")),
    ("layers", 0, "input_layernorm", "weight"): ((32,), P(None)),
    ("lm_head", "kernel"): ((32, 128), P("fsdp", "tensor")),
    ("norm", "weight"): ((32,), P(None)),
}
NUM_BASE = 3 + 2 * 9  # embedding, final norm, head; per layer 7 kernels and 2 norms

# Other rules: what the factory's variables ask for must follow them, not DEFAULT_RULES.
SWAPPED_RULES = (("vocab", "fsdp"), ("embed", "tensor"), ("heads", "fsdp"),
                 ("kv_heads", "fsdp"), ("mlp", None), ("lora_rank", None), ("norm", None))
EXPECTED_SWAPPED = {
    ("embed_tokens", "embedding"): P("fsdp", "tensor"),
    ("layers", 0, "self_attn", "q_proj", "kernel"): P("tensor", "fsdp"),
    ("layers", 1, "mlp", "down_proj", "kernel"): P(None, "tensor"),
}


def factory():
    return decoder.DecoderModel(CONFIG, rngs=nnx.Rngs(SEED))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def direct(mesh):
    """The factory's model created directly, sharded (the reference for everything that is
    not a base weight)."""
    with sharding.activate(mesh):
        return factory()


def flat(state):
    return dict(nnx.to_flat_state(state))


def distinct_values(path, shape):
    """A recognisable array per path (no two paths alike, nothing like an initialiser)."""
    seed = sum(ord(c) for c in "/".join(map(str, path)))
    return (100.0 + np.random.default_rng(seed).integers(0, 1000, shape)).astype(np.float32)


def test_abstract_model_gives_sharded_shapes_of_the_base_weights_only(mesh):
    graphdef, base = construct.abstract_model(factory, mesh=mesh)
    leaves = flat(base)
    assert len(leaves) == NUM_BASE
    assert not any(name in ("lora_a", "lora_b") for path in leaves for name in path)
    for path, variable in leaves.items():
        value = variable.get_value()
        assert isinstance(value, jax.ShapeDtypeStruct), path  # nothing was computed
        assert type(variable) is nnx.Param and value.dtype == jnp.float32
    for path, (shape, spec) in EXPECTED.items():
        value = leaves[path].get_value()
        assert value.shape == shape and value.sharding.spec == spec, path
        assert dict(value.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert isinstance(graphdef, nnx.GraphDef)
    _, swapped = construct.abstract_model(factory, mesh=mesh, rules=SWAPPED_RULES)
    for path, spec in EXPECTED_SWAPPED.items():
        assert flat(swapped)[path].get_value().sharding.spec == spec, path


def test_build_places_exactly_the_supplied_values_with_the_rules_specs(mesh, direct):
    calls = {}

    def base_values(path, abstract, spec):
        assert path not in calls, f"{path} asked for twice"
        calls[path] = (abstract.shape, abstract.dtype, spec)
        return jax.device_put(distinct_values(path, abstract.shape), NamedSharding(mesh, spec))

    model = construct.build_with_base_weights(factory, base_values, mesh=mesh)
    direct_params = {path: variable for path, variable in flat(nnx.state(direct, nnx.Param)).items()
                     if path[-1] not in ("lora_a", "lora_b")}
    assert set(calls) == set(direct_params) and len(calls) == NUM_BASE
    for path, (shape, spec) in EXPECTED.items():
        assert calls[path] == (shape, jnp.float32, spec), path
    built = flat(nnx.state(model, nnx.Param))
    for path, variable in direct_params.items():
        # The spec handed over is the one the direct model's weight was created with.
        assert calls[path][2] == variable.get_value().sharding.spec, path
        value = built[path].get_value()
        np.testing.assert_array_equal(np.asarray(value), distinct_values(path, calls[path][0]))
        assert value.sharding.spec == calls[path][2], path
    # A few by hand: the values land in the module the path names.
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]),
                                  distinct_values(("lm_head", "kernel"), (32, 128)))
    np.testing.assert_array_equal(
        np.asarray(model.layers[1].self_attn.o_proj.kernel[...]),
        distinct_values(("layers", 1, "self_attn", "o_proj", "kernel"), (32, 32)))

    swapped_specs = {}

    def record_spec(path, abstract, spec):
        swapped_specs[path] = spec
        return jax.device_put(distinct_values(path, abstract.shape), NamedSharding(mesh, spec))

    construct.build_with_base_weights(factory, record_spec, mesh=mesh, rules=SWAPPED_RULES)
    for path, spec in EXPECTED_SWAPPED.items():
        assert swapped_specs[path] == spec, path


def test_a_model_built_on_the_direct_weights_is_the_direct_model(mesh, direct):
    direct_base = flat(nnx.state(direct, construct.BASE))
    abstract = construct.abstract_model(factory, mesh=mesh)
    model = construct.build_with_base_weights(
        factory, lambda path, shape_dtype, spec: direct_base[path].get_value(), mesh=mesh,
        abstract=abstract)
    # Fresh LoRA adapters and the dropout RNG state come from the factory's own seed.
    others = flat(nnx.state(model, nnx.Not(construct.BASE)))
    expected = flat(nnx.state(direct, nnx.Not(construct.BASE)))
    assert set(others) == set(expected) and len(others) == 4 * 4  # 4 adapted maps
    for path, variable in expected.items():
        value = variable.get_value()
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value, got = jax.random.key_data(value), jax.random.key_data(others[path].get_value())
        else:
            got = others[path].get_value()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=str(path))
    q_proj = model.layers[0].self_attn.q_proj
    assert np.asarray(q_proj.lora_a[...]).std() > 0.01 and not np.asarray(q_proj.lora_b[...]).any()
    # And the model computes what the direct one does, with a non-zero B on one adapter so
    # that its A shows in the logits.
    reference = nnx.clone(direct)
    with sharding.activate(mesh):
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 8)), jnp.int32)
        for target in (model, reference):
            target.layers[0].self_attn.q_proj.lora_b[...] = jnp.full((2, 32), 0.3)
        np.testing.assert_array_equal(np.asarray(model.logits(model(tokens))),
                                      np.asarray(reference.logits(reference(tokens))))


CALLS = []
PROBE_VALUE = 7.25


def _probe(shape):
    """An initialiser that counts its executions and fills the weight with PROBE_VALUE."""
    def host():
        CALLS.append(shape)
        return np.full(shape, PROBE_VALUE, np.float32)

    return jax.pure_callback(host, jax.ShapeDtypeStruct(shape, jnp.float32))


class Probed(nnx.Module):
    """Two probed base weights beside a LoRA-adapted Linear."""

    def __init__(self, *, rngs):
        self.proj = layers.Linear(8, 4, logical_axes=("embed", "mlp"), rngs=rngs,
                                  lora=layers.LoRAConfig(rank=2, target_modules=("proj",)))
        self.table = nnx.Param(_probe((16, 8)), out_sharding=("vocab", "embed"))
        self.scale = nnx.Param(_probe((8,)), out_sharding=("norm",))


def test_the_factory_never_computes_the_base_weights(mesh):
    def probed():
        return Probed(rngs=nnx.Rngs(5))

    CALLS.clear()
    _, base = construct.abstract_model(probed, mesh=mesh)
    assert CALLS == [] and set(flat(base)) == {("proj", "kernel"), ("table",), ("scale",)}
    model = construct.build_with_base_weights(
        probed, lambda path, abstract, spec: jax.device_put(
            np.full(abstract.shape, 1.5, np.float32), NamedSharding(mesh, spec)), mesh=mesh)
    assert CALLS == []
    for path, variable in flat(nnx.state(model, construct.BASE)).items():
        assert (np.asarray(variable.get_value()) == 1.5).all(), path
    assert model.proj.lora_a[...].shape == (8, 2) and np.asarray(model.proj.lora_a[...]).std() > 0
    # The probe does fire when the factory's base weights are computed (what a build that
    # kept the factory's whole state would do), so the empty CALLS above means something.
    with sharding.activate(mesh):
        everything = jax.jit(lambda: nnx.split(probed())[1])()
    assert sorted(CALLS) == [(8,), (16, 8)]
    assert (np.asarray(flat(everything)[("table",)].get_value()) == PROBE_VALUE).all()
