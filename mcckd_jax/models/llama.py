"""The LLaMA family (LLaMA 1/2/3, SmolLM2, Mistral-style sliding windows): its config.json.

The model is `mcckd_jax.models.decoder.DecoderModel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import decoder_config as dc
from mcckd_jax.models.rope import RopeConfig

MODEL_TYPES = ("llama", "mistral")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(dc.DecoderConfig):
    """A LLaMA-family decoder (a Mistral one when `sliding_window` is set)."""

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "LlamaConfig":
        """From a Hugging Face config (a `PretrainedConfig` or its config.json dict)."""
        hf = dc.hf_dict(hf_config)
        model_type = dc.check_model_type(hf, MODEL_TYPES, "LLaMA-family")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
        bias = hf.get("attention_bias", False)
        fields = dict(
            dc.common_fields(hf),
            rope=dc.rope_from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"),
                                 hf.get("rope_theta", 10000.0)),
            attention_bias=bias, attention_out_bias=bias, mlp_bias=hf.get("mlp_bias", False),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None)
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as LlamaForCausalLM / MistralForCausalLM."""
        mistral = self.sliding_window is not None
        return {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama", **dc.common_hf(self),
            "rope_parameters": dc.rope_to_hf(self.rope), "rope_theta": self.rope.rope_theta,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
            **({"sliding_window": self.sliding_window} if mistral else {}),
            "hidden_act": "silu",
        }


def tiny(**overrides) -> LlamaConfig:
    """A few-thousand-parameter model for tests: GQA, untied head."""
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    return LlamaConfig(**{**fields, **overrides})


def smollm2_135m(**overrides) -> LlamaConfig:
    """SmolLM2-135M(-Instruct): 30 layers, width 576, 9 heads / 3 KV heads, tied embeddings."""
    fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  rms_norm_eps=1e-5, rope=RopeConfig(rope_theta=100000.0),
                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    return LlamaConfig(**{**fields, **overrides})


def llama2_7b(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**dict(max_position_embeddings=4096, rms_norm_eps=1e-5), **overrides})


def llama2_13b(**overrides) -> LlamaConfig:
    """LLaMA(-2)-13B: 40 layers, width 5120, 40 heads (the paper's larger LLaMA student)."""
    return llama2_7b(**{**dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                               num_attention_heads=40, num_key_value_heads=40), **overrides})


def llama3_1_8b(**overrides) -> LlamaConfig:
    """Llama-3.1-8B: Llama-3-8B's shape with llama3 RoPE scaling to a 131072-token context."""
    rope = RopeConfig(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    return llama3_8b(**{**dict(rope=rope, max_position_embeddings=131072), **overrides})


def llama3_8b(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                  rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000,
                  eos_token_id=128001, rope=RopeConfig(rope_theta=500000.0))
    return LlamaConfig(**{**fields, **overrides})
