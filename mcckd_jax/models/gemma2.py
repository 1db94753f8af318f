"""The Gemma 2 family: (1 + w) RMSNorms before and after attention and the MLP, embeddings
scaled by sqrt(hidden), GeGLU, `query_pre_attn_scalar`, attention-logit and final-logit
soft-capping, sliding-window layers alternating with global ones.
The model is `mcckd_jax.models.decoder.DecoderModel`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import decoder_config as dc


def gemma_fields(hf: Mapping[str, Any], sliding_pattern: int) -> dict[str, Any]:
    """The fields Gemma 2 and Gemma 3 read alike; layer types default to every
    `sliding_pattern`-th layer global, as transformers does."""
    kinds = dc.layer_types_from_hf(hf) or tuple(
        dc.SLIDING if (i + 1) % sliding_pattern else dc.FULL
        for i in range(hf["num_hidden_layers"]))
    common = dc.common_fields(hf)
    common["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
    return dict(common, layer_types=kinds, sliding_window=hf.get("sliding_window", 4096),
                hidden_act=hf.get("hidden_activation") or hf.get("hidden_act")
                or "gelu_pytorch_tanh",
                attention_bias=hf.get("attention_bias", False),
                attention_out_bias=hf.get("attention_bias", False),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                norm_offset=1.0, sandwich_norms=True, scale_embeddings=True)


def gemma_hf(config: dc.DecoderConfig) -> dict[str, Any]:
    return {**dc.common_hf(config), "layer_types": list(config.layer_types or ()),
            "sliding_window": config.sliding_window, "hidden_activation": config.hidden_act,
            "attention_bias": config.attention_bias,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping}


@dataclasses.dataclass(frozen=True)
class Gemma2Config(dc.DecoderConfig):
    """A Gemma 2 decoder."""

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "Gemma2Config":
        hf = dc.hf_dict(hf_config)
        dc.check_model_type(hf, ("gemma2",), "Gemma 2")
        fields = dict(gemma_fields(hf, sliding_pattern=2),
                      rope=dc.rope_from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"),
                                           hf.get("rope_theta", 10000.0)),
                      attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                      final_logit_softcapping=hf.get("final_logit_softcapping"))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
                **gemma_hf(self), "rope_parameters": dc.rope_to_hf(self.rope),
                "rope_theta": self.rope.rope_theta}


def _gemma2(**fields) -> Gemma2Config:
    defaults = dict(norm_offset=1.0, sandwich_norms=True, scale_embeddings=True,
                    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    defaults.update(fields)
    defaults.setdefault("layer_types", tuple(dc.SLIDING if (i + 1) % 2 else dc.FULL
                                             for i in range(defaults["num_hidden_layers"])))
    return Gemma2Config(**defaults)


def tiny(**overrides) -> Gemma2Config:
    """A few-thousand-parameter Gemma 2 for tests: a sliding layer then a global one,
    soft-capping at 50 / 30, head_dim 16, window 8."""
    return _gemma2(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                             max_position_embeddings=128), **overrides})


def gemma2_2b(**overrides) -> Gemma2Config:
    """Gemma-2-2B(-it): 26 layers, width 2304, 8 heads / 4 KV heads of 256, window 4096."""
    return _gemma2(**{**dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                             num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                             max_position_embeddings=8192), **overrides})
