"""Adapters: which params get them, their shapes and init, their shardings, and the merged weights.

Adapters mirror the params they adapt: the kernel `layers_0/attn/q_proj/kernel` gets
`layers_0/attn/q_proj/kernel/lora_a` and `.../lora_b`, in the params' layer layout. So the machinery that
works by path treats an adapter tree like a params tree: optimizer-state shardings (sharding.opt_state_specs),
the weight-decay mask, Orbax restores with shape checks, and the scanned <-> unscanned relayout.

Shapes keep the kernel's own dims rather than flattening them to [in, out]. A kernel [*lead, *in, *out]
(lead: the [layers] axis of scanned params; in / out split by model.kernel_input_dims) gets

    A [*lead, *in, r]     B [*lead, r, *out]     A @ B (contracted over r) = [*lead, *in, *out]

e.g. q_proj [D, H, hd]: A [D, r], B [r, H, hd]; o_proj [H, hd, D]: A [H, hd, r], B [r, D]. Every adapter dim
but r is then a kernel dim and takes that dim's PartitionSpec entry (A: the input dims', B: the output
dims'); r is never split. Mathematically this is PEFT's A [in, r], B [r, out] with in/out flattened.

Params that `lora.train_also` selects are leaves of the same tree at their own path (`embed/embedding`, not
under a kernel), copies of the base's values that train fully: `merge` and `overlay` put them in place of
the base's, `lowrank` leaves them out of the "lora" collection.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama_jax.errors import ConfigError
from llama_jax.lora.config import LoraConfig
from llama_jax.model import ModelConfig, kernel_input_dims, param_shapes, path_str

A, B = "lora_a", "lora_b"


def _layout(path: str) -> tuple[int, int]:
    """(leading [layers] dims, input dims) of the matrix at `path`; scanned params live under `layers/`."""
    return (1 if path.startswith("layers/") else 0), kernel_input_dims(path)


def _leaves(tree) -> dict[str, tuple]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def target_paths(cfg: LoraConfig, params) -> list[str]:
    """The paths of the params (arrays or ShapeDtypeStructs) that `cfg.targets` selects, sorted.

    Raises ConfigError for a regex that matches no param (listing the param paths) and for a match that
    is not a matrix (a norm scale, a bias).
    """
    leaves = _leaves(params)
    patterns = [re.compile(t) for t in cfg.targets]
    unmatched = [t for t, p in zip(cfg.targets, patterns) if not any(p.search(path) for path in leaves)]
    if unmatched:
        # One line per distinct path with the layer index elided: 2 lines per layer kind, not 2 per layer.
        names = list(dict.fromkeys(re.sub(r"^layers_\d+/", "layers_<i>/", p) for p in leaves))
        raise ConfigError(
            f"lora.targets {unmatched} match no param. Regexes are searched in these param paths:\n  "
            + "\n  ".join(names) + "\nFix --config.lora.targets (e.g. r'attn/(q|k|v|o)_proj/kernel$')."
        )
    paths = sorted(p for p in leaves if any(pat.search(p) for pat in patterns))
    flat = [f"{p} {tuple(leaves[p].shape)}" for p in paths if leaves[p].ndim - sum(_layout(p)) < 1]
    if flat:
        raise ConfigError(
            f"lora.targets {list(cfg.targets)} select params that are not matrices: {flat}. LoRA adapts "
            "projection kernels; narrow the regexes (end them in '/kernel$')."
        )
    # The adapters run inside the projection layer (model/linear.py); the embedding lookup and the LM head
    # (which the chunked loss applies itself) are not one, and merging them in would form dense gradients.
    outside = [p for p in paths if not p.endswith("/kernel") or p.startswith("lm_head/")]
    if outside:
        raise ConfigError(
            f"lora.targets {list(cfg.targets)} select {outside}, which LoRA cannot adapt: adapters run low-rank "
            "inside the attention and MLP projections (x @ W + s * (x @ A) @ B). Narrow the regexes to those "
            "(e.g. r'attn/(q|k|v|o)_proj/kernel$', r'mlp/(gate|up|down)_proj/kernel$')."
        )
    return paths


def train_also_paths(cfg: LoraConfig, params) -> list[str]:
    """The paths of the params that `cfg.train_also` selects, sorted; ConfigError for a regex that matches
    no param and for a param that is also an adapter target."""
    leaves = _leaves(params)
    patterns = [re.compile(t) for t in cfg.train_also]
    unmatched = [t for t, p in zip(cfg.train_also, patterns) if not any(p.search(path) for path in leaves)]
    if unmatched:
        names = list(dict.fromkeys(re.sub(r"^layers_\d+/", "layers_<i>/", p) for p in leaves))
        raise ConfigError(
            f"lora.train_also {unmatched} match no param. Regexes are searched in these param paths:\n  "
            + "\n  ".join(names) + "\nFix --config.lora.train_also (e.g. r'embed/embedding$', r'lm_head/kernel$')."
        )
    paths = sorted(p for p in leaves if any(pat.search(p) for pat in patterns))
    both = sorted(set(paths) & set(target_paths(cfg, params)))
    if both:
        raise ConfigError(
            f"lora.train_also selects {both}, which lora.targets also adapts: a param either gets adapters or "
            "trains fully. Narrow one of the two regex lists."
        )
    return paths


def _set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_adapters(cfg: LoraConfig, params, key: jax.Array, dtype) -> dict:
    """Adapters for `params` (arrays, or ShapeDtypeStructs under jax.eval_shape): B = 0, so the adapted
    model equals the base, and A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PEFT's default (its
    kaiming_uniform(a=sqrt(5))); each target's A from its own fold of `key` (targets in path order).
    The train_also params are `params`' own values in `dtype`."""
    leaves = _leaves(params)
    out: dict = {}
    for i, path in enumerate(target_paths(cfg, params)):
        shape = tuple(leaves[path].shape)
        lead, n_in = _layout(path)
        in_shape = shape[lead : lead + n_in]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, i), (*shape[: lead + n_in], cfg.rank), dtype, -bound, bound)
        b = jnp.zeros((*shape[:lead], cfg.rank, *shape[lead + n_in :]), dtype)
        _set(out, [*path.split("/"), A], a)
        _set(out, [*path.split("/"), B], b)
    for path in train_also_paths(cfg, params):
        _set(out, path.split("/"), jnp.asarray(leaves[path], dtype))
    return out


def adapter_param_count(cfg: LoraConfig, model: ModelConfig) -> int:
    """Adapter params of `model` under `cfg`: r * (in + out) summed over the adapted kernels (of every layer).
    The train_also params are not among them (train_also_matmul_param_count)."""
    shapes = param_shapes(model)
    tree = jax.eval_shape(lambda s: init_adapters(cfg, s, jax.random.key(0), jnp.float32), shapes)
    return sum(math.prod(x.shape) for path, x in _leaves(tree).items() if _is_pair(path))


def train_also_matmul_param_count(cfg: LoraConfig, model: ModelConfig) -> int:
    """The train_also params of `model` that a matmul applies (kernels; the embedding when the head is tied
    to it): each gets a weight gradient as in a full fine-tune, which the frozen base's do not."""
    shapes = _leaves(param_shapes(model))
    matmul = [p for p in train_also_paths(cfg, param_shapes(model))
              if p.endswith("/kernel") or (model.tie_embeddings and p == "embed/embedding")]
    return sum(math.prod(shapes[p].shape) for p in matmul)


def _is_pair(path: str) -> bool:
    return path.endswith((f"/{A}", f"/{B}"))


def _pairs(adapters) -> dict[str, dict[str, jax.Array]]:
    """{kernel path: {"lora_a": A, "lora_b": B}} of an adapter tree."""
    pairs: dict[str, dict] = {}
    for path, x in _leaves(adapters).items():
        if _is_pair(path):
            kernel, which = path.rsplit("/", 1)
            pairs.setdefault(kernel, {})[which] = x
    return pairs


def train_also_mask(adapters):
    """The adapter tree with True at each train_also param, False at each A and B (optax.masked's mask)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not _is_pair(path_str(p)), adapters)


def _trained(adapters) -> dict[str, jax.Array]:
    """{param path: value} of an adapter tree's train_also params."""
    return {path: x for path, x in _leaves(adapters).items() if not _is_pair(path)}


def delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A [*lead, *in, r] @ B [*lead, r, *out] -> [*lead, *in, *out] = `shape`, as one (batched) 2-D matmul in
    f32 or wider at full precision (on TPU the default f32 precision would round A and B to bf16)."""
    lead = a.ndim + b.ndim - 2 - len(shape)
    r = a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], -1, r)  # [*lead, in, r]
    b2 = b.reshape(*b.shape[:lead], r, -1)  # [*lead, r, out]
    out = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))
    return out.reshape(shape)


def lowrank(adapters, scale: float) -> dict:
    """The model's "lora" variable collection for `adapters`: the A, B pairs with `scale` folded into each B
    (a [*lead, r, *out] multiply), which the projections apply as x @ W + (x @ A) @ B (model/linear.py).
    The train step computes with this on `overlay(base, adapters)`; evaluation, sampling and export `merge`."""
    out: dict = {}
    for kernel, ab in _pairs(adapters).items():
        _set(out, [*kernel.split("/"), A], ab[A])
        _set(out, [*kernel.split("/"), B], ab[B] * scale)
    return out


def overlay(params, adapters):
    """`params` with the adapters' train_also params in place of theirs (the adapted kernels as they are)."""
    trained = _trained(adapters)
    return jax.tree_util.tree_map_with_path(lambda p, w: trained.get(path_str(p), w), params)


def copy_trained(adapters, params):
    """`adapters` with each train_also param set to a copy of `params`' value at its path, in the adapter's
    dtype: a fresh run's start, once the real base is restored. A copy, never the base's own buffer, which
    the train step would then be handed (and donate) twice."""
    leaves = _leaves(params)

    def leaf(path, x):
        p = path_str(path)
        return x if _is_pair(p) else jnp.array(leaves[p], dtype=x.dtype, copy=True)

    return jax.tree_util.tree_map_with_path(leaf, adapters)


def merge(params, adapters, scale: float):
    """The params the model computes with: W + scale * A @ B at every adapted path, the adapters' own value
    at every train_also path, the rest as they are.

    An adapted weight takes the wider of its own and the adapters' dtype (a bf16 base with f32 adapters
    gives f32: rounding the sum to bf16 would drop updates smaller than W's bf16 step); the model casts
    every weight to its compute dtype anyway. Costs one [in, r] @ [r, out] matmul per adapted kernel.
    """
    pairs, trained = _pairs(adapters), _trained(adapters)

    def leaf(path, w):
        ab = pairs.get(path_str(path))
        if ab is None:
            return trained.get(path_str(path), w)
        dtype = jnp.promote_types(w.dtype, ab[A].dtype)
        return w.astype(dtype) + (scale * delta(ab[A], ab[B], w.shape)).astype(dtype)

    missing = (set(pairs) | set(trained)) - set(_leaves(params))
    if missing:
        raise ConfigError(f"adapters for {sorted(missing)}, which these params do not have.")
    return jax.tree_util.tree_map_with_path(leaf, params)


def adapter_specs(adapters, param_specs):
    """PartitionSpecs of an adapter tree from its kernels' specs (same tree as `param_specs`): A takes the
    kernel's lead and input dims' entries, B its lead and output dims'; the rank dim is replicated. A
    train_also param takes its own spec."""
    specs = _leaves_of_specs(param_specs)
    pairs = _pairs(adapters)

    def spec(path, x) -> P:
        if not _is_pair(path_str(path)):
            return specs[path_str(path)]
        kernel, which = path_str(path).rsplit("/", 1)
        lead, n_in = _layout(kernel)
        ndim = pairs[kernel][B].ndim + n_in - 1  # = lead + n_in + n_out
        k = tuple(specs[kernel]) + (None,) * (ndim - len(specs[kernel]))
        return P(*k[: lead + n_in], None) if which == A else P(*k[:lead], None, *k[lead + n_in :])

    return jax.tree_util.tree_map_with_path(spec, adapters)


def _leaves_of_specs(specs) -> Mapping[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {path_str(p): s for p, s in flat}
