"""Loading a student from a local Hugging Face checkpoint, whatever its format and family."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models import hf_import, registry
from mcckd_jax.models.layers import LoRAConfig
from mcckd_jax.models.student import Layout


def checkpoint_architecture(path: str | pathlib.Path, gguf_file: str | None = None,
                            **config_overrides) -> tuple[type[nnx.Module], Any]:
    """(model class, model config) that a checkpoint's config.json (or GGUF metadata) describes;
    no weights are read."""
    hf_config = hf_import.read_hf_config(path, gguf_file)
    family = registry.family_of_model_type(hf_config.get("model_type"), str(path))
    return family.model_cls, family.config_cls.from_hf(hf_config, **config_overrides)


def load_pretrained(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh,
                    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                    gguf_file: str | None = None, init_seed: int = 0,
                    **config_overrides) -> nnx.Module:
    """A sharded student from a checkpoint directory (safetensors, sharded safetensors,
    pytorch_model.bin) or a GGUF file (dequantized by transformers).

    Args:
      init_seed: seed of what the checkpoint does not hold: fresh LoRA adapters (and the
        dropout stream).
      config_overrides: fields of the model config to set, e.g. dtype="bfloat16",
        lora=LoRAConfig(...), remat_policy="full".
    """
    model_cls, config = checkpoint_architecture(path, gguf_file, **config_overrides)
    with contextlib.ExitStack() as stack:
        tensors = hf_import.checkpoint_tensors(path, stack, gguf_file)
        return hf_import.load_named_tensors(
            lambda: model_cls(config, rngs=nnx.Rngs(init_seed)), tensors, mesh=mesh, rules=rules,
            hf_prefix=model_cls.HF_PREFIX, hf_unprefixed=model_cls.HF_UNPREFIXED,
            ignored_names=lambda name: model_cls.hf_ignored(config, name))


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Which student to train: a local Hugging Face checkpoint, or a preset from scratch."""

    family: str = registry.DEFAULT_FAMILY  # architecture of a preset (a registry.FAMILIES name)
    checkpoint: str | None = None  # local HF directory or file; None: random init from preset
    gguf_file: str | None = None  # GGUF file inside `checkpoint` (dequantized on load)
    preset: str = "tiny"  # the family's preset (tiny, smollm2_135m, ...)
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)  # HF config fields set on the preset
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype (float32 master weights with bf16 compute)
    remat_policy: str = "none"  # none, full, mlp (LLaMA: keep gate/up), dots, dots_saveable
    lora: LoRAConfig | None = None  # adapters; None trains every weight
    init_seed: int = 0  # seed of a random initialisation (and of fresh LoRA adapters)

    def __post_init__(self):
        registry.family(self.family)


def _numerics(config: StudentConfig) -> dict[str, Any]:
    return dict(dtype=config.dtype, param_dtype=config.param_dtype,
                remat_policy=config.remat_policy, lora=config.lora)


def student_architecture(config: StudentConfig) -> tuple[type[nnx.Module], Any]:
    """(model class, model config) of the student of `config`: read from the checkpoint's
    config when there is one, else the family's preset with `architecture` set on it."""
    if config.checkpoint is not None:
        return checkpoint_architecture(config.checkpoint, config.gguf_file, **_numerics(config))
    return registry.preset_config(config.family, config.preset, config.architecture,
                                  **_numerics(config))


def tokenization_layout(model_cls: type[nnx.Module]) -> Layout:
    """The data layout a student class reads: "encoder_decoder" or "decoder_only"."""
    return model_cls.LAYOUT


def student_factory(config: StudentConfig) -> Callable[[], nnx.Module]:
    """A function creating the student of `config` with random weights (no weights are read)."""
    model_cls, architecture = student_architecture(config)
    return lambda: model_cls(architecture, rngs=nnx.Rngs(config.init_seed))


def build_student(config: StudentConfig, *, mesh: jax.sharding.Mesh,
                  rules: sharding.LogicalRules = sharding.DEFAULT_RULES) -> nnx.Module:
    """The student of `config`, created sharded on `mesh`."""
    if config.checkpoint is not None:
        return load_pretrained(config.checkpoint, mesh=mesh, rules=rules,
                               gguf_file=config.gguf_file, init_seed=config.init_seed,
                               **_numerics(config))
    factory = student_factory(config)
    with sharding.activate(mesh, rules):
        return factory()
