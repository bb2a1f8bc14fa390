"""The training program: the train and eval steps jitted once, with explicit shardings and donation.

    maybe_initialize_distributed()                    # llama_jax.distributed; first, on every process
    program = TrainProgram.from_experiment(exp)       # mesh, rules, optimizer, jitted steps
    state = program.init_state(seed)                  # created sharded; never whole on any host
    for local_batch in data:                          # this process's rows: program.process_batch_slice()
        state, metrics = program.train_step(state, program.shard_batch(local_batch))
    sums = program.eval_step(program.eval_params(state), program.shard_batch(eval_batch))

With `config.lora` on, the state's params are the adapters (and the lora.train_also params, trained fully)
and its `base` the frozen base params. The train step applies the adapters low-rank (x @ W + alpha / r *
(x @ A) @ B, model/linear.py) on the base with the train_also params in place, and differentiates the
adapters' tree alone; the eval step and `model_params` merge them (W + alpha / r * A @ B, llama_jax.lora),
placed like the base params.
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

from llama_jax import lora as lora_lib
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
    eval_step: Callable  # jitted (eval_params(state), batch) -> {"nll_sum", "tokens"}
    _init_fn: Callable
    lora: lora_lib.LoraConfig | None = None  # set when LoRA is on (rank > 0)
    _merge: Callable | None = None  # LoRA: jitted (base, adapters) -> merged params

    @classmethod
    def from_experiment(cls, exp: Experiment, mesh: Mesh | None = None) -> TrainProgram:
        """Build from the experiment's model, mesh (unless `mesh` is given), sharding, optimizer and loop
        sections. All config errors (mesh size, divisibility, rules that miss a param) are raised here,
        before anything compiles."""
        mesh = mesh if mesh is not None else sharding.make_mesh(exp.mesh)
        loop = exp.loop
        sharding.check_batch_fits_mesh(loop.batch_size, loop.grad_accum_steps, mesh)
        lora = exp.lora
        # The train_also params' updates are scaled; at 1x the chain (and its checkpointed state) is the usual one.
        lr_scale = ((lora_lib.train_also_mask, lora.train_also_lr_scale)
                    if lora.enabled and lora.train_also and lora.train_also_lr_scale != 1 else None)
        tx = optim.make_optimizer(exp.optimizer, total_steps=loop.num_steps, lr_scale=lr_scale)
        return cls.build(
            exp.model, mesh, sharding.resolve_rules(exp.sharding), tx,
            grad_accum_steps=loop.grad_accum_steps, z_loss=loop.z_loss, lora=lora,
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
        lora: lora_lib.LoraConfig | None = None,
    ) -> TrainProgram:
        """Build from parts (tests, notebooks, benchmarks); `from_experiment` is the usual entry point."""
        sharding.check_model_fits_mesh(model_config, mesh, rules)
        model = Llama(model_config)
        lora = lora if lora is not None and lora.enabled else None
        if lora is not None:  # bad targets are a config error, raised before anything is traced
            shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
            lora_lib.target_paths(lora, shapes)
            lora_lib.train_also_paths(lora, shapes)

        def init_fn(key):
            # Params come from the first half of a split, as they always have: a seed keeps its init.
            params_key, adapter_key = jax.random.split(key)
            params = model.init(params_key, jnp.zeros((1, 1), jnp.int32))["params"]
            base = None
            if lora is not None:  # the model's params become the frozen base; only adapters train
                base_dtype = lora.base_dtype_for(model_config.param_dtype)
                base = jax.tree.map(lambda x: x.astype(base_dtype), params)
                params = lora_lib.init_adapters(lora, base, adapter_key, model_config.storage_dtype)
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(params),
                consecutive_skips=jnp.zeros((), jnp.int32),
                base=base,
            )

        abstract = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
        p_specs = sharding.param_specs(abstract.params if lora is None else abstract.base, rules.params, mesh)
        sharding.check_model_fits_mesh(model_config, mesh, rules, p_specs)
        # Adapters are placed like the kernels they adapt (lora.adapter_specs); optimizer state like them.
        t_specs = p_specs if lora is None else lora_lib.adapter_specs(abstract.params, p_specs)
        specs = TrainState(
            step=P(),
            params=t_specs,
            opt_state=sharding.opt_state_specs(abstract.opt_state, abstract.params, t_specs),
            consecutive_skips=P(),
            base=None if lora is None else p_specs,
        )
        state_shardings = sharding.named_shardings(mesh, specs)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
        )
        replicated = NamedSharding(mesh, P())
        batch_sharding = sharding.batch_sharding(mesh)

        eval_fn, eval_shardings = make_eval_step(model_config, mesh, rules), state_shardings.params
        merge = adapt = None
        if lora is not None:
            def adapt(adapters, base):
                return lora_lib.overlay(base, adapters), lora_lib.lowrank(adapters, lora.scale)

            def merge(base, adapters):
                merged = lora_lib.merge(base, adapters, lora.scale)  # [*lead, *in, *out] per adapted kernel
                return jax.lax.with_sharding_constraint(merged, state_shardings.base)

            def eval_fn(params, batch, score=eval_fn):
                return score(merge(params["base"], params["adapters"]), batch)

            eval_shardings = {"base": state_shardings.base, "adapters": state_shardings.params}

        train_step = jax.jit(
            make_train_step(
                model_config, tx, mesh, rules, state_shardings.params,
                grad_accum_steps=grad_accum_steps, z_loss=z_loss, adapt=adapt,
            ),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        eval_step = jax.jit(eval_fn, in_shardings=(eval_shardings, batch_sharding), out_shardings=replicated)
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
            lora=lora,
            _merge=None if merge is None else jax.jit(merge, out_shardings=state_shardings.base),
        )

    def init_state(self, seed: int) -> TrainState:
        """A fresh state, created directly in its shards (the jitted init writes each device's part)."""
        return self._init_fn(jax.random.PRNGKey(seed))

    def eval_params(self, state: TrainState):
        """What `eval_step` takes: the params, or with LoRA the base and the adapters."""
        return state.params if self.lora is None else {"base": state.base, "adapters": state.params}

    def model_params(self, state: TrainState):
        """The params the model computes with: state.params, or with LoRA the base with the adapters merged
        in (a new array per adapted kernel; the rest are the base's)."""
        return state.params if self.lora is None else self._merge(state.base, state.params)

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.shard_batch(local_batch, self.mesh)

    def process_batch_slice(self, global_batch_size: int) -> slice:
        return sharding.process_batch_slice(self.mesh, global_batch_size)

    @property
    def param_shardings(self):
        return self.state_shardings.params
