"""Mesh construction and the logical-axis rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
