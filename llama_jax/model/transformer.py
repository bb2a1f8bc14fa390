"""The LLaMA model: embedding -> N decoder blocks -> final norm -> LM head.

    logits = Llama(config).apply({"params": params}, tokens)                  # [batch, seq, vocab], f32
    logits, cache = Llama(config).apply({"params": params}, tokens, cache=c)  # incremental decoding

Params are a plain pytree (model/params.py: init, shapes, the two layer layouts).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.block import block_class
from llama_jax.model.config import ModelConfig
from llama_jax.model.linear import matmul
from llama_jax.model.norm import Norm


@flax.struct.dataclass
class KVCache:
    """Key/value buffers for incremental decoding, laid out as the params are.

    With `scan_layers`, k and v are arrays stacked over layers, which nn.scan slices; otherwise they are
    tuples of per-layer arrays, so that a decode step updates each buffer in place instead of slicing
    it out of, and stacking it back into, one array (which copied the whole cache 3 times per token).
    Buffers are heads-major, [batch, kv_heads, max_len, head_dim]: the layout both attention matmuls
    read without a transpose.
    """

    k: jax.Array | tuple[jax.Array, ...]  # [layers, batch, kv_heads, max_len, head_dim] or per layer
    v: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array  # [batch, max_len] int32; 0 marks an empty (or padding) slot
    index: jax.Array  # [] int32: the slot the next token is written to

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        dtype = dtype or config.compute_dtype
        if config.scan_layers:
            k = jnp.zeros((config.num_layers, *shape), dtype)
            v = jnp.zeros((config.num_layers, *shape), dtype)
        else:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(
            k=k,
            v=v,
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def head_logits(x, kernel):
    """x: [batch, seq, embed] @ kernel [embed, vocab] -> [batch, seq, vocab] logits.

    Accumulated and returned in f32 whatever the compute dtype: the loss needs full-precision logits.
    """
    return matmul(x, kernel.astype(x.dtype), out_dtype=jnp.float32)


def head_kernel(config: ModelConfig, params):
    """The LM head's [embed, vocab] matrix in `params`: its own, or the embedding's transpose when tied."""
    return params["embed"]["embedding"].T if config.tie_embeddings else params["lm_head"]["kernel"]


class LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # x: [batch, seq, embed]
        cfg = self.config
        kernel = self.param(
            "kernel", nn.initializers.normal(cfg.initializer_range), (cfg.dim, cfg.vocab_size), cfg.storage_dtype
        )
        return head_logits(x, kernel)  # [batch, seq, vocab]


class Llama(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, head: bool = True):
        """tokens: [batch, seq] int.

        positions: [batch, seq] RoPE positions (default: slot index; packed data passes its own).
        segment_ids: [batch, seq]; tokens attend only within their segment; 0 marks padding.
        cache: a KVCache; this call's tokens fill slots cache.index.. and the call returns (logits, cache).
        head: False returns the final norm's output [batch, seq, embed] instead of logits, for a loss that
            applies the head itself (`head_kernel`, `head_logits`; model/loss.py does, in chunks).
        """
        cfg = self.config
        batch, seq = tokens.shape
        start = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.dim,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
            name="embed",
        )
        x = embed(tokens)  # [batch, seq, embed]
        x = nn.with_logical_constraint(x, ("batch", "residual_length", "embed"))

        cache_meta = kv = None
        if cache is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((batch, seq), jnp.int32)
            k_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, start, axis=1)
            cache_meta = (k_segment_ids, start)
            kv = (cache.k, cache.v)

        block = block_class(cfg)
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0, "lora": 0},  # adapters are stacked like their kernels
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
            )(cfg, name="layers")
            x, new_kv = layers(x, positions, segment_ids, cache_meta, kv)
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                kv_i = None if kv is None else (kv[0][i], kv[1][i])
                x, new_kv_i = block(cfg, name=f"layers_{i}")(x, positions, segment_ids, cache_meta, kv_i)
                per_layer.append(new_kv_i)
            new_kv = None if kv is None else tuple(zip(*per_layer))

        x = Norm(cfg, name="final_norm")(x)
        if not head:
            return x
        if cfg.tie_embeddings:
            logits = head_logits(x, embed.embedding.T)  # [batch, seq, vocab]
        else:
            logits = LMHead(cfg, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, KVCache(k=new_kv[0], v=new_kv[1], segment_ids=cache_meta[0], index=start + seq)


# ---------------------------------------------------------------------- params helpers
