"""`init_from`: a fine-tune takes its model config and tokenizer from the workdir it starts from.

    python -m experiments.train --config=configs/tiny.py --workdir=/runs/ft --config.init_from=/runs/llama1b_hf

A config file's model section is its preset's defaults, not a statement about the model being fine-tuned,
so with `init_from=SRC` the run's model is SRC's `config.json` model, except for

* the run-time fields (RUNTIME_FIELDS: how this run computes, not what the params are), which come from
  this run's config as usual (config file or command line), and
* fields set explicitly (`--config.model.X=...` on the command line; `train(..., explicit=...)` in Python).
  One that changes the params' shapes (dim, num_layers, vocab_size, ...) is refused, naming the field and
  SRC's value; one that does not (rope_theta, max_seq_len, norm_eps) is applied and named in the log line.

`data.tokenizer` becomes SRC/tokenizer (where SRC's chat template lives too) unless set explicitly. All of
this runs before the new workdir is touched: a refused config leaves it as it was (or absent).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection
from typing import TYPE_CHECKING

import jax

from llama_jax import checkpoint
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.model import ModelConfig, param_shapes

if TYPE_CHECKING:
    from llama_jax.experiment import Experiment

log = logging.getLogger("llama_jax.train")

# Model fields that say how a run computes (precision, memory, kernels, layout), never which params exist:
# each run chooses its own. (scan_layers changes the layout only; checkpoint.restore_params converts.)
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers", "loss_chunk")


def _shapes(config: ModelConfig) -> dict[str, tuple]:
    flat = param_shapes(config.replace(scan_layers=False))
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(flat)}


def resolve(exp: Experiment, explicit: Collection[str] = ()) -> Experiment:
    """`exp` with its model config and tokenizer taken from `exp.loop.init_from` (module docstring); `exp`
    itself when init_from is unset. `explicit`: dotted names of the fields the user set ("model.dim")."""
    src = exp.loop.init_from
    if not src:
        return exp
    try:
        source = checkpoint.read_config(src)
    except CheckpointError as e:
        raise CheckpointError(f"--config.init_from={src}: {e}") from None
    if "model" not in source:
        raise CheckpointError(f"--config.init_from={src}: its {checkpoint.CONFIG_FILE} has no 'model' entry.")
    base = ModelConfig.from_dict(source["model"])
    ours = exp.model.to_dict()
    runtime = {f: ours[f] for f in RUNTIME_FIELDS}
    asked = {f.removeprefix("model."): None for f in explicit if f.startswith("model.")}
    asked = {f: ours[f] for f in asked if f in ours and f not in RUNTIME_FIELDS and ours[f] != base.to_dict()[f]}
    kept = base.replace(**runtime)
    conflicts = ", ".join(f"--config.model.{f}={v!r} (its {f} is {base.to_dict()[f]!r})" for f, v in asked.items())
    try:
        model = kept.replace(**asked)
        changes_shapes = _shapes(model) != _shapes(kept)
    except ConfigError:
        changes_shapes = True
    if changes_shapes:
        raise ConfigError(
            f"--config.init_from={src} fine-tunes its model, but {conflicts} would change the params' shapes; "
            "drop those flags (the model config comes from the source), or start from scratch without "
            "--config.init_from."
        )
    data = exp.data
    tok_dir = checkpoint.tokenizer_dir(src)
    if "data.tokenizer" not in explicit and os.path.isdir(tok_dir):
        data = data.replace(tokenizer=tok_dir)
    replaced = [f"{f} {v!r}->{model.to_dict()[f]!r}" for f, v in ours.items() if model.to_dict()[f] != v]
    log.info(
        "init_from %s: model config from its config.json (%d params%s)%s; tokenizer %s%s; run-time fields "
        "from this config: %s", src, model.param_count(),
        f"; replaced this config's {', '.join(replaced)}" if replaced else "",
        f"; explicit overrides kept: {', '.join(f'{f}={v!r}' for f, v in asked.items())}" if asked else "",
        data.tokenizer, "" if data.tokenizer == tok_dir else " (set explicitly)" if "data.tokenizer" in explicit
        else f" (from this config: {src} has no tokenizer/)",
        ", ".join(f"{f}={v!r}" for f, v in runtime.items()),
    )
    return dataclasses.replace(exp, model=model, data=data)
