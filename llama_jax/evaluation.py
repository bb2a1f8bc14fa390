"""Held-out evaluation: every target token scored once; loss, perplexity and bits-per-byte.

bits/byte = (total NLL in nats) / (UTF-8 bytes of the scored text * ln 2). Unlike per-token loss it does
not depend on the tokenizer, so byte-level and BPE models are compared on one scale.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def evaluate(eval_step, shard_batch, params, batches, num_bytes: int) -> dict[str, float]:
    """Run `eval_step` over `batches` (this process's rows of every eval batch, in order).

    eval_step: (params, global batch) -> {"nll_sum", "tokens"}; shard_batch: local batch -> global batch;
    num_bytes: UTF-8 bytes of the text the scored targets encode.
    """
    nll = jnp.zeros((), jnp.float32)
    tokens = jnp.zeros((), jnp.float32)
    for batch in batches:
        sums = eval_step(params, shard_batch(batch))
        # Accumulated on device: no host sync per batch.
        nll, tokens = nll + sums["nll_sum"], tokens + sums["tokens"]
    nll, tokens = float(jax.device_get(nll)), float(jax.device_get(tokens))
    if tokens == 0:
        raise ValueError("the evaluation split has no target tokens; check config.data.eval_split.")
    loss = nll / tokens
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(loss),
        "eval/bits_per_byte": nll / (num_bytes * math.log(2)),
        "eval/tokens": tokens,
        "eval/bytes": float(num_bytes),
    }
