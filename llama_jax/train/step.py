"""The train state and the pure train step; `TrainProgram` (program.py) jits it once with its shardings.

Loss: next-token cross-entropy in f32, averaged over *target tokens* of the whole global batch (the sum
of masked token losses divided by the number of target tokens, not a mean of per-sequence means), so a
batch's weight does not depend on how its tokens are split into sequences or microbatches. Gradient
accumulation sums token-weighted losses and gradients over microbatches and divides once at the end: it
equals the big-batch step up to float rounding.

A batch is a dict of [batch, seq] arrays: inputs, targets (inputs shifted by one), loss_mask (1 where
the target counts), and optionally segment_ids (packed documents; 0 = padding) and positions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import checkpoint, sharding
from llama_jax.model import Llama, ModelConfig, batch_loss_sums, for_platform
from llama_jax.train import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: train steps taken, skipped ones included
    params: Any
    opt_state: Any
    consecutive_skips: jax.Array  # [] int32: non-finite steps in a row up to this one
    # LoRA (llama_jax.lora): the frozen base params, and `params` are the adapters. Never saved with the
    # state (the base stays in its own workdir); None in ordinary training.
    base: Any = None


def save_state(mngr, state: TrainState, step: int, data_state: dict) -> None:
    """Queue an async checkpoint of `state` (and the data position) at `step`."""
    rest = {"opt_state": state.opt_state, "step": state.step, "consecutive_skips": state.consecutive_skips}
    checkpoint.save_train_state(mngr, step, state.params, rest, data_state)


def restore_state(mngr, abstract: TrainState, step: int) -> tuple[TrainState, dict]:
    """(state, data state) of checkpoint `step`, restored onto `abstract`'s shardings."""
    rest = {"opt_state": abstract.opt_state, "step": abstract.step, "consecutive_skips": abstract.consecutive_skips}
    params, rest, data_state = checkpoint.restore_train_state(mngr, step, abstract.params, rest)
    return abstract.replace(params=params, **rest), data_state


def _split_microbatches(batch, num_micro: int, mesh: Mesh):
    """[B, ...] -> [num_micro, B // num_micro, ...], microbatch j = rows j, j + A, j + 2A, ...

    Strided rather than contiguous rows, so each device's local rows feed every microbatch equally
    and no microbatch lives on a subset of the devices (no resharding).
    """
    constraint = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def split(x):
        b = x.shape[0]
        x = x.reshape(b // num_micro, num_micro, *x.shape[1:])  # [B/A, A, ...]
        x = jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]
        return jax.lax.with_sharding_constraint(x, constraint)

    return jax.tree.map(split, batch)


def make_train_step(
    model_config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.RuleSet,
    param_shardings,
    *,
    grad_accum_steps: int,
    z_loss: float,
    adapt: Callable | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure (unjitted) train step: (state, batch) -> (state, metrics).

    adapt (LoRA): (state.params (the adapters), state.base) -> (the params the model computes with: the
    base with the adapters' lora.train_also params in place, the model's "lora" collection, which its
    projections apply low-rank on top: x @ W + (x @ A) @ B, model/linear.py). Only the adapters are
    differentiated: the base gets no gradient, and the optimizer and the norms below cover the adapters.

    Metrics (replicated scalars): loss (cross-entropy per target token), z_loss (its coefficient
    included), grad_norm (before clipping), param_norm (after the step), update_norm, lr (the rate of
    this update), tokens (target tokens in the batch), skipped (1 if the update was dropped for a
    non-finite loss/gradient), consecutive_skips.
    """
    model = Llama(for_platform(model_config, sharding.mesh_platform(mesh)))
    f32 = jnp.float32

    def grads_and_sums(params, base, batch):
        def objective(p):
            if adapt is None:
                sums = batch_loss_sums(model, p, batch)
            else:  # the base is closed over, not an argument of the differentiated function
                params, lowrank = adapt(p, base)
                sums = batch_loss_sums(model, params, batch, lora=lowrank)
            return sums["nll_sum"] + z_loss * sums["z_sum"], sums

        grads, sums = jax.grad(objective, has_aux=True)(params)
        # f32 sums whatever the param dtype; placed like the params so XLA reduce-scatters them.
        grads = jax.tree.map(lambda g: g.astype(f32), grads)
        return jax.lax.with_sharding_constraint(grads, param_shardings), sums

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with sharding.activation_context(mesh, rules.activations):
            if grad_accum_steps == 1:
                grads, sums = grads_and_sums(state.params, state.base, batch)
            else:
                micro = _split_microbatches(batch, grad_accum_steps, mesh)

                def body(carry, xs):
                    grad_acc, sum_acc = carry
                    grads, sums = grads_and_sums(state.params, state.base, xs)
                    return (jax.tree.map(jnp.add, grad_acc, grads), jax.tree.map(jnp.add, sum_acc, sums)), None

                zero_grads = jax.lax.with_sharding_constraint(
                    jax.tree.map(lambda p: jnp.zeros(p.shape, f32), state.params), param_shardings
                )
                zero_sums = {k: jnp.zeros((), f32) for k in ("nll_sum", "z_sum", "tokens")}
                (grads, sums), _ = jax.lax.scan(
                    body, (zero_grads, zero_sums), micro
                )

        denom = jnp.maximum(sums["tokens"], 1.0)  # an all-masked batch gives zero grads, not NaN
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = sums["nll_sum"] / denom
        z = z_loss * sums["z_sum"] / denom
        grad_norm = optax.tree.norm(grads)

        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # One bad batch (an inf from an overflow, a NaN from corrupt data) must not poison the params or
        # the moments: drop the update, keep the step count moving, and count the streak.
        finite = jnp.isfinite(loss) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        params = keep(new_params, state.params)
        skips = jnp.where(finite, 0, state.consecutive_skips + 1).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=keep(new_opt_state, state.opt_state),
            consecutive_skips=skips,
            base=state.base,
        )
        metrics = {
            "loss": loss,
            "z_loss": z,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
            "lr": jnp.asarray(optim.learning_rate(new_opt_state), f32),
            "tokens": sums["tokens"],
            "skipped": (~finite).astype(jnp.int32),
            "consecutive_skips": skips,
        }
        return new_state, metrics

    return train_step
