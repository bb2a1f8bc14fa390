"""The one projection layer every block uses, so dtype, init and bias policy live in one place."""

from __future__ import annotations

import flax.linen as nn

from llama_jax.config import ModelConfig


def dense(config: ModelConfig, features, name: str, axis=-1) -> nn.DenseGeneral:
    """A DenseGeneral computing in `config.dtype` over params stored in `config.param_dtype`.

    Kernels keep their head structure ([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for
    the output) so that partition rules can shard heads without reshapes.
    """
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=config.use_bias,
        dtype=config.compute_dtype,
        param_dtype=config.storage_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )
