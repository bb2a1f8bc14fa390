"""The optimizer from `config.optimizer`: AdamW, Adafactor or Lion, a learning-rate schedule, clipping.

    tx = make_optimizer(OptimizerConfig.from_dict(config.optimizer), total_steps=config.num_steps)
    opt_state = tx.init(params)
    ...
    learning_rate(opt_state)  # the rate the last update used, for metrics

The whole chain (global-norm clipping, then the optimizer) is wrapped in `optax.inject_hyperparams`, so
the learning rate the optimizer applied is a scalar in its state: metrics read the exact value that was
used, and a skipped (non-finite) step, which leaves the state unchanged, does not advance the schedule.

Weight decay is decoupled and masked: by default norms, biases and the embedding are not decayed
(`optimizer.no_decay`, regexes searched in the '/'-joined param path).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from llama_jax.errors import ConfigError
from llama_jax.model import path_str
from llama_jax.sections import Section

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


Schedule = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    SECTION = "optimizer"

    name: str = "adamw"  # adamw | adafactor | lion
    lr: float = 3e-4  # peak learning rate
    b1: float = 0.9  # adamw / lion
    b2: float = 0.95  # adamw / lion (lion's paper uses 0.99)
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.1  # decoupled; adafactor's is not multiplied by the lr
    schedule: str = "cosine"  # cosine | linear | constant | wsd, all after a linear warmup
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.1  # wsd: the final fraction of num_steps spent decaying
    wsd_decay_shape: str = "linear"  # wsd: linear | cosine | 1-sqrt
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    # Regexes searched in '/'-joined param paths; matches get no weight decay. Norm scales/biases, every
    # bias, and the token embedding: decaying them pulls scales towards 0 and rare-token embeddings
    # towards the origin.
    no_decay: tuple[str, ...] = (r"norm/(scale|bias)$", r"(^|/)bias$", r"(^|/)embed/embedding$")
    adafactor_decay_rate: float = 0.8
    adafactor_param_scale: bool = False  # multiply updates by the param RMS (T5 style)
    adafactor_clipping_threshold: float = 1.0  # update clipping by block RMS; 0 disables

    def __post_init__(self):
        self._check(self.name in OPTIMIZERS, f"optimizer.name={self.name!r} is not one of {OPTIMIZERS}.")
        self._check(self.schedule in SCHEDULES, f"optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}.")
        self._check(
            self.wsd_decay_shape in WSD_DECAY_SHAPES,
            f"optimizer.wsd_decay_shape={self.wsd_decay_shape!r} is not one of {WSD_DECAY_SHAPES}.",
        )
        self._check(self.lr >= 0, f"optimizer.lr={self.lr} must be >= 0 (0 freezes the params).")
        self._check(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0.")
        self._check(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        self._check(
            0 < self.decay_fraction <= 1, f"optimizer.decay_fraction={self.decay_fraction} must be in (0, 1]."
        )
        for name in ("b1", "b2"):
            v = getattr(self, name)
            self._check(0 <= v < 1, f"optimizer.{name}={v} must be in [0, 1).")
        for name in ("eps", "weight_decay", "clip_norm", "adafactor_clipping_threshold"):
            v = getattr(self, name)
            self._check(v >= 0, f"optimizer.{name}={v} must be >= 0.")
        for regex in self.no_decay:
            try:
                re.compile(regex)
            except (re.error, TypeError) as e:
                raise ConfigError(f"optimizer.no_decay: {regex!r} is not a valid regex ({e}).") from e


# ---------------------------------------------------------------------- schedules
def make_schedule(opt_cfg: OptimizerConfig, total_steps: int) -> Schedule:
    """The learning rate as a jit-friendly function of the update count (0-based).

    Every schedule starts with a linear warmup that reaches `lr` at step `warmup_steps - 1`
    (lr * (step + 1) / warmup_steps, so the very first update is not wasted at lr=0), then:
    - "cosine":   cosine from lr down to lr * min_lr_ratio at `total_steps`, then flat.
    - "linear":   linear from lr down to lr * min_lr_ratio at `total_steps`, then flat.
    - "constant": lr.
    - "wsd":      warmup-stable-decay: lr until the last `decay_fraction` of `total_steps`, then a decay
                  of shape `wsd_decay_shape` ("linear", "cosine" or "1-sqrt") to lr * min_lr_ratio.
    """
    name = opt_cfg.schedule
    peak, warmup = opt_cfg.lr, opt_cfg.warmup_steps
    floor = peak * opt_cfg.min_lr_ratio
    if total_steps <= warmup:
        logging.warning(
            "num_steps=%d <= optimizer.warmup_steps=%d: the lr never reaches optimizer.lr (fine for a smoke "
            "test; otherwise lower warmup_steps).", total_steps, warmup,
        )
    decay_fraction, shape = opt_cfg.decay_fraction, opt_cfg.wsd_decay_shape
    # The decay starts when the warmup ends, except for WSD, whose stable phase lasts until the final
    # decay_fraction of training (but never starts decaying inside the warmup).
    decay_steps = max(1, round(decay_fraction * total_steps)) if name == "wsd" else total_steps - warmup
    decay_start = max(warmup, total_steps - decay_steps) if name == "wsd" else warmup
    decay_len = max(1, total_steps - decay_start)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        t = jnp.clip((step - decay_start) / decay_len, 0.0, 1.0)  # progress through the decay
        if name == "constant":
            frac = jnp.zeros_like(t)  # fraction of the way from peak to floor
        elif name == "linear" or (name == "wsd" and shape == "linear"):
            frac = t
        elif name == "cosine" or shape == "cosine":
            frac = 0.5 * (1.0 - jnp.cos(math.pi * t))
        else:  # wsd with "1-sqrt" (Hägele et al. 2024)
            frac = jnp.sqrt(t)
        decayed = peak - (peak - floor) * frac
        target = peak if name == "constant" else decayed
        return jnp.where(step < warmup, warm, target)

    return schedule


# ---------------------------------------------------------------------- weight-decay mask
def decay_mask_fn(no_decay: Sequence[str]) -> Callable:
    """params -> pytree of bools, True where weight decay applies (the path matches no `no_decay` regex)."""
    patterns = [re.compile(p) for p in no_decay]

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(p.search(path_str(path)) for p in patterns), params
        )

    return mask


# ---------------------------------------------------------------------- the optimizer
def _base_optimizer(opt_cfg: OptimizerConfig, learning_rate, mask) -> optax.GradientTransformation:
    name = opt_cfg.name
    wd = float(opt_cfg.weight_decay)
    if name == "adamw":
        return optax.adamw(
            learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=wd, mask=mask
        )
    if name == "lion":
        # Lion's updates are signs (norm ~ sqrt(#params)): it wants ~3-10x smaller lr, ~3-10x larger wd.
        return optax.lion(learning_rate, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=wd, mask=mask)
    if name == "adafactor":
        # optax's Adafactor adds weight decay *after* the lr scaling (param -= lr * u + wd * param), so
        # its weight_decay is a per-step fraction, not multiplied by the lr as in AdamW.
        return optax.adafactor(
            learning_rate,
            decay_rate=opt_cfg.adafactor_decay_rate,
            multiply_by_parameter_scale=opt_cfg.adafactor_param_scale,
            clipping_threshold=opt_cfg.adafactor_clipping_threshold or None,
            weight_decay_rate=wd or None,
            weight_decay_mask=mask,
        )
    raise AssertionError(name)  # OptimizerConfig validated the name


def make_optimizer(
    opt_cfg: OptimizerConfig, total_steps: int, *, lr_scale: tuple[Callable, float] | None = None
) -> optax.GradientTransformation:
    """The transformation `config.optimizer` describes; `total_steps` is `config.num_steps`.

    The chain is: clip_by_global_norm(clip_norm) (skipped when clip_norm <= 0), then the optimizer with
    the schedule as its learning rate, all inside `optax.inject_hyperparams` (see module docstring).
    `lr_scale` = (mask_fn, s) (lora.train_also_lr_scale): the updates of the params mask_fn(params) marks
    are multiplied by s last, so their learning rate, and the decoupled weight decay it multiplies, is s x
    the schedule's.
    """
    schedule = make_schedule(opt_cfg, total_steps)
    mask = decay_mask_fn(opt_cfg.no_decay)
    clip = opt_cfg.clip_norm

    def build(learning_rate):
        parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
        parts.append(_base_optimizer(opt_cfg, learning_rate, mask))
        if lr_scale is not None:
            scaled, s = lr_scale
            parts.append(optax.masked(optax.scale(s), scaled))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=schedule)


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest update, from the state of a `make_optimizer` transformation."""
    if "learning_rate" not in getattr(opt_state, "hyperparams", {}):
        raise TypeError(
            f"learning_rate() reads the state of an optimizer built by make_optimizer, got {type(opt_state)}."
        )
    return opt_state.hyperparams["learning_rate"]
