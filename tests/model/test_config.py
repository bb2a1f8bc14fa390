"""ModelConfig: validation, derived sizes against real params trees, presets at full size via eval_shape."""

import dataclasses

import jax
import pytest

from llama_jax.errors import ConfigError
from llama_jax.model import PRESETS, ModelConfig, count_params, init_params, param_shapes, preset


def test_head_dim_is_derived_and_overridable():
    assert ModelConfig(dim=64, num_heads=4, num_kv_heads=4).head_dim == 16
    assert ModelConfig(dim=64, num_heads=4, num_kv_heads=4, head_dim=32).head_dim == 32


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(num_heads=6, num_kv_heads=4), ["num_heads", "num_kv_heads"]),
        (dict(dim=65, num_heads=4, num_kv_heads=4), ["dim", "num_heads", "head_dim"]),
        (dict(norm="batchnorm"), ["norm", "rmsnorm"]),
        (dict(mlp_activation="tanh"), ["mlp_activation", "swiglu"]),
        (dict(attention_impl="flash"), ["attention_impl"]),
        (dict(remat_policy="everything"), ["remat_policy"]),
        (dict(num_layers=0), ["num_layers"]),
        (dict(dim=60, num_heads=4, num_kv_heads=4), ["RoPE", "even"]),
    ],
)
def test_bad_config_names_fields_and_fix(kwargs, names):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    for n in names:
        assert n in str(e.value)


def test_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = preset("tiny", qk_norm=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="num_layer"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_layer": 3})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").dim = 3  # type: ignore[misc]


ABLATIONS = [
    dict(),
    dict(norm="layernorm"),
    dict(mlp_activation="geglu"),
    dict(mlp_activation="gelu"),
    dict(mlp_activation="relu2"),
    dict(position="none"),
    dict(qk_norm=True),
    dict(qk_norm=True, norm="layernorm"),
    dict(tie_embeddings=True),
    dict(num_kv_heads=1),
    dict(num_kv_heads=4),
    dict(parallel_block=True),
    dict(use_bias=True),
    dict(use_bias=True, mlp_activation="gelu", parallel_block=True),
    dict(head_dim=24),
    dict(scan_layers=True),
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "base")
def test_param_count_matches_real_params_tree(overrides):
    cfg = preset("tiny", **overrides)
    params = param_shapes(cfg)
    assert count_params(params) == cfg.param_count()


def test_param_count_matches_initialised_params():
    cfg = preset("tiny", use_bias=True, qk_norm=True)
    assert count_params(init_params(cfg, jax.random.key(0))) == cfg.param_count()


@pytest.mark.parametrize("name, expected", [("llama2_7b", 6_738_415_616), ("llama3_8b", 8_030_261_248)])
def test_full_size_eval_shape(name, expected):
    cfg = preset(name)
    shapes = param_shapes(cfg)  # abstract: allocates nothing
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert count_params(shapes) == expected == cfg.param_count()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = preset(name, scan_layers=True)
    assert count_params(param_shapes(cfg)) == cfg.param_count()


def test_known_published_sizes():
    # Published sizes (from the HF model cards' safetensors metadata) for models with GQA / tying.
    assert preset("llama3_2_1b").param_count() == 1_235_814_400
    assert preset("smollm2_135m").param_count() == 134_515_008
    assert preset("llama2_13b").param_count() == 13_015_864_320


def test_flops_per_token():
    cfg = preset("llama2_7b")
    n = cfg.matmul_param_count()
    # Matmul params exclude the embedding gather but include the head.
    assert n == cfg.param_count() - cfg.vocab_size * cfg.dim - (2 * cfg.num_layers + 1) * cfg.dim
    s = 2048
    attn_fwd = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s
    assert cfg.flops_per_token(s, causal_halving=False) == 6 * n + 3 * attn_fwd
    assert cfg.flops_per_token(s) == 6 * n + 3 * attn_fwd / 2
    assert cfg.flops_per_token(s, training=False) == 2 * n + attn_fwd / 2
    # LoRA: no weight gradients for the frozen base (4N), adapters 2a forward and 4a backward.
    a = 1000
    assert cfg.flops_per_token(s, adapter_params=a) == 4 * n + 3 * attn_fwd / 2 + 6 * a
    assert cfg.flops_per_token(0, adapter_params=a) == 4 * n + 6 * a
    assert cfg.flops_per_token(s, training=False, adapter_params=a) == 2 * n + attn_fwd / 2 + 2 * a
