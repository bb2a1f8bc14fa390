"""Device mesh, partition rules, batch sharding and multi-host setup, all driven by the config.

The mesh has three axes:
- "data":   pure data parallelism; params replicated across it (cheap in memory only for small models).
- "fsdp":   data parallelism with params, grads and optimizer state sharded across it (ZeRO-3): each
            device stores 1/fsdp of every matrix and all-gathers a layer's weights just in time.
- "tensor": Megatron tensor parallelism: attention heads, the MLP hidden dim and the vocab are split.
The batch is split over ("data", "fsdp").

Params are placed by *rules*: an ordered list of (regex, spec). The first regex that `re.search`es the
'/'-joined param path (`layers_0/attn/q_proj/kernel`) gives the PartitionSpec, written for the
unscanned layout; under `model.scan_layers` the stacked `layers/...` params get a leading None for their
[layers] axis automatically. A param that no rule matches is an error, never silently replicated.

Activations are placed by *logical* rules: the model annotates activations with logical names (batch,
length, residual_length, embed, heads, kv_heads, mlp, vocab) via `nn.with_logical_constraint`, and `activation_context`
maps them to mesh axes inside the jitted step. The model never names a mesh axis.

Config (`config.sharding`): `rule_set` names one of RULE_SETS ("dp", "fsdp", "fsdp_tp"); a non-empty
`param_rules` / `activation_rules` replaces the set's params / activation rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.errors import ShardingError
from llama_jax.model import ModelConfig, path_str
from llama_jax.sections import Section

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

AxisSpec = str | tuple[str, ...] | None
Rule = tuple[str, tuple[AxisSpec, ...]]


# ---------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """`config.mesh`: sizes of the data / fsdp / tensor axes over all processes' devices; one may be -1
    (all remaining devices). The batch is split over data*fsdp."""

    SECTION = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Multi-slice (several TPU slices joined by the data-center network, DCN): "data" spans the slices,
    # data / num_slices replicas within each; fsdp and tensor stay inside a slice, on its fast ICI links.
    num_slices: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
        if sizes.count(-1) > 1:
            raise ShardingError(f"{desc}: at most one mesh axis may be -1 (meaning 'all remaining devices').")
        if any(s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"{desc}: mesh sizes must be positive, or -1 for one axis.")
        if self.num_slices < 1:
            raise ShardingError(f"mesh.num_slices={self.num_slices} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class ShardingConfig(Section):
    """`config.sharding`: `rule_set` names one of RULE_SETS ("dp" | "fsdp" | "fsdp_tp"; fsdp_tp uses
    whichever mesh axes are > 1, so the mesh alone picks the strategy). `param_rules`
    ((regex, spec), ...) replaces the set's param rules; `activation_rules` ((logical_name, mesh_axes),
    ...) its activation rules."""

    SECTION = "sharding"

    rule_set: str = "fsdp_tp"
    param_rules: tuple | None = None
    activation_rules: tuple | None = None

    def __post_init__(self):
        if self.rule_set not in RULE_SETS:
            raise ShardingError(f"sharding.rule_set={self.rule_set!r} is not one of {sorted(RULE_SETS)}.")
        for regex, _ in self.param_rules or ():
            try:
                re.compile(regex)
            except (re.error, TypeError) as e:
                raise ShardingError(f"sharding.param_rules: {regex!r} is not a valid regex ({e}).") from e


# ---------------------------------------------------------------------- mesh
def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of `mesh_cfg` on `num_devices` devices (a -1 axis takes the rest)."""
    sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
    desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ShardingError(
                f"{desc}: the fixed axes multiply to {known}, which does not divide the {num_devices} "
                "devices, so the -1 axis has no integer size. Choose sizes whose product divides "
                f"{num_devices}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ShardingError(
            f"{desc}: the product {known} != {num_devices} devices (all processes). Make data*fsdp*tensor "
            f"equal {num_devices}, or set one axis to -1 to absorb the remaining devices."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over all processes' devices (or `devices`).

    `jax.make_mesh` orders the devices to match the TPU interconnect (rings/tori per axis); the last
    axis ("tensor", the chattiest) gets the closest neighbours. With `mesh.num_slices` > 1,
    `create_hybrid_device_mesh` lays "data" across the slices (DCN) and everything else within one.
    Axis types are Auto: shardings inside the step are chosen by the compiler from the constraints we
    give, not by explicit-sharding types.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices != mesh_cfg.num_slices:
        raise ShardingError(
            f"mesh.num_slices={mesh_cfg.num_slices} but the {len(devices)} devices are in {slices} slice(s); "
            f"set --config.mesh.num_slices={slices}."
        )
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    data, fsdp, tensor = shape
    if data % slices:
        raise ShardingError(
            f"mesh.data={data} does not split over mesh.num_slices={slices}: data parallelism spans the slices, "
            f"so make mesh.data a multiple of {slices} (e.g. --config.mesh.data={slices} with fsdp*tensor = "
            f"the chips of one slice)."
        )
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices=devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_platform(mesh: Mesh) -> str:
    """The platform ("tpu", "gpu", "cpu") a program over `mesh` is compiled for: its devices', which for
    an ahead-of-time compile (abstract TPU devices on a CPU host) is not the runtime backend."""
    return mesh.devices.flat[0].platform


# ---------------------------------------------------------------------- rule sets
# FSDP + Megatron TP, written for the unscanned param layout (see the module docstring). Shapes:
#   embed [V, D], q_proj [D, H, hd], k/v_proj [D, KV, hd], o_proj [H, hd, D], gate/up [D, F],
#   down [F, D], lm_head [D, V]. "fsdp" shards the model dim D of every matrix (the embedding's V),
#   "tensor" the heads / F / V.
_FSDP_TP_PARAMS: tuple[Rule, ...] = (
    # Vocab-parallel embedding, its vocab split over tensor*fsdp. (Splitting D over fsdp instead makes
    # XLA's SPMD partitioner replicate the lookup's output: "Involuntary full rematerialization".)
    (r"(^|/)embed/embedding$", (("tensor", "fsdp"), None)),
    (r"attn/(q|k|v)_proj/kernel$", ("fsdp", "tensor", None)),  # column-parallel: split heads
    (r"attn/(q|k|v)_proj/bias$", ("tensor", None)),  # [heads, head_dim]
    (r"attn/o_proj/kernel$", ("tensor", None, "fsdp")),  # row-parallel: contract over split heads
    (r"attn/o_proj/bias$", (None,)),  # [D], added after the all-reduce
    (r"mlp/(gate|up)_proj/kernel$", ("fsdp", "tensor")),  # column-parallel: split F
    (r"mlp/(gate|up)_proj/bias$", ("tensor",)),
    (r"mlp/down_proj/kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"mlp/down_proj/bias$", (None,)),
    (r"norm/(scale|bias)$", (None,)),  # attn/mlp/final norms and q/k norms: tiny, replicated
    (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),  # vocab-parallel head
)


def _without_axes(rules: Sequence[Rule], drop: set[str]) -> tuple[Rule, ...]:
    """The same rules with the mesh axes in `drop` replaced by None (those dims become replicated)."""

    def strip(entry: AxisSpec) -> AxisSpec:
        if entry is None:
            return None
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in drop)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return tuple((regex, tuple(strip(e) for e in spec)) for regex, spec in rules)


# "residual_length" is the sequence axis of the residual stream between blocks (and of the embedding's
# output): sharding it over tensor stores each layer's saved input once per tensor group instead of on
# every tensor-parallel chip (Megatron's sequence parallelism; 4x less at tensor=4). XLA all-gathers it
# before the column-parallel projections and reduce-scatters after the row-parallel ones, where it would
# otherwise all-reduce. (Sharding the embed axis instead gave wrong results: XLA's SPMD partitioner
# mis-partitions a row-parallel matmul whose weight's output dim is split over fsdp when the output is
# split over tensor; tests/train/test_train_step.py caught it on a 2x2x2 mesh.)
_TP_ACTIVATIONS = ("heads", "kv_heads", "mlp", "vocab", "residual_length")
_LOGICAL_NAMES = ("batch", "length", "embed", *_TP_ACTIVATIONS)


def _activation_rules(tensor_parallel: bool) -> tuple[tuple[str, AxisSpec], ...]:
    rules = {name: None for name in _LOGICAL_NAMES}
    rules["batch"] = BATCH_AXES
    if tensor_parallel:
        rules.update({name: "tensor" for name in _TP_ACTIVATIONS})
    return tuple(rules.items())


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Param rules and the activation rules that go with them."""

    params: tuple[Rule, ...]
    activations: tuple[tuple[str, AxisSpec], ...]


RULE_SETS: dict[str, RuleSet] = {
    # Every param replicated; batch over data x fsdp. Small models, where all-gathers cost more than memory.
    "dp": RuleSet(_without_axes(_FSDP_TP_PARAMS, {"fsdp", "tensor"}), _activation_rules(False)),
    # ZeRO-3: every matrix's D dim split over fsdp; batch over data x fsdp.
    "fsdp": RuleSet(_without_axes(_FSDP_TP_PARAMS, {"tensor"}), _activation_rules(False)),
    # FSDP plus Megatron TP over "tensor". With mesh.tensor=1 this is "fsdp", with fsdp=1 too it is "dp",
    # so it is the default: the mesh alone picks the strategy.
    "fsdp_tp": RuleSet(_FSDP_TP_PARAMS, _activation_rules(True)),
}


def _normalize_spec(spec: Sequence) -> tuple[AxisSpec, ...]:
    """A spec from a config (lists, tuples, strings, None) as a tuple of None / str / tuple[str, ...]."""
    out = []
    for e in spec:
        if e is None or isinstance(e, str):
            out.append(e)
        else:
            axes = tuple(e)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def resolve_rules(sharding_cfg: ShardingConfig) -> RuleSet:
    """The RuleSet `config.sharding` asks for: a named set, with explicit lists replacing its parts."""
    rules = RULE_SETS[sharding_cfg.rule_set]
    params = sharding_cfg.param_rules or rules.params
    activations = sharding_cfg.activation_rules or rules.activations
    params = tuple((str(regex), _normalize_spec(spec)) for regex, spec in params)
    activations = tuple((str(n), _normalize_spec([axes])[0]) for n, axes in activations)
    return RuleSet(params, activations)


# ---------------------------------------------------------------------- param specs
def _axes_of(entry: AxisSpec) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_scanned(path: str) -> bool:
    """Stacked scan_layers params live under a top-level `layers/` with a leading [layers] axis."""
    return path.startswith("layers/")


def param_specs(abstract_params, rules: Sequence[Rule], mesh: Mesh | None = None):
    """A PartitionSpec per param (same tree), by the first matching rule.

    With `mesh`, also checks that the rule names existing mesh axes and that every sharded dim is
    divisible by the product of its mesh axes. Raises ShardingError naming the param otherwise.
    """
    compiled = [(re.compile(regex), regex, spec) for regex, spec in rules]

    def spec_for(path, leaf) -> P:
        name = path_str(path)
        shape = tuple(leaf.shape)
        match = next(((regex, spec) for pattern, regex, spec in compiled if pattern.search(name)), None)
        if match is None:
            raise ShardingError(
                f"param {name!r} (shape {shape}) matches no partition rule. Add a rule for it to "
                "config.sharding.param_rules (e.g. (r'<regex>', (None,) * ndim) to replicate it on purpose)."
            )
        regex, spec = match
        if _is_scanned(name):
            spec = (None, *spec)  # the [layers] axis of scanned params is never sharded
        if len(spec) != len(shape):
            raise ShardingError(
                f"param {name!r} has shape {shape} ({len(shape)} dims) but rule {regex!r} gives the "
                f"{len(spec)}-dim spec {spec}. Write the rule's spec with one entry per dim "
                "(of the unscanned layout; scanned layers get their leading None added automatically)."
            )
        if mesh is not None:
            for dim, entry in enumerate(spec):
                axes = _axes_of(entry)
                unknown = [a for a in axes if a not in mesh.shape]
                if unknown:
                    raise ShardingError(
                        f"rule {regex!r} (used by param {name!r}) names mesh axes {unknown}; the mesh axes "
                        f"are {tuple(mesh.shape)}."
                    )
                n = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % n:
                    raise ShardingError(
                        f"param {name!r} has shape {shape}: dim {dim} (size {shape[dim]}) is sharded over "
                        f"mesh axes {axes} of total size {n}, which does not divide {shape[dim]}. Change "
                        f"config.mesh so that {'*'.join(axes)} divides {shape[dim]}, or change the rule "
                        f"{regex!r} in config.sharding.param_rules so that it does not shard dim {dim}."
                    )
        return P(*spec)

    return jax.tree_util.tree_map_with_path(spec_for, abstract_params)


def check_model_fits_mesh(model: ModelConfig, mesh: Mesh, rules: RuleSet, specs=None) -> None:
    """Config-level checks with errors that name model fields, before any param-level error.

    - every activation dim a logical rule shards must be divisible by its mesh axes (tensor parallelism
      splits heads, kv heads, the MLP width and the vocab);
    - a mesh axis of size > 1 that shards nothing would silently duplicate work: error.
    """
    sizes = {
        "heads": ("model.num_heads", model.num_heads),
        "kv_heads": ("model.num_kv_heads", model.num_kv_heads),
        "mlp": ("model.ffn_dim", model.ffn_dim),
        "vocab": ("model.vocab_size", model.vocab_size),
        "embed": ("model.dim", model.dim),
    }
    problems, fields_by_axes = [], {}
    for logical, entry in rules.activations:
        axes = _axes_of(entry)
        if logical not in sizes or not axes:
            continue
        field, value = sizes[logical]
        fields_by_axes.setdefault(axes, []).append((field, value))
        n = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
        if value % n:
            problems.append(f"{field}={value} is not divisible by mesh {'*'.join(axes)}={n}")
    if problems:
        fixes = []
        for axes, fields in fields_by_axes.items():
            g = math.gcd(*(v for _, v in fields))
            names = ", ".join(f for f, _ in fields)
            fixes.append(
                f"mesh {'*'.join(axes)} must divide {names}: one of {[d for d in range(1, g + 1) if g % d == 0]}"
            )
        raise ShardingError(
            f"the model does not split evenly over the mesh {dict(mesh.shape)}: {'; '.join(problems)}. "
            f"Fix: {'; '.join(fixes)}; or change those model fields; or use sharding.rule_set='fsdp' "
            "(no tensor parallelism)."
        )
    used = {a for _, entry in rules.activations for a in _axes_of(entry)}
    if specs is not None:
        used |= {a for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) for e in spec
                 for a in _axes_of(e)}
    idle = [a for a in MESH_AXES if mesh.shape[a] > 1 and a not in used]
    if idle:
        raise ShardingError(
            f"mesh axes {idle} have size > 1 but the rules shard nothing over them, so every device in "
            f"them would redo the same work. Set config.mesh.{idle[0]}=1, or use rules that use it "
            "(sharding.rule_set='fsdp_tp' uses all three axes)."
        )


def named_shardings(mesh: Mesh, specs):
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _trailing_dict_path(path) -> str:
    """The '/'-joined run of dict keys that ends a key path: where a param lives inside an opt state."""
    keys = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return "/".join(reversed(keys))


def opt_state_specs(abstract_opt_state, abstract_params, specs):
    """PartitionSpecs for an optimizer state, derived from the params' specs.

    Optax states hold param-shaped trees (Adam's mu/nu, Lion's mu, ...) whose leaves end in the same
    dict-key path as their param, so each leaf is matched to its param by that path:
    - same shape as the param: the param's spec;
    - the param's shape with one dim removed (Adafactor's factored row/column statistics): the param's
      spec with that dim removed;
    - scalars (step counts, injected hyperparameters) and size-1 placeholders: replicated.
    Anything else is an error rather than a silent replication of a large array.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    by_path = {path_str(p): (tuple(leaf.shape), tuple(s)) for (p, leaf), s in zip(flat_params, flat_specs)}

    def spec_for(path, leaf) -> P:
        shape = tuple(leaf.shape)
        if math.prod(shape) <= 1:
            return P()
        param = by_path.get(_trailing_dict_path(path))
        if param is not None:
            p_shape, p_spec = param
            p_spec = tuple(p_spec) + (None,) * (len(p_shape) - len(p_spec))
            if shape == p_shape:
                return P(*p_spec)
            for drop in range(len(p_shape)):
                if shape == p_shape[:drop] + p_shape[drop + 1 :]:
                    return P(*(p_spec[:drop] + p_spec[drop + 1 :]))
        raise ShardingError(
            f"optimizer-state leaf {path_str(path)!r} (shape {shape}) corresponds to no param of the same "
            "or factored shape, so its sharding cannot be derived from the param rules. Use an optimizer "
            "from llama_jax.optim, or extend opt_state_specs for this state."
        )

    return jax.tree_util.tree_map_with_path(spec_for, abstract_opt_state)


# ---------------------------------------------------------------------- activations
@contextlib.contextmanager
def activation_context(mesh: Mesh, activation_rules) -> Iterator[None]:
    """Inside a traced function: make `nn.with_logical_constraint` place activations on `mesh`.

    `use_abstract_mesh` (allowed under jit, unlike `jax.set_mesh`) gives bare PartitionSpecs a mesh;
    the concrete devices come from the jit's in/out shardings.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(activation_rules):
        yield


# ---------------------------------------------------------------------- batches
def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 (batch) split over data x fsdp; the rest replicated (a prefix spec fits any rank)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of the global batch that this process must supply to `shard_batch`.

    With the batch split over data x fsdp, each process's devices own a contiguous block of rows; a
    data loader reads exactly those (e.g. by seeding or striding on `slice.start`).
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ShardingError(
            f"this process's devices own non-contiguous batch rows {starts} of mesh {dict(mesh.shape)}; "
            "order the mesh so that each process's devices are adjacent along data x fsdp."
        )
    return slice(lo, hi)


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows (`process_batch_slice`) of each [batch, ...] array.

    Every process calls this with its own slice; no process ever holds the global batch.
    """
    sharding = batch_sharding(mesh)
    n = batch_shards(mesh)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        if v.ndim == 0 or global_rows % n:
            raise ShardingError(
                f"batch[{k!r}] has shape {v.shape} on each of {jax.process_count()} process(es), i.e. "
                f"{global_rows} global rows, which do not split over mesh data*fsdp = {n}. Use a (global) "
                f"batch size that is a multiple of {n}."
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def check_batch_fits_mesh(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    n = batch_shards(mesh)
    if grad_accum_steps < 1 or global_batch_size % grad_accum_steps:
        raise ShardingError(
            f"batch_size={global_batch_size} is not divisible by grad_accum_steps={grad_accum_steps}."
        )
    micro = global_batch_size // grad_accum_steps
    if micro % n:
        raise ShardingError(
            f"the microbatch batch_size/grad_accum_steps = {global_batch_size}/{grad_accum_steps} = {micro} "
            f"is not divisible by mesh data*fsdp = {n}. Make batch_size a multiple of "
            f"{n * grad_accum_steps}, or lower grad_accum_steps."
        )
