"""Normalisation layers: RMSNorm (LLaMA) and LayerNorm, chosen by `model.norm`."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llama_jax.model.config import ModelConfig


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in f32 whatever the compute dtype.

    bf16 variance estimates lose several bits over wide models; normalising in f32 is what LLaMA's
    reference code and HF do, and it keeps parity with them.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.config.storage_dtype)
        h = x.astype(jnp.float32)
        if self.config.norm == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.config.norm_eps))
        h = h * scale.astype(jnp.float32)
        if self.config.norm == "layernorm":
            h = h + self.param("bias", nn.initializers.zeros, (width,), self.config.storage_dtype).astype(jnp.float32)
        return h.astype(self.config.compute_dtype)
