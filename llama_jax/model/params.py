"""The params pytree: creation, abstract shapes, path names and the two layer layouts.

Layer i lives at `layers_{i}/...`, or, with `model.scan_layers`, all layers are stacked on a leading axis
at `layers/...`; `stack_layers` / `unstack_layers` / `to_layout` convert between the two.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import Llama


def init_params(config: ModelConfig, rng: jax.Array):
    """Random params (on the default device). For sharded init see `llama_jax.sharding`."""
    return Llama(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shapes(config: ModelConfig):
    """The params pytree as ShapeDtypeStructs; allocates nothing, even at 70B."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def stack_layers(params):
    """`layers_{i}/...` -> `layers/...` with a leading [layers] axis (the scan_layers layout)."""
    params = dict(params)
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(k)))
    if not idx:
        return params
    layers = [params.pop(f"layers_{i}") for i in idx]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params):
    """`layers/...` (leading [layers] axis) -> `layers_{i}/...`."""
    params = dict(params)
    if "layers" not in params:
        return params
    stacked = params.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


def to_layout(params, config: ModelConfig):
    """Params in the layer layout `config.scan_layers` expects, whichever layout they arrive in."""
    return stack_layers(params) if config.scan_layers else unstack_layers(params)


def kernel_input_dims(path: str) -> int:
    """How many leading dims of the matrix at `path` (a '/'-joined param path, unscanned layout) are its
    input: 2 for the attention output projection ([heads, head_dim] -> embed), 1 for every other kernel
    and for the embedding ([vocab] -> embed). What model/linear.py's `num_contract` says for each Dense."""
    return 2 if path.endswith("attn/o_proj/kernel") else 1


def path_str(path) -> str:
    """'/'-joined keys of a jax key path: ('layers_0', 'attn', 'q_proj', 'kernel') -> 'layers_0/attn/...'.

    The names partition rules, weight-decay masks and error messages match params by.
    """
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)
