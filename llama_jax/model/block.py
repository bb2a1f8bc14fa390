"""One pre-norm decoder block: sequential (LLaMA) or parallel (GPT-J/PaLM) attention and MLP."""

from __future__ import annotations

import flax.linen as nn
import jax

from llama_jax.model.attention import Attention
from llama_jax.model.config import REMAT_SAVES, ModelConfig
from llama_jax.model.mlp import Mlp
from llama_jax.model.norm import Norm


class Block(nn.Module):
    """Its call signature is nn.scan's: the residual stream is the carry, a layer's KV buffers the slice."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache_meta, kv_layer):
        """x: [batch, seq, embed] -> ([batch, seq, embed], updated (k_buf, v_buf) or None).

        cache_meta: (k_segment_ids [batch, max_len], index) shared by all layers, or None;
        kv_layer: this layer's (k_buf, v_buf), each [batch, kv_heads, max_len, head_dim], or None.
        """
        cfg = self.config
        kv_cache = None if kv_layer is None else (*kv_layer, *cache_meta)
        x = nn.with_logical_constraint(x, ("batch", "residual_length", "embed"))
        h = Norm(cfg, name="attn_norm")(x)
        attn_out, new_kv = Attention(cfg, name="attn")(h, positions, segment_ids, kv_cache)
        if cfg.parallel_block:
            # One shared norm feeds both branches, as in GPT-J and PaLM.
            x = x + attn_out + Mlp(cfg, name="mlp")(h)
        else:
            x = x + attn_out
            x = x + Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        # The output is the next layer's input, which every remat policy saves: placed like the input.
        return nn.with_logical_constraint(x, ("batch", "residual_length", "embed")), new_kv


def block_class(config: ModelConfig):
    """Block, wrapped in nn.remat by `model.remat_policy`: it saves exactly the activations that
    REMAT_SAVES names for the policy (the names are `checkpoint_name`s in attention.py and mlp.py)."""
    if config.remat_policy == "none":
        return Block
    policy = jax.checkpoint_policies.save_only_these_names(*REMAT_SAVES[config.remat_policy])
    # prevent_cse is only needed outside scan; inside, it would block useful XLA optimisations.
    return nn.remat(Block, policy=policy, prevent_cse=not config.scan_layers)
