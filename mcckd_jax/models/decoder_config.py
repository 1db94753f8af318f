"""The architecture of a decoder-only student, as switches over one transformer.

LLaMA 1-3, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 differ in a handful of
places (biases, q/k norms, where the norms sit and how they scale, the MLP's activation,
attention scaling and soft-capping, which layers see a sliding window and with which RoPE).
Each family's module subclasses `DecoderConfig` with its `from_hf` / `to_hf`; the model
(`mcckd_jax.models.decoder`) reads only these fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcckd_jax.models import layers
from mcckd_jax.models.rope import RopeConfig

SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face `layer_types` values
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and numerics; field names follow the Hugging Face config.json."""

    vocab_size: int = 32000  # V
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008  # F
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 32  # K; fewer than H is grouped-query attention
    head_dim: int | None = None  # Hd; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()  # RoPE of full-attention layers (and of all by default)
    local_rope: RopeConfig | None = None  # RoPE of sliding-window layers when it differs
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # output projection = embed_tokens^T
    attention_bias: bool = False  # biases on the q/k/v projections
    attention_out_bias: bool = False  # a bias on o_proj
    mlp_bias: bool = False  # biases on gate/up/down projections
    hidden_act: str = "silu"  # of the gated MLP: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    sliding_window: int | None = None  # tokens a sliding-window layer sees (itself included)
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING or FULL; None: all SLIDING
    #   when sliding_window is set, else all FULL
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma's 1 + w
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: Hd
    attn_logit_softcapping: float | None = None  # scores c * tanh(scores / c) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits c * tanh(logits / c) (Gemma 2)
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # stddev of the normal initialiser
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # per-layer remat: none, full, mlp, dots, dots_saveable
    lora: layers.LoRAConfig | None = None  # low-rank adapters; None trains every weight

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported "
                             f"({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers")
            if set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must be {SLIDING!r} or {FULL!r}, got "
                                 f"{sorted(set(self.layer_types) - {SLIDING, FULL})}")
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("sliding_attention layers need a sliding_window")
        layers.check_remat_policy(self.remat_policy)
        layers.dtype_of(self.dtype), layers.dtype_of(self.param_dtype)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.resolved_head_dim) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend within `sliding_window` only?"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(kind == SLIDING for kind in self.layer_types)

    def rope_of(self, sliding: bool) -> RopeConfig:
        return self.local_rope if sliding and self.local_rope is not None else self.rope


def hf_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def check_model_type(hf: Mapping[str, Any], expected: tuple[str, ...], family: str) -> str:
    model_type = hf.get("model_type", expected[0])
    if model_type not in expected:
        raise ValueError(f"model_type {model_type!r} is not a {family} decoder "
                         f"({', '.join(expected)})")
    return model_type


def rope_from_hf(params: Mapping[str, Any] | None, default_theta: float) -> RopeConfig:
    """A RopeConfig from a Hugging Face `rope_parameters` (or legacy `rope_scaling`) dict."""
    params = dict(params or {})
    params.setdefault("rope_theta", default_theta)
    params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
    known = {f.name for f in dataclasses.fields(RopeConfig)}
    return RopeConfig(**{k: v for k, v in params.items() if k in known})


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """A `rope_parameters` dict holding the fields its rope_type uses."""
    if rope.rope_type == "default":
        return {"rope_type": "default", "rope_theta": rope.rope_theta}
    if rope.rope_type == "linear":
        return {"rope_type": "linear", "rope_theta": rope.rope_theta, "factor": rope.factor}
    return dataclasses.asdict(rope)


def common_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The DecoderConfig fields that every family's config.json spells the same way."""
    eos = hf.get("eos_token_id", 2)
    # A head width equal to hidden / heads is the default: stored as None, so that a config
    # and its config.json round trip to equal configs.
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02))


def common_hf(config: DecoderConfig) -> dict[str, Any]:
    """The config.json entries that every family spells the same way."""
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.resolved_head_dim, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": eos,
        "pad_token_id": config.pad_token_id, "initializer_range": config.initializer_range,
        "torch_dtype": config.param_dtype, "dtype": config.param_dtype,
    }


def layer_types_from_hf(hf: Mapping[str, Any]) -> tuple[str, ...] | None:
    kinds = hf.get("layer_types")
    return tuple(kinds) if kinds else None
