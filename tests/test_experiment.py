"""The experiment config: every config file loads into typed sections and builds its model abstractly;
command-line overrides reach the model with derived sizes derived again; bad keys and values are errors."""

import pathlib
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from llama_jax.data import DataConfig
from llama_jax.errors import ConfigError, ShardingError
from llama_jax.experiment import SECTIONS, Experiment, base_config
from llama_jax.model import ModelConfig, count_params, param_shapes, preset
from llama_jax.sharding import MeshConfig
from llama_jax.tools import sweep
from llama_jax.train import LoopConfig, OptimizerConfig

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
    exp = Experiment.from_config(c)
    assert count_params(param_shapes(exp.model)) == exp.model.param_count()
    assert exp.to_dict() == Experiment.from_config(exp.to_dict()).to_dict()  # config.json round trip
    assert exp.loop.seq_len <= exp.model.max_seq_len


def test_command_line_override_reaches_the_model_config():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    c = _load(path, "--config.model.num_layers=3", "--config.model.norm=layernorm", "--config.optimizer.lr=0.5")
    model = ModelConfig.from_dict(c.model)
    assert (model.num_layers, model.norm, c.optimizer.lr) == (3, "layernorm", 0.5)


def test_bad_override_is_a_clear_error():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    with pytest.raises(Exception, match="num_layerz"):
        _load(path, "--config.model.num_layerz=3")


# ---------------------------------------------------------------------- derived sizes follow overrides
@pytest.mark.parametrize(
    "overrides",
    [
        dict(dim=128),
        dict(num_heads=2, num_kv_heads=2),
        dict(num_kv_heads=1),
        dict(dim=96, num_heads=6, num_kv_heads=3, ffn_dim=256),
        dict(head_dim=32),
    ],
    ids=str,
)
def test_command_line_model_overrides_build_the_preset_model(overrides):
    """`configs/tiny.py --config.model.dim=128` once kept the preset's head_dim (a 64-wide attention in a
    128-wide model, 280,192 params instead of 329,344). The params tree must equal the preset's with the
    same overrides, leaf by leaf."""
    path = next(p for p in CONFIGS if p.stem == "tiny")
    exp = Experiment.from_config(_load(path, *(f"--config.model.{k}={v}" for k, v in overrides.items())))
    want = preset("tiny", **overrides)
    assert exp.model == want
    got_shapes = {k: v.shape for k, v in _flat(param_shapes(exp.model)).items()}
    assert got_shapes == {k: v.shape for k, v in _flat(param_shapes(want)).items()}
    assert count_params(param_shapes(exp.model)) == want.param_count()


def test_dim_override_changes_the_param_count():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    exp = Experiment.from_config(_load(path, "--config.model.dim=128"))
    assert exp.model.head_dim == 32
    assert exp.model.param_count() == preset("tiny", dim=128).param_count() != preset("tiny").param_count()


def test_heads_that_do_not_divide_dim_are_refused_through_the_cli():
    path = next(p for p in CONFIGS if p.stem == "tiny")
    with pytest.raises(ConfigError, match=r"model.dim=64 is not divisible by model.num_heads=6"):
        Experiment.from_config(_load(path, "--config.model.num_heads=6", "--config.model.num_kv_heads=6"))


def test_replace_derives_head_dim_again():
    assert preset("tiny").replace(dim=128).head_dim == 32
    assert preset("tiny", head_dim=8).replace(dim=128).head_dim == 8  # explicit stays explicit


def test_stored_config_keeps_derived_values_out():
    assert base_config("tiny").model.head_dim == 0
    assert Experiment.from_config(base_config("tiny")).to_dict()["model"]["head_dim"] == 0


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------- sections
def test_base_config_is_the_section_defaults():
    """Each default is written once, in its section's dataclass; the ConfigDict is derived from them."""
    c = base_config("tiny")
    for name, kind in SECTIONS.items():
        if name != "model":
            assert c[name].to_dict() == kind().to_dict(), name
    assert {k: c[k] for k in LoopConfig().to_dict()} == LoopConfig().to_dict()


@pytest.mark.parametrize("section", ["data", "optimizer", "mesh", "sharding", "model", "eval_tasks"])
def test_unknown_key_in_any_section_is_an_error(section):
    d = Experiment.from_config(base_config("tiny")).to_dict()
    d[section]["typo_field"] = 1
    with pytest.raises(ConfigError, match=rf"unknown {section} config field\(s\) \['typo_field'\]"):
        Experiment.from_config(d)


def test_eval_tasks_section_lists_its_tasks_and_rejects_bad_values():
    c = base_config("tiny")
    assert Experiment.from_config(c).eval_tasks.task_list == []  # the default: off
    c.eval_tasks.tasks = " llama_jax_tiny_mc, arc_easy_local ,"
    assert Experiment.from_config(c).eval_tasks.task_list == ["llama_jax_tiny_mc", "arc_easy_local"]
    c.eval_tasks.every = -1
    with pytest.raises(ConfigError, match=r"invalid eval_tasks: every=-1 must be >= 0"):
        Experiment.from_config(c)


def test_unknown_top_level_key_is_an_error():
    d = Experiment.from_config(base_config("tiny")).to_dict()
    d["num_step"] = 3
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['num_step'\]"):
        Experiment.from_config(d)


@pytest.mark.parametrize(
    "kind, field, value, message",
    [
        (OptimizerConfig, "lr", "fast", r"optimizer.lr=.fast. must be of type float"),
        (OptimizerConfig, "lr", -1.0, r"optimizer.lr=-1.0 must be >= 0"),
        (OptimizerConfig, "schedule", "cosin", r"optimizer.schedule='cosin' is not one of"),
        (DataConfig, "packing", "greedy", r"data.packing='greedy' is not one of"),
        (DataConfig, "add_bos", 1, r"data.add_bos=1 must be of type bool"),
        (LoopConfig, "num_steps", 0, r"num_steps=0 must be a positive integer"),
        (LoopConfig, "batch_size", 2.5, r"batch_size=2.5 must be of type int"),
        (MeshConfig, "fsdp", 0, r"mesh sizes must be positive"),
    ],
)
def test_bad_values_name_the_field(kind, field, value, message):
    with pytest.raises(ConfigError, match=message):
        kind.from_dict({field: value})


def test_cross_section_checks():
    c = base_config("tiny")
    c.seq_len = c.model.max_seq_len + 1
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        Experiment.from_config(c)
    with pytest.raises(ShardingError, match="at most one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_sweep_overrides_build_the_preset_model(tmp_path):
    """The sweep runner's launch commands carry the same --config.model.* overrides: parsed the way
    experiments.train parses them, they build exactly the preset model with those values."""
    path = next(p for p in CONFIGS if p.stem == "tiny")
    variants = sweep.expand(sweep.parse_sweeps(["model.dim=96,128", "model.num_heads=2"]))
    for variant, argv in zip(variants, sweep.commands(str(path), str(tmp_path), variants, [0])):
        overrides = [a for a in argv if a.startswith("--config.")]
        exp = Experiment.from_config(_load(path, *overrides))
        want = preset("tiny", dim=int(variant["model.dim"]), num_heads=2)
        assert exp.model == want and exp.model.head_dim == want.dim // 2
