"""The workdir on disk: a self-contained directory that training, evaluation, sampling and conversion share.

    DIR/config.json          the resolved experiment config (its "model" entry is a ModelConfig dict)
    DIR/tokenizer/           tokenizer.model, tokenizer.json or byte.json (see llama_jax.data.tokenizer)
    DIR/checkpoints/<step>/  Orbax checkpoints: item "params" always; "train_state" (optimizer state,
                             step, skip streak) and "data_state" when training wrote them
    DIR/metrics.jsonl, DIR/tensorboard/, DIR/profile/   written by training (llama_jax.train.metrics)

Evaluation and sampling restore only the "params" item, so a workdir imported from HF (params only) and
one written by training are read the same way. Resuming restores all three items, after
`check_resume_config` has compared the new config with DIR/config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.data.config import DataConfig
from llama_jax.errors import CheckpointError, ConfigMismatchError
from llama_jax.lora.config import LoraConfig
from llama_jax.model import ModelConfig, stack_layers, unstack_layers
from llama_jax.sharding import MeshConfig, ShardingConfig
from llama_jax.train.config import EvalTasksConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
DISCARDED_DIR = "discarded"

log = logging.getLogger(__name__)


def write_config(workdir, config: dict[str, Any]) -> None:
    """Write DIR/config.json atomically (write to a temp file, then rename)."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    tmp.replace(path / CONFIG_FILE)


def read_config(workdir) -> dict[str, Any]:
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: {workdir} is not a llama_jax workdir. Create one with "
            "`python -m experiments.train --workdir=...` or `python -m experiments.convert_hf --workdir=...`."
        )
    return json.loads(path.read_text())


def read_model_config(workdir) -> ModelConfig:
    return ModelConfig.from_dict(read_config(workdir)["model"])


def manager(workdir, *, max_to_keep: int | None = None, keep_period: int | None = None, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        epath.Path(workdir) / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period, create=True, **options
        ),
        item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "train_state": ocp.StandardCheckpointHandler(),
            "data_state": ocp.JsonCheckpointHandler(),
            "checksums": ocp.JsonCheckpointHandler(),
        },
    )


# ---------------------------------------------------------------------- integrity
# Orbax/tensorstore store raw chunks without a checksum: a flipped bit in a params file restored as a wrong
# value (6 of 16 single-bit flips in a probe). Each save therefore writes a checksum per array, computed on
# the device in one jitted pass (sharding-independent: modular uint32 sums), and every restore verifies it.
_CHECKSUM_PERIOD = 65521  # weights 1, 3, 5, ... repeat with this period


def _checksum(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the array's bits. The weights are odd, so flipping any single bit
    (2**k * odd != 0 mod 2**32) always changes it; swapped values at different positions change it too."""
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
    weights = 2 * (jnp.arange(x.size, dtype=jnp.uint32) % _CHECKSUM_PERIOD) + 1
    return jnp.sum(bits.reshape(-1) * weights, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def checksums(tree) -> dict[str, int]:
    """{param path: checksum} of every array leaf of `tree` (device arrays, any sharding)."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree)) if jax.tree.leaves(tree) else ((), ())
    values = jax.device_get(_checksums_jit(list(leaves)))
    return {jax.tree_util.keystr(p): int(v) for p, v in zip(paths, values)}


def verify(tree, expected: dict[str, int] | None, *, where: str, advice: str) -> None:
    """Raise CheckpointError naming every array whose checksum differs from the one saved with it; with no
    record (`expected` None) warn loudly: the arrays cannot be checked, and a flipped bit would pass."""
    if expected is None:
        log.warning(
            "%s has no readable checksum record (written before checksums existed, or its checksums/ item is "
            "missing or damaged): it is restored UNVERIFIED, and a damaged array would go unnoticed. %s",
            where, advice,
        )
        return
    got = checksums(tree)
    bad = sorted(k for k in got if expected.get(k) != got[k])
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{where} is damaged: {len(bad)} array(s) differ from the checksums written with it ({shown}). "
            f"{advice}"
        )


_finite_jit = jax.jit(lambda leaves: [jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_arrays(tree) -> list[str]:
    """The paths of the floating-point leaves of `tree` holding a NaN or an infinity (one jitted pass)."""
    flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jax.device_get(_finite_jit([x for _, x in flat]))
    return [path for (path, _), ok in zip(flat, finite) if not ok]


def check_finite(tree, *, where: str, advice: str, error: type[Exception] = CheckpointError) -> None:
    """Raise `error` naming the arrays of `tree` that hold a NaN or an infinity: a diverged or damaged model
    whose use would print garbage (NUL bytes from a sampler) with a zero exit status."""
    bad = nonfinite_arrays(tree)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise error(f"{where} holds non-finite params: {len(bad)} array(s) with NaN or inf ({shown}). {advice}")


def all_steps(workdir) -> list[int]:
    """The steps of the *complete* checkpoints, ascending (Orbax never lists a half-written one)."""
    if not (epath.Path(workdir) / CHECKPOINT_DIR).is_dir():
        return []  # checked first: opening a manager would create the directory
    with manager(workdir) as mngr:
        return sorted(mngr.all_steps())


def latest_step(workdir) -> int | None:
    """The newest complete checkpoint step, or None."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def save_params(workdir, params, step: int = 0) -> None:
    """Save a params-only checkpoint (what `experiments.convert_hf` writes)."""
    with manager(workdir) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            checksums=ocp.args.JsonSave({"params": checksums(params)}),
        ), force=True)
        mngr.wait_until_finished()


def restore_params(workdir, abstract_params, step: int | None = None):
    """Restore the "params" item onto `abstract_params` (ShapeDtypeStructs, with shardings if sharded).

    Shapes are checked against the model before anything is read, and every mismatch is named.
    """
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise CheckpointError(
            f"no complete checkpoint in {epath.Path(workdir) / CHECKPOINT_DIR}; train first or point "
            "--workdir at a directory that has one."
        )
    where = f"{workdir}/{CHECKPOINT_DIR}/{step}"
    with manager(workdir) as mngr:
        older = [s for s in mngr.all_steps() if s < step]
        advice = f"Use an older checkpoint with --step={max(older)}." if older else "It is the only checkpoint."
        with _read_or_refuse(where, advice):
            items = mngr.item_metadata(step)
        stored = items["params"] if items is not None and "params" in items else None
        target = abstract_params
        if stored is not None and ("layers" in stored) != ("layers" in abstract_params):
            # Saved with the other scan_layers layout (e.g. an HF import fine-tuned with scanned layers):
            # restore in the stored layout, each shard where it will end up, then restack on device.
            target = _relayout_abstract(abstract_params, scanned="layers" in stored)
        if stored is not None:
            check_shapes(target, stored, where=f"{workdir} step {step}")
            target = _as_stored_dtypes(target, stored)
        with _read_or_refuse(where, advice):
            params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
        sums = _read_checksums(mngr, step, items)
    verify(params, sums.get("params"), where=where, advice=advice)
    if target is not abstract_params:  # another layout and/or dtype; each relayout is the identity on its own
        relayout = stack_layers if "layers" in abstract_params else unstack_layers
        shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), abstract_params)
        dtypes = jax.tree.map(lambda a: a.dtype, abstract_params)
        params = jax.jit(lambda p: jax.tree.map(lambda x, d: x.astype(d), relayout(p), dtypes),
                         out_shardings=shardings)(params)
    return params


@contextlib.contextmanager
def _read_or_refuse(where: str, advice: str):
    """Turn a failed Orbax/TensorStore read of checkpoint `where` (a damaged metadata, b-tree or data file)
    into one CheckpointError line: what failed first, and `advice`; the full error stays its __cause__."""
    _quiet_orbax_leftovers()  # before the read: its leftovers start printing before the error reaches here
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where} cannot be read, its files are damaged ({_first_line(e)}). {advice}") from e


def _first_line(e: BaseException, limit: int = 400) -> str:
    """The gist of an Orbax/TensorStore error: its first line without the TensorStore spec (a page of JSON)."""
    text = str(e).split("\n", 1)[0]
    for spec in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(spec, 1)[0]
    text = text.strip().rstrip(".") or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class _LeftoverTaskFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A Task's or a bare Future's (asyncio words them differently; which one a run hits is timing).
        return not record.getMessage().startswith(("Task exception was never retrieved",
                                                   "Future exception was never retrieved"))


_quieted = False


def _quiet_orbax_leftovers() -> None:
    """When one read fails, Orbax closes its event loop while the checkpoint's other reads are still in
    flight; each then prints a traceback ("Event loop is closed", or its abandoned coroutine's error, through
    sys.unraisablehook; "Task/Future exception was never retrieved" through asyncio's logger): a screen of noise
    around the one-line error. Drop exactly those, for the rest of the process; every other unraisable error
    and log record still shows."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        abandoned_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or abandoned_read):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_LeftoverTaskFilter())


def _as_stored_dtypes(target, stored):
    """`target` with each leaf in the dtype it was saved in (itself when all match): restoring in another
    dtype would cast before `verify`, whose checksums are of the saved bits (a f32 base restored as bf16
    read as "damaged"). restore_params casts after verifying."""
    saved = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(stored)
             if hasattr(v, "dtype")}
    flat = jax.tree_util.tree_leaves_with_path(target)
    if all(saved.get(jax.tree_util.keystr(k), a.dtype) == a.dtype for k, a in flat):
        return target
    return jax.tree_util.tree_map_with_path(
        lambda k, a: jax.ShapeDtypeStruct(a.shape, saved.get(jax.tree_util.keystr(k), a.dtype),
                                          sharding=getattr(a, "sharding", None)), target)


def _relayout_abstract(abstract, *, scanned: bool):
    """`abstract` in the other layer layout; a stacked leaf's shards are its per-layer shards, unsplit on
    the leading layer axis."""
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    shapes = jax.eval_shape(stack_layers if scanned else unstack_layers, plain)

    def source(path):
        keys = [k.key for k in path]
        if scanned and keys[0] == "layers":  # stacked leaf <- layer 0's leaf
            keys[0] = "layers_0"
        elif not scanned and keys[0].startswith("layers_"):  # one layer's leaf <- the stacked leaf
            keys[0] = "layers"
        node = abstract
        for k in keys:
            node = node[k]
        return keys[0], getattr(node, "sharding", None)

    def with_sharding(path, shape):
        first, sh = source(path)
        if isinstance(sh, NamedSharding) and first in ("layers", "layers_0") and first != path[0].key:
            spec = P(None, *sh.spec) if scanned else P(*sh.spec[1:])
            sh = NamedSharding(sh.mesh, spec)
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(with_sharding, shapes)


def check_shapes(expected, stored, *, where: str) -> None:
    """Raise naming every param whose stored shape differs from (or is missing in) the model's."""
    exp = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(stored)
        if hasattr(v, "shape")
    }
    problems = [f"{k}: model {s}, checkpoint {got.get(k, 'missing')}" for k, s in exp.items() if got.get(k) != s]
    problems += [f"{k}: in checkpoint, not in model" for k in got if k not in exp]
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointError(
            f"checkpoint {where} does not match the model config ({len(problems)} params differ):\n  {shown}\n"
            "Use the model config the checkpoint was written with (its config.json), or start fresh."
        )


def tokenizer_dir(workdir) -> str:
    return os.fspath(epath.Path(workdir) / TOKENIZER_DIR)


def discard_after(workdir, step: int) -> list[int]:
    """Move the checkpoints newer than `step` to WORKDIR/discarded/<step> (kept, but out of Orbax's sight:
    a resumed run saves those step numbers again). Returns the steps moved."""
    moved = [s for s in all_steps(workdir) if s > step]
    root = epath.Path(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a later resume_step may discard the same step numbers again
    for s in moved:
        (root / DISCARDED_DIR).mkdir(parents=True, exist_ok=True)
        (root / CHECKPOINT_DIR / str(s)).rename(root / DISCARDED_DIR / f"{s}-{stamp}")
    if moved:
        log.warning(
            "resume_step=%d: moved the newer checkpoint(s) %s to %s", step, moved, root / DISCARDED_DIR
        )
    return moved


def incomplete_checkpoints(workdir) -> list[str]:
    """Orbax temp dirs of interrupted saves (never restored; the previous checkpoint is used instead)."""
    root = epath.Path(workdir) / CHECKPOINT_DIR
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if "tmp" in p.name)


# ---------------------------------------------------------------------- the training state
def save_train_state(mngr: ocp.CheckpointManager, step: int, params, train_state, data_state: dict) -> bool:
    """Queue an (async) save of params, the rest of the train state (a pytree), the data state (JSON) and
    their checksums (computed now, on the device: ~1 ms for a 1M-param model here, one pass over the state)."""
    sums = {"params": checksums(params), "train_state": checksums(train_state)}
    return mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            data_state=ocp.args.JsonSave(data_state),
            checksums=ocp.args.JsonSave(sums),
        ),
        force=True,
    )


def restore_train_state(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_train_state):
    """(params, train state, data state) of `step`, restored onto the abstract targets' shardings.

    A checkpoint whose arrays do not fit the targets (a config change that alters what is trained, even
    with allow_config_change) is refused saying so; one that cannot be read is refused as damaged."""
    where = f"{mngr.directory}/{step}"
    older = [s for s in mngr.all_steps() if s < step]
    advice = (f"Resume from an older one with --config.resume_step={max(older)}." if older
              else "It is the only checkpoint: start a new run.")
    with _read_or_refuse(where, advice):
        stored = mngr.item_metadata(step)
    if stored is not None and "rng" in (stored.get("train_state") or {}):
        raise CheckpointError(
            f"{where} was written by an older llama_jax (its train state holds a dropout "
            "rng that the model never used), so it cannot be resumed. Its params still evaluate and "
            "sample; to keep training from them start a new run with "
            f"--config.init_from={epath.Path(mngr.directory).parent} (fresh optimizer state)."
        )
    if stored is not None:
        _check_resumable(where, epath.Path(mngr.directory).parent,
                         {"params": abstract_params, "train_state": abstract_train_state},
                         {"params": stored.get("params"), "train_state": stored.get("train_state")})
    with _read_or_refuse(where, advice):
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train_state=ocp.args.StandardRestore(abstract_train_state),
            data_state=ocp.args.JsonRestore(),
        ))
    sums = _read_checksums(mngr, step, stored)
    verify(out["params"], sums.get("params"), where=where, advice=advice)
    verify(out["train_state"], sums.get("train_state"), where=where, advice=advice)
    return out["params"], out["train_state"], out["data_state"]


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"params/embed/embedding": shape, ...}: paths by key name, so a saved tree (Orbax stores optax's
    named tuples as dicts) and the live one compare equal."""
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return {"/".join(name(k) for k in path): tuple(getattr(x, "shape", ()))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_resumable(where: str, workdir, expected, stored) -> None:
    """Refuse, naming the arrays, a checkpoint whose params or optimizer state the config no longer fits:
    allow_config_change carries over changes that keep them (lr, schedule, clipping, data), not these."""
    want, got = _leaf_shapes(expected), _leaf_shapes(stored)
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if not diff:
        return
    shown = ", ".join(f"{k}: checkpoint {got.get(k, 'absent')}, config {want.get(k, 'absent')}" for k in diff[:3])
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    fix = ("train the new model in a new --workdir" if any(k.startswith("params/") for k in diff) else
           f"start a new --workdir from these params with --config.init_from={workdir} (fresh optimizer state)")
    raise ConfigMismatchError(
        f"{where} cannot be resumed with this config: it changes the shapes of the params or optimizer state "
        f"({len(diff)} arrays differ: {shown}{more}), which --config.allow_config_change cannot carry over. "
        f"Undo that change (the run's config is {workdir}/{CONFIG_FILE}), or {fix}."
    )


def _read_checksums(mngr: ocp.CheckpointManager, step: int, items) -> dict:
    """The checksum record of `step`; {} when it is missing or unreadable, which `verify` warns about. Read
    on its own, so a damaged record costs the verification, not the restore of intact arrays."""
    if not _has_item(items, "checksums"):
        return {}
    try:
        record = mngr.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
    except Exception:  # any damage to the record: the warning names the checkpoint
        return {}
    return record if isinstance(record, dict) else {}


def _has_item(items, name: str) -> bool:
    """Whether a checkpoint's item metadata lists `name` (checkpoints from older versions lack some)."""
    return items is not None and name in items  # a JSON item's metadata is None: test the key


# ---------------------------------------------------------------------- resuming with a config
# Fields that may differ between a run and the one it resumes: they steer the loop (or where it logs), not the
# result.
RUN_CONTROL_FIELDS = frozenset(
    {"num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_period",
     "profile_start", "profile_steps", "allow_config_change", "resume_step", "spike_factor",
     "max_consecutive_skips", "wandb_project"}
)


# Where the data is found, not which data (in config.data, a data.sources entry or a data.eval_sets entry:
# `_where_not_what` matches a field name's last part): a run moved to other machines, or resumed offline
# from a TFDS manual dir, reads the same text (the data state's fingerprint checks that, by content).
DATA_LOCATION_FIELDS = frozenset({"data_dir", "manual_dir", "cache_dir"})


def _where_not_what(field: str) -> bool:
    """A config field that may change on resume: run control, or (under data) where the data lives."""
    return field in RUN_CONTROL_FIELDS or (field.startswith("data.")
                                           and field.rsplit(".", 1)[-1] in DATA_LOCATION_FIELDS)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lines `field: old -> new` for every leaf that differs (JSON-normalised)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, name + ".")
        elif _normalise(a) != _normalise(b):
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def _normalise(v):
    return [_normalise(x) for x in v] if isinstance(v, list | tuple) else v


# Sections compared field by field after filling in defaults (the optimizer and loop fields are compared
# as written; importing their classes here would be circular).
_RESOLVED_SECTIONS = {"model": ModelConfig, "data": DataConfig, "mesh": MeshConfig, "sharding": ShardingConfig,
                      "lora": LoraConfig, "eval_tasks": EvalTasksConfig}


def _resolved(config: dict) -> dict:
    """config.json with those sections' defaults and derived sizes filled in: a field added since the
    workdir was written (absent from its config.json) equals its default, and a head_dim written out by an
    older version equals the 0 (derive) a new config writes."""
    return {**config, **{name: dataclasses.asdict(kind.from_dict(config.get(name)))
                         for name, kind in _RESOLVED_SECTIONS.items()}}


def check_resume_config(workdir, new: dict) -> None:
    """Refuse to resume `workdir` with a config (`Experiment.to_dict()`) that changes what is computed,
    showing the diff, unless new["allow_config_change"]."""
    old = read_config(workdir)
    if "num_steps" not in old:
        raise ConfigMismatchError(
            f"{workdir} holds an imported checkpoint, not a training run. Fine-tune from it with "
            f"--config.init_from={workdir} and a new --workdir."
        )
    diff = [
        line for line in config_diff(_resolved(old), _resolved(new))
        if not _where_not_what(line.split(":")[0])
    ]
    if diff and not new["allow_config_change"]:
        shown = "\n  ".join(diff)
        raise ConfigMismatchError(
            f"{workdir} was trained with a different config; resuming would mix two experiments:\n  {shown}\n"
            "Use a new --workdir, or pass --config.allow_config_change=True to resume with the new values."
        )
