"""Adapter workdirs: the reference to their frozen base, and the merged params that evaluation, sampling
and export read.

A LoRA run's checkpoints hold only the adapters (item "params") and their optimizer state; the base params
stay in the base workdir (`init_from`). WORKDIR/lora_base.json says exactly which base:

    {"workdir": "/abs/path/BASE", "step": 20, "fingerprint": "3f0c9a1e5b7d2c48"}

The fingerprint is a sha256 over every base param's path, shape, dtype and checksum (checkpoint.checksums:
any flipped bit changes it), of the base as the run holds it (its layer layout and lora.base_dtype).
Resuming, and every read of the merged params (load_workdir: eval_ppl, sample; convert_hf --to_hf),
restores that step of that workdir, fingerprints it again and refuses a base that differs, naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
from etils import epath
from jax.sharding import NamedSharding

from llama_jax import checkpoint
from llama_jax.errors import CheckpointError
from llama_jax.lora.adapters import adapter_specs, init_adapters, merge
from llama_jax.lora.config import LoraConfig
from llama_jax.model import ModelConfig

BASE_FILE = "lora_base.json"


@dataclasses.dataclass(frozen=True)
class BaseRef:
    workdir: str  # absolute path of the base workdir
    step: int  # its checkpoint the adapters were trained on
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.workdir} step {self.step} (fingerprint {self.fingerprint})"


def fingerprint(params) -> str:
    """16 hex digits of a sha256 over each param's path, shape, dtype and checksum (sharding-independent)."""
    sums = checkpoint.checksums(params)
    rows = {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype), sums[jax.tree_util.keystr(p)]]
            for p, x in jax.tree_util.tree_leaves_with_path(params)}
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def write_base_ref(workdir, ref: BaseRef) -> None:
    """Write WORKDIR/lora_base.json atomically."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (BASE_FILE + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(ref), indent=2, sort_keys=True))
    tmp.replace(path / BASE_FILE)


def read_base_ref(workdir) -> BaseRef:
    path = epath.Path(workdir) / BASE_FILE
    if not path.exists():
        raise CheckpointError(
            f"{workdir} is a LoRA run (config.json has lora.rank > 0) but {path} is missing, so the base its "
            f"adapters were trained on is unknown. Restore that file, or write it: {{\"workdir\": BASE_WORKDIR, "
            "\"step\": N, \"fingerprint\": ...}} (llama_jax.lora.workdir.write_base_ref)."
        )
    return BaseRef(**json.loads(path.read_text()))


def restore_base(init_from: str, abstract_base, *, recorded: BaseRef | None = None, where: str = "") -> tuple[Any, BaseRef]:
    """(base params restored from `init_from` onto `abstract_base`, their BaseRef).

    A fresh run (`recorded` None) takes init_from's newest checkpoint. Otherwise the step must be the
    recorded one when init_from is the recorded workdir (a base trained further since then still gives the
    adapters their base), else init_from's newest; either way its fingerprint must be the recorded one.
    `where` names the adapter workdir in messages.
    """
    path = os.path.abspath(os.fspath(init_from))
    step = checkpoint.latest_step(path)
    if recorded is not None and path == recorded.workdir:
        steps = checkpoint.all_steps(path)
        if recorded.step not in steps:
            raise CheckpointError(
                f"the adapters in {where} were trained on the base {recorded}, but {path} no longer has step "
                f"{recorded.step} (its checkpoints: {steps}). Restore that checkpoint of the base to use them."
            )
        step = recorded.step
    base = checkpoint.restore_params(path, abstract_base, step=step)
    ref = BaseRef(workdir=path, step=step, fingerprint=fingerprint(base))  # step: restore_params refused None
    if recorded is not None and ref.fingerprint != recorded.fingerprint:
        raise CheckpointError(
            f"the adapters in {where} were trained on the base {recorded}, but the base given is {ref}, whose "
            f"params differ. Pass --config.init_from={recorded.workdir} with that checkpoint in place, or "
            "train adapters for the new base in a new --workdir."
        )
    return base, ref


def _with_dtype(abstract, dtype):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=getattr(a, "sharding", None)), abstract)


def restore_model_params(workdir, config: dict[str, Any], abstract_params, *, step: int | None = None):
    """The params a workdir's model computes with, restored onto `abstract_params` (shapes, dtypes and
    optional shardings of the model's params): its checkpoint's params, or for a LoRA run (config.json
    with lora.rank > 0) its base with the adapters of checkpoint `step` (default: newest) merged in."""
    lora = LoraConfig.from_dict(config.get("lora"))
    if not lora.enabled:
        return checkpoint.restore_params(workdir, abstract_params, step=step)
    ref = read_base_ref(workdir)
    model = ModelConfig.from_dict(config["model"])
    abstract_base = _with_dtype(abstract_params, lora.base_dtype_for(model.param_dtype))
    base, _ = restore_base(ref.workdir, abstract_base, recorded=ref, where=str(workdir))
    plain = _with_dtype(abstract_params, model.storage_dtype)
    abstract_adapters = jax.eval_shape(
        lambda p: init_adapters(lora, p, jax.random.key(0), model.storage_dtype),
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), plain),
    )
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), abstract_params)
    placed = jax.tree.leaves(shardings)  # empty when the abstract params carry no shardings (the HF export)
    if placed and all(isinstance(s, NamedSharding) for s in placed):
        mesh = placed[0].mesh
        specs = adapter_specs(abstract_adapters, jax.tree.map(lambda s: s.spec, shardings))
        abstract_adapters = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)), abstract_adapters, specs
        )
    else:
        shardings = None
    adapters = checkpoint.restore_params(workdir, abstract_adapters, step=step)
    dtypes = jax.tree.map(lambda a: a.dtype, abstract_params)

    def merged(base, adapters):
        return jax.tree.map(lambda x, d: x.astype(d), merge(base, adapters, lora.scale), dtypes)

    jitted = jax.jit(merged) if shardings is None else jax.jit(merged, out_shardings=shardings)
    return jitted(base, adapters)
