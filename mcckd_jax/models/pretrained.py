"""Loading a student from a local Hugging Face checkpoint, whatever its format and family."""

from __future__ import annotations

import contextlib
import pathlib

import jax
from flax import nnx

from mcckd_jax import sharding
from mcckd_jax.models import hf_import, llama, t5

# model_type in config.json -> (config class, model class)
MODEL_TYPES = {
    "llama": (llama.LlamaConfig, llama.LlamaModel),
    "mistral": (llama.LlamaConfig, llama.LlamaModel),
    "t5": (t5.T5Config, t5.T5Model),
}


def load_pretrained(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh,
                    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
                    gguf_file: str | None = None, **config_overrides) -> nnx.Module:
    """A sharded student from a checkpoint directory (safetensors, sharded safetensors,
    pytorch_model.bin) or a GGUF file (dequantized by transformers).

    Args:
      config_overrides: fields of the model config to set, e.g. dtype="bfloat16",
        lora=LoRAConfig(...), remat_policy="full".
    """
    hf_config = hf_import.read_hf_config(path, gguf_file)
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                         f"({', '.join(sorted(MODEL_TYPES))})")
    config_cls, model_cls = MODEL_TYPES[model_type]
    config = config_cls.from_hf(hf_config, **config_overrides)
    with contextlib.ExitStack() as stack:
        tensors = hf_import.checkpoint_tensors(path, stack, gguf_file)
        return hf_import.load_named_tensors(
            lambda: model_cls(config, rngs=nnx.Rngs(0)), tensors, mesh=mesh, rules=rules,
            hf_prefix=model_cls.HF_PREFIX, hf_unprefixed=model_cls.HF_UNPREFIXED,
            ignored_names=lambda name: model_cls.hf_ignored(config, name))
