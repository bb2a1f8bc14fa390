"""Next-token cross-entropy as token-weighted sums, shared by the train step and evaluation.

Sums, not means: a step divides the sums of all its microbatches once, and an evaluation adds the sums of
every batch and divides once, so no result depends on how tokens are split into sequences or batches.

With `model.loss_chunk` the LM head and the cross-entropy run over chunks of the sequence, each under
`jax.checkpoint`: the f32 logits exist for one [batch, chunk, vocab] block at a time, forward and
backward (the backward recomputes a chunk's logits from its hidden states), instead of all
[batch, seq, vocab] of them (15.7 GiB per chip for Llama-3-8B at 4 x 8192 tokens per chip). The loss
stays exact f32 math; only the summation order changes.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.transformer import head_kernel, head_logits


def target_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[batch, seq] f32 weights of the targets: loss_mask (default 1), and 0 on padding (segment 0)."""
    targets = batch["targets"]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    if batch.get("segment_ids") is not None:
        mask = mask * (batch["segment_ids"] != 0).astype(jnp.float32)
    return mask


def loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed (not averaged) token losses, so that sums over microbatches/hosts can be divided once.

    logits: [batch, seq, vocab]; targets: [batch, seq] int; mask: [batch, seq] f32.
    Returns nll_sum (cross-entropy), z_sum (sum of logsumexp(logits)^2, PaLM's z-loss before its
    coefficient) and tokens (sum of the mask), all f32 scalars.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    # A one-hot contraction rather than a gather: with the vocab split over "tensor" (vocab-parallel
    # head) each shard contributes its part and one all-reduce combines them.
    target_logit = jnp.einsum("bsv,bsv->bs", logits, jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype))
    return {
        "nll_sum": jnp.sum((lse - target_logit) * mask),
        "z_sum": jnp.sum(jnp.square(lse) * mask),
        "tokens": jnp.sum(mask),
    }


def batch_loss_sums(model, params, batch: Mapping[str, jax.Array], lora=None) -> dict[str, jax.Array]:
    """`loss_sums` of `model` (a Llama) on a batch dict (inputs, targets, optional loss_mask, segment_ids,
    positions; see llama_jax.data), over chunks of `model.config.loss_chunk` positions if set.

    lora: the model's "lora" variable collection (low-rank adapters, model/linear.py), or None."""
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    targets, mask = batch["targets"], target_mask(batch)
    chunk = model.config.loss_chunk
    seq = targets.shape[1]
    inputs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    if not chunk or chunk >= seq:
        logits = model.apply(variables, batch["inputs"], **inputs)  # [batch, seq, vocab] f32
        return loss_sums(logits, targets, mask)

    hidden = model.apply(variables, batch["inputs"], **inputs, head=False)  # [batch, seq, embed]
    kernel = head_kernel(model.config, params)  # [embed, vocab]
    # Whole sequences on every chip (the residual stream's are split over tensor): each chunk is a slice
    # of the sequence.
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))

    @jax.checkpoint  # keep only the chunk's inputs; recompute its logits in the backward pass
    def chunk_sums(h, t, m):
        logits = nn.with_logical_constraint(head_logits(h, kernel), ("batch", "length", "vocab"))
        return loss_sums(logits, t, m)  # logits: [batch, chunk, vocab] f32

    # A scan, not a Python loop: unrolled, XLA scheduled every chunk's logits at once.
    whole = seq - seq % chunk

    def body(acc, start):
        part = [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (hidden, targets, mask)]
        return jax.tree.map(jnp.add, acc, chunk_sums(*part)), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("nll_sum", "z_sum", "tokens")}
    sums, _ = jax.lax.scan(body, zeros, jnp.arange(0, whole, chunk))
    if whole < seq:  # the shorter last chunk
        sums = jax.tree.map(jnp.add, sums, chunk_sums(hidden[:, whole:], targets[:, whole:], mask[:, whole:]))
    return sums
