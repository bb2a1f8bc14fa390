"""Loading a workdir for inference: model config, params (placed on a mesh), tokenizer, experiment config.

    model_config, params, tokenizer, config = load_workdir(DIR)              # params on the default mesh
    model_config, params, tokenizer, config = load_workdir(DIR, mesh=mesh)   # sharded by DIR's rules

Works the same for a workdir written by training (config.json holds the whole experiment config) and one
imported from Hugging Face (config.json holds only "model" and "source"): only the "params" item of the
checkpoint is read. Params are placed by the sharding rules of the workdir's `config.sharding` when it has
one, else by the default "fsdp_tp" set, which shards over whichever mesh axes are > 1 (on a mesh with only
a "data" axis every param is replicated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh

from llama_jax import checkpoint, sharding
from llama_jax.data import TEMPLATES, ChatTemplate, Tokenizer, check_vocab, load_template, load_tokenizer
from llama_jax.data.chat import warn_missing_control_tokens
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.lora.workdir import restore_model_params
from llama_jax.model import ModelConfig, param_shapes


def inference_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh. With no -1 among the sizes the mesh takes the first
    data*fsdp*tensor devices (so the default 1x1x1 is the default device); a -1 absorbs all the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    if -1 not in (data, fsdp, tensor):
        n = data * fsdp * tensor
        if n < len(devices):
            devices = devices[:n]
    return sharding.make_mesh(sizes, devices)


def workdir_rules(config: dict[str, Any]) -> sharding.RuleSet:
    """The sharding rules of a workdir's config.json (its `sharding` section; default "fsdp_tp")."""
    return sharding.resolve_rules(sharding.ShardingConfig.from_dict(config.get("sharding")))


def param_shardings(model_config: ModelConfig, mesh: Mesh, rules: sharding.RuleSet):
    """NamedShardings of the model's params on `mesh` under `rules` (every config error raised here)."""
    sharding.check_model_fits_mesh(model_config, mesh, rules)
    specs = sharding.param_specs(param_shapes(model_config), rules.params, mesh)
    sharding.check_model_fits_mesh(model_config, mesh, rules, specs)
    return sharding.named_shardings(mesh, specs)


def load_tokenizer_of(workdir, model_config: ModelConfig) -> Tokenizer:
    """DIR/tokenizer, checked to fit the model's vocab."""
    tok_dir = epath.Path(checkpoint.tokenizer_dir(workdir))
    if not tok_dir.exists():
        raise CheckpointError(
            f"{tok_dir} does not exist: the workdir has no tokenizer. Training writes it; for an imported "
            "HF model copy its tokenizer.json (and tokenizer_config.json) into that directory."
        )
    tokenizer = load_tokenizer(str(tok_dir))
    check_vocab(tokenizer, model_config.vocab_size)
    return tokenizer


def load_chat_template(workdir, tokenizer: Tokenizer, spec: str = "") -> ChatTemplate:
    """The chat template to prompt a workdir's model with: `spec` (a name in llama_jax.data.chat.TEMPLATES,
    or a .jinja file), else DIR/tokenizer's own (chat_template.jinja or tokenizer_config.json's
    chat_template; `experiments.convert_hf` copies it there, and training writes the one it used)."""
    template = load_template(spec, checkpoint.tokenizer_dir(workdir), tokenizer.special_token_strings())
    if template is None:
        raise ConfigError(
            f"{checkpoint.tokenizer_dir(workdir)} has no chat template (chat_template.jinja, or chat_template in "
            f"tokenizer_config.json): pass --chat_template=NAME ({', '.join(sorted(TEMPLATES))}) or a .jinja file."
        )
    warn_missing_control_tokens(template, tokenizer)
    return template


def load_workdir(
    workdir, mesh: Mesh | None = None, *, step: int | None = None, rules: sharding.RuleSet | None = None
) -> tuple[ModelConfig, Any, Tokenizer, dict[str, Any]]:
    """(model config, params, tokenizer, the experiment config dict of config.json) of a workdir.

    Params are restored from the latest complete checkpoint (or `step`) directly into their shards on
    `mesh` (default: the default device alone), placed by `rules` (default: the workdir's).
    Raises CheckpointError (no workdir / checkpoint, shapes that do not match), TokenizerError (no
    tokenizer, or one with more ids than the model's vocab) or ShardingError, each naming the fix.
    """
    workdir = str(workdir)
    if not epath.Path(workdir).exists():
        raise CheckpointError(
            f"workdir {workdir} does not exist. Create one with `python -m experiments.train --workdir=...` "
            "or `python -m experiments.convert_hf --hf_dir=... --workdir=...`."
        )
    if not epath.Path(workdir).is_dir():
        # Otherwise the message would be that {workdir}/config.json is missing, which hides the mistake.
        raise CheckpointError(
            f"workdir {workdir} is a file, not a directory; --workdir must name a workdir (the directory "
            "holding config.json and checkpoints/), not a file in it."
        )
    config = checkpoint.read_config(workdir)
    if "model" not in config:
        raise CheckpointError(f"{workdir}/{checkpoint.CONFIG_FILE} has no 'model' entry.")
    model_config = ModelConfig.from_dict(config["model"])
    tokenizer = load_tokenizer_of(workdir, model_config)
    steps = checkpoint.all_steps(workdir)
    if not steps:
        raise CheckpointError(
            f"{workdir} has no complete checkpoint in {checkpoint.CHECKPOINT_DIR}/: train first (or let a "
            "running training save one), or import a model with `python -m experiments.convert_hf`."
        )
    if step is not None and step not in steps:
        # Checked here because Orbax's own error for a missing step does not say which steps exist.
        raise CheckpointError(
            f"{workdir} has no checkpoint at step {step}; its complete checkpoints are at steps {steps}. "
            "Pass one of them as --step, or omit --step for the latest."
        )
    mesh = inference_mesh() if mesh is None else mesh
    rules = workdir_rules(config) if rules is None else rules
    shardings = param_shardings(model_config, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), param_shapes(model_config), shardings
    )
    params = restore_model_params(workdir, config, abstract, step=step)  # a LoRA run's: base + adapters merged
    return model_config, params, tokenizer, config
