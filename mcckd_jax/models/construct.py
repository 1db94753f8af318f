"""Creating a model around externally supplied base weights without materialising it twice."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from flax import nnx

from mcckd_jax import sharding

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # weights that checkpoints carry


def abstract_model(model_factory: Callable[[], nnx.Module], *, mesh: jax.sharding.Mesh,
                   rules: sharding.LogicalRules = sharding.DEFAULT_RULES
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, base weights as sharded ShapeDtypeStructs) of `model_factory()`; computes
    nothing."""
    with sharding.activate(mesh, rules):
        graphdef, base_abstract, _ = nnx.split(nnx.eval_shape(model_factory), BASE, ...)
    return graphdef, base_abstract


def build_with_base_weights(model_factory: Callable[[], nnx.Module],
                            base_values: Callable[[tuple, jax.ShapeDtypeStruct, jax.sharding.PartitionSpec], jax.Array],
                            *, mesh: jax.sharding.Mesh,
                            rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                            abstract: tuple[nnx.GraphDef, nnx.State] | None = None) -> nnx.Module:
    """`model_factory()` with each base weight given by `base_values(path, abstract, spec)`.

    Everything else (LoRA adapters, RNG state) is initialised by the factory inside one jitted
    call whose base-weight outputs are dropped, so XLA never computes them. `abstract` is
    `abstract_model(...)` when the caller already traced the factory.
    """
    graphdef, base_abstract = abstract or abstract_model(model_factory, mesh=mesh, rules=rules)
    with sharding.activate(mesh, rules):
        others = jax.jit(lambda: nnx.split(model_factory(), BASE, ...)[2])()
        specs: Mapping = dict(nnx.to_flat_state(nnx.get_partition_spec(base_abstract)))
    base_state = nnx.from_flat_state([
        (path, variable.replace(base_values(path, variable.get_value(), specs[path].get_value())))
        for path, variable in nnx.to_flat_state(base_abstract)])
    return nnx.merge(graphdef, base_state, others)
