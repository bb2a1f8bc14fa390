"""The LLaMA model: pure Flax, no mesh, no I/O. Modules in reading order:

config -> linear -> norm -> rope -> attention -> mlp -> block -> transformer; params (the pytree and its
layouts); loss (token-weighted cross-entropy sums).
"""

from llama_jax.model.attention import for_platform
from llama_jax.model.config import PRESETS, REMAT_POLICIES, REMAT_SAVES, ModelConfig, preset
from llama_jax.model.loss import batch_loss_sums, loss_sums, target_mask
from llama_jax.model.params import (
    count_params,
    init_params,
    kernel_input_dims,
    param_shapes,
    path_str,
    stack_layers,
    to_layout,
    unstack_layers,
)
from llama_jax.model.transformer import KVCache, Llama

__all__ = [
    "PRESETS",
    "REMAT_POLICIES",
    "REMAT_SAVES",
    "KVCache",
    "Llama",
    "ModelConfig",
    "batch_loss_sums",
    "count_params",
    "for_platform",
    "init_params",
    "kernel_input_dims",
    "loss_sums",
    "param_shapes",
    "path_str",
    "preset",
    "stack_layers",
    "target_mask",
    "to_layout",
    "unstack_layers",
]
