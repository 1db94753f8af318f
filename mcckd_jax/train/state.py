"""The train state: a small pytree of step, trainable params, the rest of the model state and
the optimizer state, created directly with its final shardings."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models.lora import trainable_filter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes. `params` is what the optimizer updates (LoRA adapters, or
    every weight); `model_state` is the rest of the model (frozen base weights under LoRA,
    dropout RNG streams), which the step carries through unchanged except for RNG counts."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State
    model_state: nnx.State
    opt_state: Any


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else) of a student."""
    return nnx.split(model, trainable_filter(model.config), ...)


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                       mesh: jax.sharding.Mesh, rules: sharding.LogicalRules = sharding.DEFAULT_RULES
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, state shardings) for a student whose weights are already placed.

    The optimizer state is created by one jitted call with explicit out_shardings, so it is
    born sharded like the parameters it mirrors.
    """
    graphdef, params, model_state = split_model(model)
    build = _state_builder(optimizer)
    _, shardings = abstract_train_state(params, model_state, optimizer, mesh=mesh, rules=rules)
    with sharding.activate(mesh, rules):
        state = jax.jit(build, out_shardings=shardings)(params, model_state)
    return graphdef, state, shardings


def _state_builder(optimizer: optax.GradientTransformation):
    def build(params, model_state):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=optimizer.init(params))
    return build


def abstract_train_state(params: nnx.State, model_state: nnx.State,
                         optimizer: optax.GradientTransformation, *, mesh: jax.sharding.Mesh,
                         rules: sharding.LogicalRules = sharding.DEFAULT_RULES
                         ) -> tuple[TrainState, TrainState]:
    """(the state's ShapeDtypeStructs, its NamedShardings) for the parameters and model state
    of a student, real or abstract (`nnx.eval_shape`): what `create_train_state` builds,
    without allocating it."""
    with sharding.activate(mesh, rules):
        abstract = jax.eval_shape(_state_builder(optimizer), params, model_state)
    return abstract, sharding.tree_shardings(abstract, mesh, rules)


def replicated_fraction(state: TrainState, mesh: jax.sharding.Mesh) -> float:
    """Share of parameter + optimizer bytes that every device holds in full."""
    if mesh.size == 1:
        return 0.0
    total = replicated = 0
    for leaf in jax.tree.leaves((state.params, state.model_state, state.opt_state)):
        if not hasattr(leaf, "sharding") or leaf.size < 2:
            continue
        total += leaf.nbytes
        if leaf.sharding.is_fully_replicated:
            replicated += leaf.nbytes
    return replicated / total if total else 0.0
