"""Rotary position embeddings, with Llama-3.1 frequency scaling.

Convention: the *half-split* rotation (GPT-NeoX / HF transformers): dimension i of a head is paired with
dimension i + head_dim/2. Meta's original checkpoints pair interleaved dimensions (2i, 2i+1); HF's
conversion script permutes the q/k projection rows so that HF checkpoints use half-split, which is why
HF weights import here unchanged, and why `llama_jax.tools.hf` documents that it expects HF-format weights.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, theta- and (optionally) llama3-scaled. Static numpy."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if config.rope_scaling == "llama3":
        factor = config.rope_scaling_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, and the band
        # between is interpolated smoothly: exactly Meta's `apply_scaling` in llama3.1's model.py.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate x by its positions.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int; inv_freq: [head_dim // 2].
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [batch, seq, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [batch, seq, 1, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)  # 2 x [batch, seq, heads, head_dim/2]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [batch, seq, heads, head_dim]
    return out.astype(x.dtype)
