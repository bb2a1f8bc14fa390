"""The optimizer from `config.optimizer`: AdamW, Adafactor or Lion, a learning-rate schedule, clipping.

    tx, schedule = make_optimizer(config.optimizer, total_steps=config.num_steps)
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

import logging
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
WSD_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")

# Norm scales/biases (attn_norm, mlp_norm, final_norm, q_norm, k_norm), every bias, and the token
# embedding: decaying them pulls scales towards 0 and rare-token embeddings towards the origin.
DEFAULT_NO_DECAY = (r"norm/(scale|bias)$", r"(^|/)bias$", r"(^|/)embed/embedding$")

Schedule = Callable[[jax.Array], jax.Array]


def _get(cfg, name, default):
    """`cfg.name`, or `default` for configs written before the field existed."""
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


# ---------------------------------------------------------------------- schedules
def make_schedule(opt_cfg, total_steps: int) -> Schedule:
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
    if name not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={name!r} is not one of {SCHEDULES}.")
    peak = float(opt_cfg.lr)
    warmup = int(opt_cfg.warmup_steps)
    floor = peak * float(opt_cfg.min_lr_ratio)
    if warmup < 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} must be >= 0.")
    if total_steps <= warmup:
        logging.warning(
            "num_steps=%d <= optimizer.warmup_steps=%d: the lr never reaches optimizer.lr (fine for a smoke "
            "test; otherwise lower warmup_steps).", total_steps, warmup,
        )
    decay_fraction = float(_get(opt_cfg, "decay_fraction", 0.1))
    shape = _get(opt_cfg, "wsd_decay_shape", "linear")
    if name == "wsd":
        if not 0.0 < decay_fraction <= 1.0:
            raise ConfigError(f"optimizer.decay_fraction={decay_fraction} must be in (0, 1].")
        if shape not in WSD_DECAY_SHAPES:
            raise ConfigError(f"optimizer.wsd_decay_shape={shape!r} is not one of {WSD_DECAY_SHAPES}.")
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
def path_str(path) -> str:
    """'/'-joined keys of a jax key path: ('layers_0', 'attn', 'q_proj', 'kernel') -> 'layers_0/attn/...'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def decay_mask_fn(no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> Callable:
    """params -> pytree of bools, True where weight decay applies (the path matches no `no_decay` regex)."""
    patterns = [re.compile(p) for p in no_decay]

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(p.search(path_str(path)) for p in patterns), params
        )

    return mask


# ---------------------------------------------------------------------- the optimizer
def _base_optimizer(opt_cfg, learning_rate, mask) -> optax.GradientTransformation:
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
            decay_rate=float(_get(opt_cfg, "adafactor_decay_rate", 0.8)),
            multiply_by_parameter_scale=bool(_get(opt_cfg, "adafactor_param_scale", False)),
            clipping_threshold=float(_get(opt_cfg, "adafactor_clipping_threshold", 1.0)) or None,
            weight_decay_rate=wd or None,
            weight_decay_mask=mask,
        )
    raise ConfigError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}.")


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
    """(transformation, schedule) from `config.optimizer`; `total_steps` is `config.num_steps`.

    The chain is: clip_by_global_norm(clip_norm) (skipped when clip_norm <= 0), then the optimizer with
    the schedule as its learning rate, all inside `optax.inject_hyperparams` (see module docstring).
    """
    schedule = make_schedule(opt_cfg, total_steps)
    mask = decay_mask_fn(tuple(_get(opt_cfg, "no_decay", DEFAULT_NO_DECAY)))
    clip = float(opt_cfg.clip_norm)
    _base_optimizer(opt_cfg, 0.0, mask)  # validate the name now, not at the first init

    def build(learning_rate):
        parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
        parts.append(_base_optimizer(opt_cfg, learning_rate, mask))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=schedule), schedule


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest update, from the state of a `make_optimizer` transformation."""
    if "learning_rate" not in getattr(opt_state, "hyperparams", {}):
        raise TypeError(
            f"learning_rate() reads the state of an optimizer built by make_optimizer, got {type(opt_state)}."
        )
    return opt_state.hyperparams["learning_rate"]
