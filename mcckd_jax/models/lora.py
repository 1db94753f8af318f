"""LoRA bookkeeping: which parameters train, and merging adapters into the base weights.

The adapters themselves live in `layers.Linear` (nnx.LoRAParam variables `lora_a`, `lora_b`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models.construct import build_with_base_weights


def trainable_filter(config) -> type[nnx.Variable]:
    """The variables the optimizer updates: the adapters with LoRA, every Param without."""
    return nnx.LoRAParam if config.lora is not None else nnx.Param


def _submodule(model: nnx.Module, path: tuple) -> nnx.Module:
    for part in path:
        model = model[part] if isinstance(part, int) else getattr(model, part)
    return model


def merge_lora(model: nnx.Module, rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> nnx.Module:
    """A copy of `model` without adapters whose kernels are kernel + lora_a @ lora_b * scale.

    The merged weights keep their shardings; `model` is left unchanged.
    """
    config = model.config
    if config.lora is None:
        return model
    params = {path: variable.get_value()
              for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    mesh = next(iter(params.values())).sharding.mesh

    def merged_value(path, abstract, spec):
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in params:
            return _submodule(model, path[:-1]).merged_kernel()
        return params[path]

    merged_config = dataclasses.replace(config, lora=None)
    return build_with_base_weights(lambda: type(model)(merged_config, rngs=nnx.Rngs(0)),
                                   merged_value, mesh=mesh, rules=rules)
