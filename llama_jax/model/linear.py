"""The one projection layer every block uses, so dtype, init, bias policy and matmul shape live in one place.

Low-rank adapters (LoRA) reach it as the optional variable collection "lora", laid out like "params" with
`{"lora_a": A, "lora_b": B}` in place of an adapted kernel (llama_jax.lora builds it, the scale folded into
B). The layer then computes x @ W + (x @ A) @ B: the backward forms only [in, r] and [r, out] gradients,
never a dense [in, out] one, and W, a "params" leaf the train step does not differentiate, gets none.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import ModelConfig


def matmul(x, w, num_contract: int = 1, out_dtype=None):
    """Contract x's last `num_contract` dims with w's first ones, as one 2-D matmul.

    x: [*lead, *k]; w: [*k, *n] -> [*lead, *n]. Flattening to [prod(lead), prod(k)] @ [prod(k), prod(n)]
    is free (a bitcast) and gives XLA one plain GEMM, forward and in both gradients. Written as a
    multi-dimensional dot_general instead, XLA:CPU picks transposed layouts for the weight gradients
    and materialises them in slow fused copies: the 30M reference MLP's forward+backward ran 1.47x
    slower that way (benchmarks/README.md).
    """
    lead, k_shape = x.shape[: x.ndim - num_contract], x.shape[x.ndim - num_contract :]
    n_shape = w.shape[num_contract:]
    k, n = int(np.prod(k_shape)), int(np.prod(n_shape))
    out = jnp.matmul(
        x.reshape(-1, k), w.reshape(k, n), preferred_element_type=out_dtype
    )  # [prod(lead), prod(n)]
    return out.reshape(*lead, *n_shape)  # [*lead, *n]


class Dense(nn.Module):
    """nn.DenseGeneral's params (kernel [*in, *out], bias [*out]) and init, computed by `matmul`.

    Kernels keep their head structure ([embed, heads, head_dim] for q/k/v, [heads, head_dim, embed] for
    the output) so that partition rules can shard heads without reshapes.
    """

    config: ModelConfig
    features: int | tuple[int, ...]
    num_contract: int = 1  # trailing input dims contracted: 1, or 2 for [heads, head_dim] -> embed

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.num_contract :]
        init = nn.initializers.normal(cfg.initializer_range)

        def kernel_init(rng, shape, dtype):
            # Drawn as the flat [in, out] matrix, exactly as nn.DenseGeneral draws it.
            return init(rng, (int(np.prod(in_shape)), int(np.prod(features))), dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, (*in_shape, *features), cfg.storage_dtype)
        x = x.astype(cfg.compute_dtype)
        y = matmul(x, kernel.astype(cfg.compute_dtype), self.num_contract)  # [*lead, *out]
        if self.has_variable("lora", "kernel"):
            ab = self.get_variable("lora", "kernel")  # A [*in, r], B [r, *out] (scale folded in)
            xa = matmul(x, ab["lora_a"].astype(cfg.compute_dtype), self.num_contract)  # [*lead, r]
            y = y + matmul(xa, ab["lora_b"].astype(cfg.compute_dtype))  # [*lead, *out]
        if cfg.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), features, cfg.storage_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        return y


def dense(config: ModelConfig, features, name: str, num_contract: int = 1) -> Dense:
    return Dense(config, features, num_contract, name=name)
