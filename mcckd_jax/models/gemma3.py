"""The Gemma 3 family (text decoder, `Gemma3ForCausalLM`): Gemma 2 without soft-capping, plus
(1 + w) RMSNorms on each head's queries and keys, five sliding-window layers per global one,
and a separate RoPE base for the sliding layers.
The model is `mcckd_jax.models.decoder.DecoderModel`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import decoder_config as dc
from mcckd_jax.models.gemma2 import gemma_fields, gemma_hf
from mcckd_jax.models.rope import RopeConfig


def _ropes(hf: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) RoPE from per-layer-type `rope_parameters` (transformers 5) or the
    older rope_theta / rope_local_base_freq / rope_scaling fields."""
    params = hf.get("rope_parameters") or {}
    if dc.FULL in params or dc.SLIDING in params:
        return (dc.rope_from_hf(params.get(dc.FULL), 1_000_000.0),
                dc.rope_from_hf(params.get(dc.SLIDING), 10_000.0))
    return (dc.rope_from_hf(hf.get("rope_scaling"), hf.get("rope_theta", 1_000_000.0)),
            RopeConfig(rope_theta=hf.get("rope_local_base_freq", 10_000.0)))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(dc.DecoderConfig):
    """A Gemma 3 text decoder."""

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "Gemma3Config":
        hf = dc.hf_dict(hf_config)
        dc.check_model_type(hf, ("gemma3_text",), "Gemma 3 text")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention (EmbeddingGemma) is not supported")
        rope, local_rope = _ropes(hf)
        fields = dict(gemma_fields(hf, sliding_pattern=hf.get("sliding_window_pattern", 6)),
                      rope=rope, local_rope=local_rope, qk_norm=True,
                      attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                      final_logit_softcapping=hf.get("final_logit_softcapping"))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        local = self.local_rope or self.rope
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                **gemma_hf(self),
                "rope_parameters": {dc.FULL: dc.rope_to_hf(self.rope),
                                    dc.SLIDING: dc.rope_to_hf(local)}}


def _gemma3(**fields) -> Gemma3Config:
    defaults = dict(norm_offset=1.0, sandwich_norms=True, scale_embeddings=True, qk_norm=True,
                    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6,
                    rope=RopeConfig(rope_theta=1_000_000.0),
                    local_rope=RopeConfig(rope_theta=10_000.0),
                    bos_token_id=2, eos_token_id=1, pad_token_id=0)
    defaults.update(fields)
    defaults.setdefault("layer_types", tuple(dc.SLIDING if (i + 1) % 6 else dc.FULL
                                             for i in range(defaults["num_hidden_layers"])))
    return Gemma3Config(**defaults)


def tiny(**overrides) -> Gemma3Config:
    """A few-thousand-parameter Gemma 3 for tests: two sliding layers then a global one,
    head_dim 16, window 8."""
    return _gemma3(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                             max_position_embeddings=128,
                             layer_types=(dc.SLIDING, dc.SLIDING, dc.FULL)), **overrides})


def gemma3_1b(**overrides) -> Gemma3Config:
    """Gemma-3-1B(-it): 26 layers, width 1152, 4 heads / 1 KV head of 256, window 512."""
    return _gemma3(**{**dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                             num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                             max_position_embeddings=32768), **overrides})
