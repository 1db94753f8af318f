"""Building blocks shared by the students: linear maps with LoRA, embeddings, RMS norm.

Every parameter carries logical axis names (`out_sharding`), which `mcckd_jax.sharding`
maps onto the mesh. Parameters are stored in `param_dtype` and cast to the compute `dtype`
at use. Kernels are stored [in, out] (Hugging Face stores [out, in]).

Shape legend: B batch, L length, D model width, V vocabulary, R LoRA rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on selected linear maps; the base weights stay frozen."""

    rank: int = 8  # R, the adapter rank
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input, training only
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # HF names of the adapted maps

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def normal_init(stddev: float):
    return jax.nn.initializers.normal(stddev)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ dropout(x) @ lora_a @ lora_b * alpha / rank)."""

    def __init__(self, in_features: int, out_features: int, *, logical_axes: tuple[str, str],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_stddev: float = 0.02, lora: LoRAConfig | None = None,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(
            normal_init(init_stddev)(rngs.params(), (in_features, out_features), param_dtype),
            out_sharding=logical_axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype),
                               out_sharding=logical_axes[1:]) if use_bias else None)
        self.lora_scale = lora.scale if lora else None
        if lora:
            # As PEFT: A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so
            # a fresh adapter leaves the base model unchanged.
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), (in_features, lora.rank), param_dtype,
                                   -bound, bound), out_sharding=(logical_axes[0], "lora_rank"))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), param_dtype),
                                        out_sharding=("lora_rank", logical_axes[1]))
            self.lora_dropout = nnx.Dropout(lora.dropout, rngs=rngs)
        else:
            self.lora_a = self.lora_b = self.lora_dropout = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            adapter_in = self.lora_dropout(x)
            update = (adapter_in @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(
                self.dtype)
            y = y + update * self.lora_scale
        return y

    def merged_kernel(self) -> jax.Array:
        """kernel + lora_a @ lora_b * scale, in the kernel's dtype (float32 accumulation)."""
        kernel = self.kernel[...]
        if self.lora_a is None:
            return kernel
        update = jnp.matmul(self.lora_a[...].astype(jnp.float32),
                            self.lora_b[...].astype(jnp.float32)) * self.lora_scale
        return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` is the tied output projection."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_stddev: float = 0.02, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(
            normal_init(init_stddev)(rngs.params(), (num_embeddings, features), param_dtype),
            out_sharding=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, statistics in float32 (LLaMA's RMSNorm and T5's LayerNorm).

    With `offset` (Gemma's 1) it scales by offset + weight, in float32 before the cast back,
    as Gemma's RMSNorm does; its weight then starts at 0.
    """

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 offset: float = 0.0, rngs: nnx.Rngs | None = None):
        del rngs  # no random initialisation
        self.eps = eps
        self.dtype = dtype
        self.offset = offset
        self.weight = nnx.Param(jnp.full((features,), 1.0 - offset, param_dtype),
                                out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x itself when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def project_to_vocab(hidden: jax.Array, output_weight_DV: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from hidden states [..., D]."""
    return jnp.einsum("...d,dv->...v", hidden, output_weight_DV.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Keeps the MLP's gate and up projections (named by decoder.MLP; 61% of a layer's matmul
    # FLOPs) and recomputes the rest. SmolLM2-135M step, 2,048 tokens: 0.59x PyTorch's peak
    # memory against 0.49x for "full", 10% faster (benchmarks/RESULTS.md).
    "mlp": jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"),
}


def check_remat_policy(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {name!r}")


def dtype_of(name: str):
    """jnp dtype from a config string ('float32', 'bfloat16', 'float16'; 'float64' for exact
    references in tests, under jax.enable_x64)."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
                "float64": jnp.float64}[name]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def lora_for(name: str, lora: LoRAConfig | None) -> LoRAConfig | None:
    """The LoRA config for the linear map called `name`, if it is a target."""
    return lora if lora is not None and name in lora.target_modules else None
