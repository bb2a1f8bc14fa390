"""Every config file loads, maps one-to-one onto ModelConfig, and builds its model abstractly."""

import pathlib
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from llama_jax.config import ModelConfig
from llama_jax.model import count_params, param_shapes

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path, *overrides):
    """Parse like `experiments.train` does; config_flags reads overrides from sys.argv itself."""
    argv = ["prog", f"--config={path}", *overrides]
    saved, sys.argv = sys.argv, argv
    try:
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", str(path), flag_values=fv)
        fv(argv)
        return fv.config
    finally:
        sys.argv = saved


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"shakespeare", "tiny", "ablation_example"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_model(path):
    c = _load(path)
    model = ModelConfig.from_dict(c.model)
    assert count_params(param_shapes(model)) == model.param_count()
    for field in ("num_steps", "batch_size", "seq_len", "seed", "log_every", "eval_every", "checkpoint_every",
                  "keep_checkpoints"):
        assert field in c, field
    assert c.seq_len <= model.max_seq_len


def test_command_line_override_reaches_the_model_config():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    c = _load(path, "--config.model.num_layers=3", "--config.model.norm=layernorm", "--config.optimizer.lr=0.5")
    model = ModelConfig.from_dict(c.model)
    assert (model.num_layers, model.norm, c.optimizer.lr) == (3, "layernorm", 0.5)


def test_bad_override_is_a_clear_error():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    with pytest.raises(Exception, match="num_layerz"):
        _load(path, "--config.model.num_layerz=3")
