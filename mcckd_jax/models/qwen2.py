"""The Qwen2 / Qwen2.5 family: biases on q/k/v (none on o_proj), optional sliding windows on
the layers above `max_window_layers`. The model is `mcckd_jax.models.decoder.DecoderModel`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import decoder_config as dc
from mcckd_jax.models.rope import RopeConfig


def sliding_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """sliding_window and layer_types as transformers' Qwen2/Qwen3 configs derive them: a
    window only with use_sliding_window, on layers from max_window_layers up."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    kinds = dc.layer_types_from_hf(hf)
    if kinds is None:
        first = hf.get("max_window_layers", hf["num_hidden_layers"])
        kinds = tuple(dc.SLIDING if window is not None and i >= first else dc.FULL
                      for i in range(hf["num_hidden_layers"]))
    if window is None:  # transformers attends globally without a window, whatever the types
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=kinds)


def sliding_hf(config: dc.DecoderConfig) -> dict[str, Any]:
    sliding = any(config.sliding_layers)
    return {"use_sliding_window": sliding, "sliding_window": config.sliding_window,
            "max_window_layers": config.sliding_layers.index(True) if sliding
            else config.num_hidden_layers,
            "layer_types": [dc.SLIDING if s else dc.FULL for s in config.sliding_layers]}


@dataclasses.dataclass(frozen=True)
class Qwen2Config(dc.DecoderConfig):
    """A Qwen2 / Qwen2.5 decoder."""

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any] | Any, **overrides) -> "Qwen2Config":
        hf = dc.hf_dict(hf_config)
        dc.check_model_type(hf, ("qwen2",), "Qwen2")
        fields = dict(dc.common_fields(hf), **sliding_fields(hf),
                      rope=dc.rope_from_hf(hf.get("rope_parameters") or hf.get("rope_scaling"),
                                           hf.get("rope_theta", 10000.0)),
                      hidden_act=hf.get("hidden_act", "silu"), attention_bias=True,
                      attention_out_bias=False)
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                **dc.common_hf(self), **sliding_hf(self),
                "rope_parameters": dc.rope_to_hf(self.rope), "rope_theta": self.rope.rope_theta,
                "hidden_act": self.hidden_act}


def tiny(**overrides) -> Qwen2Config:
    """A few-thousand-parameter Qwen2 for tests: GQA, biases, untied head."""
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, attention_bias=True, rope=RopeConfig(rope_theta=1e6))
    return Qwen2Config(**{**fields, **overrides})


def qwen2_5_0_5b(**overrides) -> Qwen2Config:
    """Qwen2.5-0.5B(-Instruct): 24 layers, width 896, 14 heads / 2 KV heads, tied embeddings."""
    fields = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope=RopeConfig(rope_theta=1e6),
                  max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    return Qwen2Config(**{**fields, **overrides})


def qwen2_5_1_5b(**overrides) -> Qwen2Config:
    """Qwen2.5-1.5B(-Instruct): 28 layers, width 1536, 12 heads / 2 KV heads, tied."""
    return qwen2_5_0_5b(**{**dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12), **overrides})


def qwen2_5_7b(**overrides) -> Qwen2Config:
    """Qwen2.5-7B(-Instruct): 28 layers, width 3584, 28 heads / 4 KV heads, untied head."""
    return qwen2_5_0_5b(**{**dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                  num_hidden_layers=28, num_attention_heads=28,
                                  num_key_value_heads=4, tie_word_embeddings=False),
                           **overrides})
