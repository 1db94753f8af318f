"""Device mesh, the logical-to-mesh axis rules, and the sharding of batches and states.

Models name every parameter and block-boundary activation axis with a logical name
(`embed`, `vocab`, `heads`, `act_batch`, ...); this module alone maps those names onto the
mesh axes ("data", "fsdp", "tensor"), and it alone names a mesh axis: the train loop, the
evaluation and the checkpoints ask it for batch shardings, state shardings and the
data-parallel size.

A batch's rows (questions) are split over "data" x "fsdp" (FSDP devices each hold a slice of
the weights but compute on their own rows); parameters are split over "fsdp" x "tensor".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are split over
MODEL_AXES = ("fsdp", "tensor")  # the mesh axes that split parameters

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Each logical name maps to a mesh axis, a tuple of them, or None (replicated). Parameters are
# split over "fsdp" along embed and over "tensor" along heads/mlp/vocab; activations keep the
# batch split over BATCH_AXES.
DEFAULT_RULES: LogicalRules = (
    ("act_batch", BATCH_AXES),
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


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch's rows are split (the product of the BATCH_AXES sizes)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def pure_data_parallel_size(mesh: Mesh) -> int:
    """Devices that split the batch but hold whole weights (the "data" axis)."""
    return mesh.shape["data"]


def weights_split_over_batch_axes(per_host: Sequence[int]) -> list[int]:
    """Per-host mesh sizes with the data-parallel devices moved to fsdp (same batch split,
    weights split over them too)."""
    return [1, -1, int(per_host[MESH_AXES.index("tensor")])]


def tensor_parallel_per_host(devices_per_host: int) -> list[int]:
    """Per-host mesh sizes that split every weight over "tensor" within a host."""
    sizes = [1, 1, 1]
    sizes[MESH_AXES.index("tensor")] = devices_per_host
    return sizes


def is_model_parallel(mesh: Mesh) -> bool:
    """Whether the parameters are split over more than one device (MODEL_AXES)."""
    return math.prod(mesh.shape[axis] for axis in MODEL_AXES) > 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over BATCH_AXES; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divides(rows: int, mesh: Mesh, *, what: str) -> None:
    """Raises a one-line ValueError when a global batch of `rows` rows does not split evenly
    over the data-parallel devices; `what` names the setting to change (a config field or a
    flag, with its value)."""
    size = data_parallel_size(mesh)
    if rows % size:
        raise ValueError(f"a global batch of {rows} questions does not split over the mesh's "
                         f"{' x '.join(BATCH_AXES)} = {size} devices; change {what}")


def global_batch(local_tree: Any, mesh_or_sharding: Mesh | NamedSharding) -> Any:
    """Global arrays from this process's rows of every leaf (numpy, rows first), placed with
    `batch_sharding(mesh)` or the sharding given. Every process calls it with as many rows of
    its own; the global arrays hold them all, in process order."""
    target = (batch_sharding(mesh_or_sharding) if isinstance(mesh_or_sharding, Mesh)
              else mesh_or_sharding)
    return jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(target, np.asarray(local)),
        local_tree)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings of every array leaf of `abstract_tree` (an `nnx.eval_shape` or
    `jax.eval_shape` result, or arrays), from the logical axes its nnx Variables carry; leaves
    without any (a step counter, an optimizer count, an RNG key) are replicated."""
    with activate(mesh, rules):
        specs = nnx.get_partition_spec(abstract_tree)

    def placed(spec: PartitionSpec, leaf) -> NamedSharding:
        # A leaf of lower rank than its axes say (Adafactor's factored moments carry their
        # parameter's names) is small: replicated.
        return NamedSharding(mesh, spec if len(spec) <= len(leaf.shape) else PartitionSpec())

    return jax.tree.map(placed, specs, abstract_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_with_shardings(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a tree of the same
    structure), or with None each leaf's own `.sharding`: where a restore puts arrays."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
