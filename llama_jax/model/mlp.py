"""The feed-forward block: gated (SwiGLU, GeGLU) or plain (GELU, squared ReLU), per `model.mlp_activation`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model.config import ModelConfig
from llama_jax.model.linear import dense

ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # Primer (So et al. 2021)
}


class Mlp(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # x: [batch, seq, embed]
        cfg = self.config
        act = ACTIVATIONS[cfg.mlp_activation]
        # Names for the remat policies (config.REMAT_SAVES).
        up = checkpoint_name(dense(cfg, cfg.ffn_dim, "up_proj")(x), "mlp_in")  # [batch, seq, mlp]
        if cfg.gated_mlp:
            gate = checkpoint_name(dense(cfg, cfg.ffn_dim, "gate_proj")(x), "mlp_in")  # [batch, seq, mlp]
            h = act(gate) * up
        else:
            h = act(up)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(cfg, cfg.dim, "down_proj")(h)  # [batch, seq, embed]
