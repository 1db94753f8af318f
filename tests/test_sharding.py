"""Mesh construction, the logical-axis rules, batch sharding and state shardings.

Expected specs and row placements are written out by hand from the mesh shape (8 simulated
CPU devices, conftest.py) and DEFAULT_RULES.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mcckd_jax import sharding


def test_make_mesh_fills_the_auto_axis_and_names_the_axes():
    mesh = sharding.make_mesh((-1, 2, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("per_host,message", [((-1, -1, 1), "at most one"),
                                              ((3, -1, 1), "do not divide"),
                                              ((2, 2, 1), "needs 4 devices")])
def test_bad_mesh_shapes_are_clear_errors(per_host, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(per_host)


def test_across_hosts_must_divide_the_devices():
    with pytest.raises(ValueError, match="do not split over 3 hosts"):
        sharding.make_mesh((-1, 1, 1), across_hosts=(3, 1, 1))


def test_logical_names_map_through_the_rules():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("act_batch", "act_length", "act_embed"), rules) == P(
        ("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("norm",), rules) == P(None)


def test_constrain_shards_activations_and_tolerates_odd_sizes():
    mesh = sharding.make_mesh((2, 2, 2))

    @jax.jit
    def f(x):
        return sharding.constrain(x * 2, ("act_batch", "act_length", "act_mlp"))

    with sharding.activate(mesh):
        even = f(jnp.ones((8, 3, 4)))
        odd = f(jnp.ones((3, 3, 4)))  # 3 rows cannot split 4 ways: left to the compiler
    assert even.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert odd.shape == (3, 3, 4) and float(np.asarray(odd).sum()) == 72.0
    assert sharding.constrain(jnp.ones(2), ("act_batch",)).shape == (2,)  # no mesh: no-op


@pytest.mark.parametrize("per_host,data_parallel,model_parallel", [
    ((8, 1, 1), 8, False), ((2, 2, 2), 4, True), ((4, 1, 2), 4, True), ((2, 4, 1), 8, True),
    ((1, 1, 8), 1, True)])
def test_data_parallel_size_and_model_parallelism_follow_the_axis_sizes(
        per_host, data_parallel, model_parallel):
    # The batch splits over data x fsdp; the parameters over fsdp x tensor.
    mesh = sharding.make_mesh(per_host)
    assert sharding.data_parallel_size(mesh) == data_parallel
    assert sharding.is_model_parallel(mesh) is model_parallel


def test_batch_divisibility_is_a_one_line_error_naming_the_setting():
    mesh = sharding.make_mesh((2, 2, 2))  # 4 data-parallel devices
    sharding.check_batch_divides(12, mesh, what="data.pipeline.batch_size")
    with pytest.raises(ValueError) as error:
        sharding.check_batch_divides(6, mesh, what="data.pipeline.batch_size")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("a global batch of 6 questions does not split")
    assert "= 4 devices" in message and message.endswith("change data.pipeline.batch_size")
    sharding.check_batch_divides(6, sharding.make_mesh((1, 2, 4)), what="x")  # 2 ways


def test_batch_sharding_splits_rows_over_data_and_fsdp_and_keeps_columns_whole():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    local_BC = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    global_BC = sharding.global_batch(local_BC, mesh)
    np.testing.assert_array_equal(np.asarray(global_BC), local_BC)  # one process: all rows
    # The device at mesh position (d, f, t) holds rows [2 (2 d + f), 2 (2 d + f) + 2), every
    # column; the two tensor devices of a (d, f) pair hold the same rows.
    for d, f, t in np.ndindex(2, 2, 2):
        device = mesh.devices[d, f, t]
        [shard] = [s for s in global_BC.addressable_shards if s.device == device]
        first = 2 * (2 * d + f)
        np.testing.assert_array_equal(np.asarray(shard.data), local_BC[first:first + 2])


def test_global_batch_keeps_the_tree_and_dtypes_and_takes_an_explicit_sharding():
    mesh = sharding.make_mesh((4, 2, 1))
    local = {"tokens": np.arange(16, dtype=np.int32).reshape(8, 2),
             "masks": (np.ones((8, 2), bool), np.zeros((8,), bool))}
    batch = sharding.global_batch(local, mesh)
    assert jax.tree.structure(batch) == jax.tree.structure(local)
    for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(local)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding.spec == P(("data", "fsdp"))
    replicated = jax.sharding.NamedSharding(mesh, P())
    tokens = sharding.global_batch(local["tokens"], replicated)
    assert tokens.sharding == replicated and tokens.addressable_shards[0].data.shape == (8, 2)


class _Annotated(nnx.Module):
    """Variables with logical axes, one without, and an RNG stream (key and count)."""

    def __init__(self):
        self.kernel_DF = nnx.Param(jnp.zeros((16, 8)), out_sharding=("embed", "mlp"))
        self.table_VD = nnx.Param(jnp.zeros((8, 16)), out_sharding=("vocab", "embed"))
        self.norm_D = nnx.Param(jnp.ones((16,)), out_sharding=("norm",))
        self.plain = nnx.Param(jnp.zeros((4,)))
        self.stream = nnx.Rngs(dropout=0)


def _flat_specs(state) -> dict[tuple, P]:
    return {path: variable.get_value().spec for path, variable in nnx.to_flat_state(state)}


def test_tree_shardings_follow_the_logical_axes_through_the_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh):
        abstract = nnx.state(nnx.eval_shape(_Annotated))
    tree = {"model": abstract, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = sharding.tree_shardings(tree, mesh, sharding.DEFAULT_RULES)
    assert shardings["step"] == jax.sharding.NamedSharding(mesh, P())
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))
    # DEFAULT_RULES: embed -> fsdp, mlp/vocab -> tensor, norm -> replicated.
    assert _flat_specs(shardings["model"]) == {
        ("kernel_DF",): P("fsdp", "tensor"), ("table_VD",): P("tensor", "fsdp"),
        ("norm_D",): P(None), ("plain",): P(),
        ("stream", "dropout", "key"): P(), ("stream", "dropout", "count"): P()}
    # Other rules, other specs: the rules are applied, not the defaults.
    swapped = sharding.tree_shardings(abstract, mesh, (("embed", "tensor"), ("mlp", "fsdp"),
                                                       ("vocab", None), ("norm", "data")))
    assert _flat_specs(swapped)[("kernel_DF",)] == P("tensor", "fsdp")
    assert _flat_specs(swapped)[("table_VD",)] == P(None, "tensor")
    assert _flat_specs(swapped)[("norm_D",)] == P("data")


def test_adafactor_factored_moments_are_replicated_not_given_their_parameters_axes():
    import optax

    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh):
        params = nnx.state(nnx.eval_shape(_Annotated), nnx.Param)
        opt_state = jax.eval_shape(optax.adafactor(1e-3, min_dim_size_to_factor=4).init, params)
    shardings = sharding.tree_shardings(opt_state, mesh, sharding.DEFAULT_RULES)
    leaves = jax.tree.leaves(opt_state)
    placed = jax.tree.leaves(shardings)
    assert len(leaves) == len(placed)
    for leaf, where in zip(leaves, placed):
        assert len(where.spec) <= len(leaf.shape)  # a valid sharding for every moment
    # The [D] and [F] factors of kernel_DF [D, F] carry its two names but have one axis each.
    assert any(len(leaf.shape) == 1 and where.spec == P() for leaf, where in zip(leaves, placed))


def test_abstract_with_shardings_carries_the_given_or_the_leaves_own_shardings():
    mesh = sharding.make_mesh((4, 2, 1))
    rows = jax.sharding.NamedSharding(mesh, P("data"))
    columns = jax.sharding.NamedSharding(mesh, P(None, "fsdp"))
    tree = {"w": jax.device_put(jnp.ones((8, 4), jnp.bfloat16), rows),
            "n": jax.device_put(jnp.arange(8), jax.sharding.NamedSharding(mesh, P()))}
    own = sharding.abstract_with_shardings(tree)
    assert own["w"] == jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=rows)
    assert own["n"].shape == (8,) and own["n"].sharding.spec == P()
    moved = sharding.abstract_with_shardings(tree, {"w": columns, "n": rows})
    assert moved["w"] == jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=columns)
    assert moved["n"].sharding == rows and moved["n"].dtype == tree["n"].dtype
