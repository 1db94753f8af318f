"""Rotary position embeddings (the Hugging Face "rotate half" layout), with llama3 and linear
frequency scaling.

Shape legend: B batch, L length, H heads, Hd head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies; the fields of a Hugging Face `rope_parameters` dict."""

    rope_theta: float = 10000.0  # base period
    rope_type: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0  # context extension factor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the pre-training context length

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported "
                             "(default, linear, llama3)")


def inverse_frequencies(config: RopeConfig, head_dim: int) -> np.ndarray:
    """[Hd / 2] float32 inverse frequencies, computed in float32 as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.factor)
    elif config.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, config)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, config: RopeConfig) -> np.ndarray:
    original = config.original_max_position_embeddings
    low_freq_wavelen = original / config.low_freq_factor
    high_freq_wavelen = original / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / config.factor, inv_freq)
    smooth = (original / wavelen - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor)
    smoothed = (1 - smooth) * scaled / config.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_angles(positions_BL: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [B, L, Hd] float32, for integer positions."""
    angles_BLh = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_BLHd = jnp.concatenate([angles_BLh, angles_BLh], axis=-1)
    return jnp.cos(angles_BLHd), jnp.sin(angles_BLHd)


def apply_rotary(x_BLHHd: jax.Array, cos_BLHd: jax.Array, sin_BLHd: jax.Array) -> jax.Array:
    """Rotates query or key heads [B, L, H, Hd]; the angles are cast to x's dtype first."""
    cos = cos_BLHd[:, :, None, :].astype(x_BLHHd.dtype)
    sin = sin_BLHd[:, :, None, :].astype(x_BLHHd.dtype)
    half = x_BLHHd.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLHHd[..., half:], x_BLHHd[..., :half]], axis=-1)
    return x_BLHHd * cos + rotated * sin
