"""The student an evaluation decodes with: from a training run's checkpoint (weights only,
adapters merged) or as its training config describes it (a Hugging Face checkpoint, or the
random initialisation a from-scratch run starts from)."""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models import lora, pretrained
from mcckd_jax.train import checkpointing, state as train_state


def _sharded_template(abstract: nnx.State, mesh: jax.sharding.Mesh,
                      rules: sharding.LogicalRules) -> nnx.State:
    """ShapeDtypeStructs carrying the shardings that the variables' logical axes ask for."""
    return sharding.abstract_with_shardings(abstract,
                                            sharding.tree_shardings(abstract, mesh, rules))


def restore_student(run_dir: str | pathlib.Path, student: pretrained.StudentConfig, *,
                    mesh: jax.sharding.Mesh,
                    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                    step: int | None = None) -> tuple[int, nnx.Module]:
    """(step, student) from `run_dir`/checkpoints (default: the latest step).

    Only the model items are read (no optimizer or data state), straight into their shardings
    on `mesh`; LoRA adapters are merged into the kernels.
    """
    factory = pretrained.student_factory(student)
    with sharding.activate(mesh, rules):
        graphdef, params, model_state = train_state.split_model(nnx.eval_shape(factory))
    step, params, model_state = checkpointing.restore_params(
        run_dir, _sharded_template(params, mesh, rules), _sharded_template(model_state, mesh, rules),
        step=step)
    model = nnx.merge(graphdef, params, model_state)
    return step, lora.merge_lora(model, rules)


def initial_student(student: pretrained.StudentConfig, *, mesh: jax.sharding.Mesh,
                    rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> nnx.Module:
    """The student as training starts from it (its checkpoint, or its random init)."""
    return lora.merge_lora(pretrained.build_student(student, mesh=mesh, rules=rules), rules)
