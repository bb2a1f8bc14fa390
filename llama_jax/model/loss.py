"""Next-token cross-entropy as token-weighted sums, shared by the train step and evaluation.

Sums, not means: a step divides the sums of all its microbatches once, and an evaluation adds the sums of
every batch and divides once, so no result depends on how tokens are split into sequences or batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


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


def batch_loss_sums(model, params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`loss_sums` of `model` (a Llama) on a batch dict (inputs, targets, optional loss_mask, segment_ids,
    positions; see llama_jax.data)."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )  # [batch, seq, vocab] f32
    return loss_sums(logits, batch["targets"], target_mask(batch))
