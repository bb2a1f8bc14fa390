"""The experiment config: one ConfigDict for `configs/*.py` and the command line, built once into typed,
frozen, self-validating sections.

    config = base_config("shakespeare")          # what a configs/*.py get_config() starts from
    config.optimizer.lr = 4e-3                   # ... or --config.optimizer.lr=4e-3 on the command line
    exp = Experiment.from_config(config)         # every section checked; unknown keys are errors

Sections and the module that owns (and is the only reader of) each:
  config.model       ModelConfig    llama_jax/model/config.py    exactly the model's fields
  config.data        DataConfig     llama_jax/data/config.py
  config.optimizer   OptimizerConfig llama_jax/train/optim.py
  config.mesh        MeshConfig     llama_jax/sharding.py
  config.sharding    ShardingConfig llama_jax/sharding.py
  config.lora        LoraConfig     llama_jax/lora/config.py     rank 0 = off
  config.eval_tasks  EvalTasksConfig llama_jax/train/config.py   lm_eval tasks during training; tasks "" = off
  config.<top level> LoopConfig     llama_jax/train/config.py    seed, num_steps, batch_size, seq_len, ...

Each field's default is written once, in its section's dataclass; `base_config` derives the ConfigDict
from them, so a default cannot drift between the file and the code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from llama_jax.data import DataConfig
from llama_jax.errors import ConfigError
from llama_jax.lora import LoraConfig, adapter_param_count, train_also_matmul_param_count
from llama_jax.model import ModelConfig, preset
from llama_jax.sharding import MeshConfig, ShardingConfig
from llama_jax.train.config import EvalTasksConfig, LoopConfig
from llama_jax.train.optim import OptimizerConfig

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "mesh": MeshConfig,
    "sharding": ShardingConfig,
    "lora": LoraConfig,
    "eval_tasks": EvalTasksConfig,
}


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    mesh: MeshConfig
    sharding: ShardingConfig
    lora: LoraConfig
    eval_tasks: EvalTasksConfig
    loop: LoopConfig

    def __post_init__(self):
        if self.loop.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"seq_len={self.loop.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; lower "
                "--config.seq_len or raise --config.model.max_seq_len."
            )
        if self.lora.enabled and not self.loop.init_from:
            raise ConfigError(
                f"lora.rank={self.lora.rank} trains adapters on a frozen base model, but init_from is unset: "
                "pass --config.init_from=BASE_WORKDIR (a workdir written by experiments.train or "
                "experiments.convert_hf)."
            )
        if self.loop.batch_size % self.loop.grad_accum_steps:
            raise ConfigError(
                f"batch_size={self.loop.batch_size} is not divisible by grad_accum_steps="
                f"{self.loop.grad_accum_steps}."
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Experiment:
        """Build from an experiment ConfigDict (or the dict of a workdir's config.json)."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        sections = {name: kind.from_dict(d.pop(name, None)) for name, kind in SECTIONS.items()}
        loop_fields = {f.name for f in dataclasses.fields(LoopConfig)}
        unknown = sorted(set(d) - loop_fields)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}; the top-level fields are {sorted(loop_fields)} and the "
                f"sections {sorted(SECTIONS)}."
            )
        return cls(loop=LoopConfig.from_dict(d), **sections)

    def to_dict(self) -> dict[str, Any]:
        """The ConfigDict layout (what config.json holds): sections by name, loop fields at the top."""
        return {**self.loop.to_dict(), **{name: getattr(self, name).to_dict() for name in SECTIONS}}

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        """The model FLOPs per token of the train step (MFU counts these): 6N + attention, or with LoRA
        4N + 6 * adapter params + 2 * lora.train_also's matmul params + attention
        (ModelConfig.flops_per_token). `seq_len` defaults to the loop's; 0 gives the matmul FLOPs alone."""
        seq_len = self.loop.seq_len if seq_len is None else seq_len
        if not self.lora.enabled:
            return self.model.flops_per_token(seq_len)
        return self.model.flops_per_token(
            seq_len, adapter_params=adapter_param_count(self.lora, self.model),
            weight_grad_params=train_also_matmul_param_count(self.lora, self.model))

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size or self.loop.batch_size


def base_config(model_preset: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    """The experiment ConfigDict every `configs/*.py` starts from: every section at its defaults, the
    model from a preset (llama_jax.model.PRESETS) with `model_overrides`."""
    c = ml_collections.ConfigDict(LoopConfig().to_dict())
    for name, kind in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(kind().to_dict() if name != "model" else
                                            preset(model_preset, **model_overrides).to_dict())
    return c


def config_from_file(path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py), as `--config=PATH` loads it; a fresh ConfigDict each call."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

