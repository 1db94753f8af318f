"""Device mesh and the logical-to-mesh axis rules.

Models name every parameter and block-boundary activation axis with a logical name
(`embed`, `vocab`, `heads`, `act_batch`, ...); this module alone maps those names onto the
mesh axes ("data", "fsdp", "tensor"). Nothing in `models/` or `losses.py` names a mesh axis.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Each logical name maps to a mesh axis, a tuple of them, or None (replicated). Parameters are
# split over "fsdp" along embed and over "tensor" along heads/mlp/vocab; activations keep the
# batch split over ("data", "fsdp").
DEFAULT_RULES: LogicalRules = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("lora_rank", None),
    ("relpos_buckets", None),
    ("norm", None),
)


def _fill_auto(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"{what}: at most one mesh size may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{what}: {total} devices do not divide by {known} ({sizes})")
        sizes = tuple(total // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != total:
        raise ValueError(f"{what}: mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, {total} are available")
    return sizes


def make_mesh(per_host: Sequence[int] = (-1, 1, 1), across_hosts: Sequence[int] = (1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes.

    Args:
      per_host: sizes within one host (fast interconnect); one entry may be -1.
      across_hosts: sizes across hosts (slow network); their product is the process count.
      devices: defaults to all devices of all processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_hosts = math.prod(across_hosts)
    if len(devices) % num_hosts:
        raise ValueError(f"{len(devices)} devices do not split over {num_hosts} hosts")
    per_host = _fill_auto(per_host, len(devices) // num_hosts, "per_host")
    if num_hosts == 1:
        device_grid = mesh_utils.create_device_mesh(per_host, devices, allow_split_physical_axes=True)
    else:
        # TPU slices carry slice_index; on GPU/CPU hosts the process is the granule.
        device_grid = mesh_utils.create_hybrid_device_mesh(
            per_host, tuple(across_hosts), devices,
            process_is_granule=devices[0].platform != "tpu")
    return Mesh(np.asarray(device_grid), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Context in which models are created sharded and activations are constrained."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: LogicalRules | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names under `rules` (default: the active rules)."""
    rules = flax_spmd.get_logical_axis_rules() if rules is None else rules
    return PartitionSpec(*flax_spmd.from_sharding_rules(tuple(logical_axes), rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh.

    A dimension that its mesh axes do not divide (an odd eval batch, say) is left to the
    compiler rather than failing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for size, axes in zip(x.shape, logical_to_spec(logical_axes)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        divides = size % math.prod(mesh.shape[name] for name in names) == 0
        spec.append(axes if divides else PartitionSpec.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
