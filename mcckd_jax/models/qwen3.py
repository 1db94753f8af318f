"""The Qwen3 family: RMSNorm on each head's queries and keys, a head width independent of
the hidden size. The model is `mcckd_jax.models.decoder.DecoderModel`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import decoder_config as dc
from mcckd_jax.models.qwen2 import sliding_fields, sliding_hf
from mcckd_jax.models.rope import RopeConfig


@dataclasses.dataclass(frozen=True)
class Qwen3Config(dc.DecoderConfig):
    """A Qwen3 (dense) decoder."""

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "Qwen3Config":
        hf = dc.hf_dict(hf_config)
        dc.check_model_type(hf, ("qwen3",), "Qwen3")
        bias = bool(hf.get("attention_bias", False))
        fields = dict(dc.common_fields(hf), **sliding_fields(hf),
                      rope=dc.rope_from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"),
                                           hf.get("rope_theta", 10000.0)),
                      hidden_act=hf.get("hidden_act", "silu"), attention_bias=bias,
                      attention_out_bias=bias, qk_norm=True)
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                **dc.common_hf(self), **sliding_hf(self),
                "rope_parameters": dc.rope_to_hf(self.rope), "rope_theta": self.rope.rope_theta,
                "attention_bias": self.attention_bias, "hidden_act": self.hidden_act}


def tiny(**overrides) -> Qwen3Config:
    """A few-thousand-parameter Qwen3 for tests: GQA, head_dim 16 != 32 / 4, untied head."""
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, rms_norm_eps=1e-6, qk_norm=True,
                  rope=RopeConfig(rope_theta=1e6))
    return Qwen3Config(**{**fields, **overrides})


def qwen3_0_6b(**overrides) -> Qwen3Config:
    """Qwen3-0.6B: 28 layers, width 1024, 16 heads / 8 KV heads of 128, tied embeddings."""
    fields = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, rms_norm_eps=1e-6, rope=RopeConfig(rope_theta=1e6),
                  max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    return Qwen3Config(**{**fields, **overrides})


def qwen3_1_7b(**overrides) -> Qwen3Config:
    """Qwen3-1.7B: 28 layers, width 2048, 16 heads / 8 KV heads of 128, tied embeddings."""
    # head_dim None: 2048 / 16 = 128 is the default width (configs store it so).
    return qwen3_0_6b(**{**dict(hidden_size=2048, intermediate_size=6144, head_dim=None),
                         **overrides})
