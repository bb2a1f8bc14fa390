"""The training program: the train and eval steps jitted once, with explicit shardings and donation.

    maybe_initialize_distributed()                    # llama_jax.distributed; first, on every process
    program = TrainProgram.from_experiment(exp)       # mesh, rules, optimizer, jitted steps
    state = program.init_state(seed)                  # created sharded; never whole on any host
    for local_batch in data:                          # this process's rows: program.process_batch_slice()
        state, metrics = program.train_step(state, program.shard_batch(local_batch))
    sums = program.eval_step(state.params, program.shard_batch(eval_batch))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.inference.perplexity import make_eval_step
from llama_jax.model import Llama, ModelConfig
from llama_jax.train import optim
from llama_jax.train.step import TrainState, make_train_step

if TYPE_CHECKING:  # experiment.py builds on train/, so train/ never imports it at run time
    from llama_jax.experiment import Experiment


@dataclasses.dataclass
class TrainProgram:
    """The jitted train and eval steps with their mesh, shardings and optimizer (module docstring).

    `abstract_state` (ShapeDtypeStructs carrying their shardings) is what a checkpoint restore targets.
    """

    model_config: ModelConfig
    mesh: Mesh
    rules: sharding.RuleSet
    tx: optax.GradientTransformation
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    grad_accum_steps: int
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # jitted (params, batch) -> {"nll_sum", "tokens"}
    _init_fn: Callable

    @classmethod
    def from_experiment(cls, exp: Experiment, mesh: Mesh | None = None) -> TrainProgram:
        """Build from the experiment's model, mesh (unless `mesh` is given), sharding, optimizer and loop
        sections. All config errors (mesh size, divisibility, rules that miss a param) are raised here,
        before anything compiles."""
        mesh = mesh if mesh is not None else sharding.make_mesh(exp.mesh)
        loop = exp.loop
        sharding.check_batch_fits_mesh(loop.batch_size, loop.grad_accum_steps, mesh)
        tx = optim.make_optimizer(exp.optimizer, total_steps=loop.num_steps)
        return cls.build(
            exp.model, mesh, sharding.resolve_rules(exp.sharding), tx,
            grad_accum_steps=loop.grad_accum_steps, z_loss=loop.z_loss,
        )

    @classmethod
    def build(
        cls,
        model_config: ModelConfig,
        mesh: Mesh,
        rules: sharding.RuleSet,
        tx: optax.GradientTransformation,
        *,
        grad_accum_steps: int = 1,
        z_loss: float = 0.0,
    ) -> TrainProgram:
        """Build from parts (tests, notebooks, benchmarks); `from_experiment` is the usual entry point."""
        sharding.check_model_fits_mesh(model_config, mesh, rules)
        model = Llama(model_config)

        def init_fn(key):
            # Params come from the first half of a split, as they always have: a seed keeps its init.
            params_key, _ = jax.random.split(key)
            params = model.init(params_key, jnp.zeros((1, 1), jnp.int32))["params"]
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(params),
                consecutive_skips=jnp.zeros((), jnp.int32),
            )

        abstract = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
        p_specs = sharding.param_specs(abstract.params, rules.params, mesh)
        sharding.check_model_fits_mesh(model_config, mesh, rules, p_specs)
        specs = TrainState(
            step=P(),
            params=p_specs,
            opt_state=sharding.opt_state_specs(abstract.opt_state, abstract.params, p_specs),
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
            abstract_state=abstract,
            state_shardings=state_shardings,
            batch_sharding=batch_sharding,
            grad_accum_steps=grad_accum_steps,
            train_step=train_step,
            eval_step=eval_step,
            _init_fn=jax.jit(init_fn, in_shardings=replicated, out_shardings=state_shardings),
        )

    def init_state(self, seed: int) -> TrainState:
        """A fresh state, created directly in its shards (the jitted init writes each device's part)."""
        return self._init_fn(jax.random.PRNGKey(seed))

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.shard_batch(local_batch, self.mesh)

    def process_batch_slice(self, global_batch_size: int) -> slice:
        return sharding.process_batch_slice(self.mesh, global_batch_size)

    @property
    def param_shardings(self):
        return self.state_shardings.params
