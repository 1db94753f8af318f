"""The student families: the one place that names them.

A family is a config class (`from_hf` / `to_hf` for Hugging Face config.json dicts), a model
class implementing `mcckd_jax.models.student.Student`, the `model_type` values of the
checkpoints it reads, and presets (functions returning a config) for training from scratch.
Adding a family is one module plus one line in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mcckd_jax.models import decoder, gemma2, gemma3, llama, qwen2, qwen3, t5


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # what `student.family` says
    model_types: tuple[str, ...]  # config.json `model_type` values it reads
    config_cls: type  # frozen dataclass with from_hf(hf_dict, **overrides) and to_hf()
    model_cls: type  # a `Student`: model_cls(config, rngs=...)
    presets: Mapping[str, Callable[..., Any]]  # preset name -> config function


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("llama", ("llama", "mistral"), llama.LlamaConfig, decoder.DecoderModel,
           {"tiny": llama.tiny, "smollm2_135m": llama.smollm2_135m,
            "llama2_7b": llama.llama2_7b, "llama2_13b": llama.llama2_13b,
            "llama3_8b": llama.llama3_8b, "llama3_1_8b": llama.llama3_1_8b}),
    Family("qwen2", ("qwen2",), qwen2.Qwen2Config, decoder.DecoderModel,
           {"tiny": qwen2.tiny, "qwen2_5_0_5b": qwen2.qwen2_5_0_5b,
            "qwen2_5_1_5b": qwen2.qwen2_5_1_5b, "qwen2_5_7b": qwen2.qwen2_5_7b}),
    Family("qwen3", ("qwen3",), qwen3.Qwen3Config, decoder.DecoderModel,
           {"tiny": qwen3.tiny, "qwen3_0_6b": qwen3.qwen3_0_6b, "qwen3_1_7b": qwen3.qwen3_1_7b}),
    Family("gemma2", ("gemma2",), gemma2.Gemma2Config, decoder.DecoderModel,
           {"tiny": gemma2.tiny, "gemma2_2b": gemma2.gemma2_2b}),
    Family("gemma3", ("gemma3_text",), gemma3.Gemma3Config, decoder.DecoderModel,
           {"tiny": gemma3.tiny, "gemma3_1b": gemma3.gemma3_1b}),
    Family("t5", ("t5",), t5.T5Config, t5.T5Model,
           {"tiny": t5.tiny, "flan_t5_base": t5.flan_t5_base, "flan_t5_large": t5.flan_t5_large,
            "flan_t5_xl": t5.flan_t5_xl, "flan_t5_xxl": t5.flan_t5_xxl}),
)}


DEFAULT_FAMILY = "llama"  # of a student trained from a preset when the config names none


def family(name: str) -> Family:
    """The family called `name`; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown student family {name!r} ({', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def family_of_model_type(model_type: str | None, source: str) -> Family:
    """The family reading checkpoints of `model_type`; `source` (a path) names the error."""
    for candidate in FAMILIES.values():
        if model_type in candidate.model_types:
            return candidate
    known = sorted(t for candidate in FAMILIES.values() for t in candidate.model_types)
    raise ValueError(f"{source}: model_type {model_type!r} is not supported ({', '.join(known)})")


def preset_config(family_name: str, preset: str, architecture: Mapping[str, Any],
                  **numerics) -> tuple[type, Any]:
    """(model class, config) of a family's preset with Hugging Face config fields
    `architecture` set on it and our numerics fields (dtype, remat_policy, lora, ...)."""
    chosen = family(family_name)
    if preset not in chosen.presets:
        raise ValueError(f"student family {family_name} has no preset {preset!r} "
                         f"({', '.join(sorted(chosen.presets))})")
    hf_fields = {**chosen.presets[preset]().to_hf(), **architecture}
    return chosen.model_cls, chosen.config_cls.from_hf(hf_fields, **numerics)
