"""The sharded train and eval steps, the train state, and `Trainer`, which builds them from the config.

    maybe_initialize_distributed()                 # llama_jax.sharding; first, on every process
    trainer = Trainer.from_config(config)          # mesh, rules, optimizer, jitted steps
    state = trainer.init_state()                   # created sharded; never whole on any host
    for local_batch in data:                       # this process's rows: trainer.process_batch_slice()
        state, metrics = trainer.train_step(state, trainer.shard_batch(local_batch))
        guard(metrics)                             # SkipGuard: halts after K non-finite steps in a row
    sums = trainer.eval_step(state.params, trainer.shard_batch(eval_batch))

Loss: next-token cross-entropy in f32, averaged over *target tokens* of the whole global batch (the sum
of masked token losses divided by the number of target tokens, not a mean of per-sequence means), so a
batch's weight does not depend on how its tokens are split into sequences or microbatches. Gradient
accumulation sums token-weighted losses and gradients over microbatches and divides once at the end: it
equals the big-batch step up to float rounding.

A batch is a dict of [batch, seq] arrays: inputs, targets (inputs shifted by one), loss_mask (1 where
the target counts), and optionally segment_ids (packed documents; 0 = padding) and positions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import optim, sharding
from llama_jax.config import ModelConfig
from llama_jax.model import Llama


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: train steps taken, skipped ones included
    params: Any
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw PRNG key; per-step keys are fold_in(rng, step)
    consecutive_skips: jax.Array  # [] int32: non-finite steps in a row up to this one


class TrainingHalted(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------- loss
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


def _forward_sums(model: Llama, params, batch, rng) -> dict[str, jax.Array]:
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        rngs={"dropout": rng},
    )  # [batch, seq, vocab] f32
    return loss_sums(logits, batch["targets"], target_mask(batch))


# ---------------------------------------------------------------------- steps
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
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    lr_fn: Callable[[Any], jax.Array] = optim.learning_rate,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure (unjitted) train step: (state, batch) -> (state, metrics).

    Metrics (replicated scalars): loss (cross-entropy per target token), z_loss (its coefficient
    included), grad_norm (before clipping), param_norm (after the step), update_norm, lr (the rate of
    this update), tokens (target tokens in the batch), skipped (1 if the update was dropped for a
    non-finite loss/gradient), consecutive_skips.
    """
    model = Llama(model_config)
    f32 = jnp.float32

    def grads_and_sums(params, batch, rng):
        def objective(p):
            sums = _forward_sums(model, p, batch, rng)
            return sums["nll_sum"] + z_loss * sums["z_sum"], sums

        grads, sums = jax.grad(objective, has_aux=True)(params)
        # f32 sums whatever the param dtype; placed like the params so XLA reduce-scatters them.
        grads = jax.tree.map(lambda g: g.astype(f32), grads)
        return jax.lax.with_sharding_constraint(grads, param_shardings), sums

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        with sharding.activation_context(mesh, rules.activations):
            if grad_accum_steps == 1:
                grads, sums = grads_and_sums(state.params, batch, step_rng)
            else:
                micro = _split_microbatches(batch, grad_accum_steps, mesh)

                def body(carry, xs):
                    grad_acc, sum_acc = carry
                    micro_batch, i = xs
                    grads, sums = grads_and_sums(state.params, micro_batch, jax.random.fold_in(step_rng, i))
                    return (jax.tree.map(jnp.add, grad_acc, grads), jax.tree.map(jnp.add, sum_acc, sums)), None

                zero_grads = jax.lax.with_sharding_constraint(
                    jax.tree.map(lambda p: jnp.zeros(p.shape, f32), state.params), param_shardings
                )
                zero_sums = {k: jnp.zeros((), f32) for k in ("nll_sum", "z_sum", "tokens")}
                (grads, sums), _ = jax.lax.scan(
                    body, (zero_grads, zero_sums), (micro, jnp.arange(grad_accum_steps))
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
            rng=state.rng,
            consecutive_skips=skips,
        )
        metrics = {
            "loss": loss,
            "z_loss": z,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
            "lr": jnp.asarray(lr_fn(new_opt_state), f32),
            "tokens": sums["tokens"],
            "skipped": (~finite).astype(jnp.int32),
            "consecutive_skips": skips,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model_config: ModelConfig, mesh: Mesh, rules: sharding.RuleSet):
    """The pure eval step: (params, batch) -> {"nll_sum", "tokens"}, summed over the global batch.

    Sums rather than means so that an eval loop can add batches of any size and divide once.
    """
    model = Llama(model_config)

    def eval_step(params, batch):
        with sharding.activation_context(mesh, rules.activations):
            sums = _forward_sums(model, params, batch, jax.random.PRNGKey(0))
        return {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}

    return eval_step


# ---------------------------------------------------------------------- the trainer
def _cfg_get(config, name, default):
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


@dataclasses.dataclass
class Trainer:
    """Everything the training loop needs, built from the experiment config; see the module docstring.

    `abstract_state` (ShapeDtypeStructs carrying their shardings) is what a checkpoint restore targets.
    """

    model_config: ModelConfig
    mesh: Mesh
    rules: sharding.RuleSet
    tx: optax.GradientTransformation
    schedule: optim.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    grad_accum_steps: int
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch) -> {"nll_sum", "tokens"}
    _init_fn: Callable

    @classmethod
    def from_config(cls, config, mesh: Mesh | None = None) -> Trainer:
        """Build from the experiment ConfigDict (`llama_jax.defaults.base_config`).

        Reads config.model, config.mesh (unless `mesh` is given), config.sharding, config.optimizer,
        config.num_steps, config.batch_size, config.grad_accum_steps and config.z_loss. All config errors
        (mesh size, divisibility, rules that miss a param) are raised here, before anything compiles.
        """
        model_config = ModelConfig.from_dict(config.model)
        mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
        rules = sharding.resolve_rules(_cfg_get(config, "sharding", None))
        grad_accum = int(_cfg_get(config, "grad_accum_steps", 1))
        sharding.check_batch_fits_mesh(int(config.batch_size), grad_accum, mesh)
        tx, schedule = optim.make_optimizer(config.optimizer, total_steps=int(config.num_steps))
        return cls.build(
            model_config, mesh, rules, tx, schedule,
            grad_accum_steps=grad_accum, z_loss=float(_cfg_get(config, "z_loss", 0.0)),
        )

    @classmethod
    def build(
        cls,
        model_config: ModelConfig,
        mesh: Mesh,
        rules: sharding.RuleSet,
        tx: optax.GradientTransformation,
        schedule: optim.Schedule,
        *,
        grad_accum_steps: int = 1,
        z_loss: float = 0.0,
    ) -> Trainer:
        """Build from parts (tests and notebooks); `from_config` is the usual entry point."""
        sharding.check_model_fits_mesh(model_config, mesh, rules)
        model = Llama(model_config)

        def init_fn(key):
            params_key, train_key = jax.random.split(key)
            params = model.init(params_key, jnp.zeros((1, 1), jnp.int32))["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(params),
                rng=train_key,
                consecutive_skips=jnp.zeros((), jnp.int32),
            )

        abstract = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
        p_specs = sharding.param_specs(abstract.params, rules.params, mesh)
        sharding.check_model_fits_mesh(model_config, mesh, rules, p_specs)
        specs = TrainState(
            step=P(),
            params=p_specs,
            opt_state=sharding.opt_state_specs(abstract.opt_state, abstract.params, p_specs),
            rng=P(),
            consecutive_skips=P(),
        )
        state_shardings = sharding.named_shardings(mesh, specs)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
        )
        replicated = NamedSharding(mesh, P())
        batch_sharding = sharding.batch_sharding(mesh)

        train_step = jax.jit(
            make_train_step(
                model_config, tx, mesh, rules, state_shardings.params,
                grad_accum_steps=grad_accum_steps, z_loss=z_loss,
            ),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        eval_step = jax.jit(
            make_eval_step(model_config, mesh, rules),
            in_shardings=(state_shardings.params, batch_sharding),
            out_shardings=replicated,
        )
        return cls(
            model_config=model_config,
            mesh=mesh,
            rules=rules,
            tx=tx,
            schedule=schedule,
            abstract_state=abstract,
            state_shardings=state_shardings,
            batch_sharding=batch_sharding,
            grad_accum_steps=grad_accum_steps,
            train_step=train_step,
            eval_step=eval_step,
            _init_fn=jax.jit(init_fn, in_shardings=replicated, out_shardings=state_shardings),
        )

    def init_state(self, seed: int = 0) -> TrainState:
        """A fresh state, created directly in its shards (the jitted init writes each device's part)."""
        return self._init_fn(jax.random.PRNGKey(seed))

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.shard_batch(local_batch, self.mesh)

    def process_batch_slice(self, global_batch_size: int) -> slice:
        return sharding.process_batch_slice(self.mesh, global_batch_size)

    @property
    def param_shardings(self):
        return self.state_shardings.params


# ---------------------------------------------------------------------- halting on NaNs
def check_skips(metrics: Mapping[str, Any], max_consecutive_skips: int) -> None:
    """Raise TrainingHalted when `max_consecutive_skips` (> 0) steps in a row were skipped.

    Reads one scalar from the device, which waits for that step; `SkipGuard` avoids the stall.
    """
    n = int(jax.device_get(metrics["consecutive_skips"]))
    if max_consecutive_skips > 0 and n >= max_consecutive_skips:
        raise TrainingHalted(
            f"{n} consecutive train steps had a non-finite loss or gradient (limit max_consecutive_skips="
            f"{max_consecutive_skips}); their updates were skipped, so params and optimizer state are "
            "those before the streak. Likely causes: a learning rate too high for this model (lower "
            "optimizer.lr, lengthen optimizer.warmup_steps, keep optimizer.clip_norm > 0), float16 "
            "overflow (use bfloat16), or corrupt data. Resume from the last checkpoint after fixing it."
        )


class SkipGuard:
    """Calls `check_skips` on the *previous* step's metrics, so the host never waits for the device.

        guard = SkipGuard(config.max_consecutive_skips)
        state, metrics = trainer.train_step(state, batch); guard(metrics)
        ...
        guard.flush()  # after the loop

    The halt comes one step late; that extra step is harmless (a skipped step changes nothing).
    """

    def __init__(self, max_consecutive_skips: int):
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._pending = None

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        previous, self._pending = self._pending, metrics
        if previous is not None:
            check_skips(previous, self.max_consecutive_skips)

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            check_skips(previous, self.max_consecutive_skips)

