"""Mesh construction, partition rules and their checks, opt-state shardings, batch sharding (8 CPU devices).

Nothing here compiles a train step; the end-to-end sharded step is tested in train/test_train_step.py.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import errors, sharding
from llama_jax.experiment import base_config
from llama_jax.model import Llama, param_shapes, path_str, preset
from llama_jax.train import OptimizerConfig, make_optimizer
from tests.helpers import program_of

# Heads and kv heads divisible by tensor=4, every dim divisible by 8; biases and q/k norms exercise
# every rule of the rule sets.
MODEL = dict(num_heads=8, num_kv_heads=4, ffn_dim=128, use_bias=True, qk_norm=True)


def mesh_of(data, fsdp, tensor):
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def flat(tree):
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_specs(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {path_str(p): v for p, v in leaves}


# The fsdp_tp layout written out by hand (independently of the rule regexes), by param-path suffix.
EXPECTED_FSDP_TP = {
    "embed/embedding": P(("tensor", "fsdp"), None),
    "attn_norm/scale": P(None),
    "mlp_norm/scale": P(None),
    "final_norm/scale": P(None),
    "q_norm/scale": P(None),
    "k_norm/scale": P(None),
    "q_proj/kernel": P("fsdp", "tensor", None),
    "k_proj/kernel": P("fsdp", "tensor", None),
    "v_proj/kernel": P("fsdp", "tensor", None),
    "q_proj/bias": P("tensor", None),
    "k_proj/bias": P("tensor", None),
    "v_proj/bias": P("tensor", None),
    "o_proj/kernel": P("tensor", None, "fsdp"),
    "o_proj/bias": P(None),
    "gate_proj/kernel": P("fsdp", "tensor"),
    "up_proj/kernel": P("fsdp", "tensor"),
    "gate_proj/bias": P("tensor"),
    "up_proj/bias": P("tensor"),
    "down_proj/kernel": P("tensor", "fsdp"),
    "down_proj/bias": P(None),
    "lm_head/kernel": P("fsdp", "tensor"),
}


def expected_spec(path: str) -> P:
    suffix = "/".join(path.split("/")[-2:])
    spec = EXPECTED_FSDP_TP[suffix]
    return P(None, *spec) if path.startswith("layers/") else spec


# ---------------------------------------------------------------------- mesh
def test_mesh_shapes_and_minus_one():
    assert sharding.mesh_shape(sharding.MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
    assert sharding.mesh_shape(sharding.MeshConfig(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
    mesh = mesh_of(2, 2, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.devices.flat) == set(jax.devices())


@pytest.mark.parametrize(
    "mesh_cfg, match",
    [
        (dict(data=2, fsdp=2, tensor=1), r"product 4 != 8 devices"),
        (dict(data=-1, fsdp=-1, tensor=1), r"at most one mesh axis may be -1"),
        (dict(data=-1, fsdp=3, tensor=1), r"does not divide the 8 devices"),
        (dict(data=0, fsdp=8, tensor=1), r"must be positive"),
    ],
)
def test_mesh_errors(mesh_cfg, match):
    with pytest.raises(errors.ShardingError, match=match):
        sharding.make_mesh(sharding.MeshConfig(**mesh_cfg))


# ---------------------------------------------------------------------- rules
@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_tp_specs_match_hand_written_layout(scan):
    cfg = preset("tiny", **MODEL, scan_layers=scan)
    specs = flat_specs(sharding.param_specs(param_shapes(cfg), sharding.RULE_SETS["fsdp_tp"].params, mesh_of(1, 2, 4)))
    assert specs, "no params"
    for path, spec in specs.items():
        assert spec == expected_spec(path), path
    assert any(p.startswith("layers/") for p in specs) == scan


def test_rule_sets_drop_axes():
    shapes = param_shapes(preset("tiny", **MODEL))
    dp = flat_specs(sharding.param_specs(shapes, sharding.RULE_SETS["dp"].params))
    fsdp = flat_specs(sharding.param_specs(shapes, sharding.RULE_SETS["fsdp"].params))
    assert all(all(e is None for e in s) for s in dp.values())
    assert fsdp["layers_0/attn/q_proj/kernel"] == P("fsdp", None, None)
    assert fsdp["layers_0/attn/o_proj/kernel"] == P(None, None, "fsdp")
    assert fsdp["embed/embedding"] == P("fsdp", None)
    assert not any("tensor" in str(s) for s in fsdp.values())


def test_sharded_init_places_every_param_by_its_rule():
    """Each param's .sharding is its rule's, each device holds the expected block, values match eager init."""
    c = base_config("tiny", **MODEL, tie_embeddings=False)
    c.batch_size = 8
    mesh = mesh_of(1, 2, 4)
    trainer = program_of(c, mesh=mesh)
    state = trainer.init_state(seed=3)
    params = flat(state.params)
    key = jax.random.split(jax.random.PRNGKey(3))[0]  # TrainProgram.init_state's params key
    eager = flat(Llama(trainer.model_config).init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    assert params.keys() == eager.keys()
    for path, x in params.items():
        spec = expected_spec(path)
        assert x.sharding == NamedSharding(mesh, spec), path
        per_device = tuple(
            n // math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ()))
            for n, e in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec)))
        )
        assert {s.data.shape for s in x.addressable_shards} == {per_device}, path
        assert len(x.addressable_shards) == 8
        # Same random draws (threefry is partitionable); jit vs eager may differ in the last bit.
        np.testing.assert_allclose(np.asarray(x), np.asarray(eager[path]), rtol=1e-6, atol=1e-9, err_msg=path)
    # AdamW moments follow their params; the step count and injected lr are replicated scalars.
    opt = state.opt_state
    mu = flat(opt.inner_state[1][0].mu)
    assert mu["layers_1/mlp/down_proj/kernel"].sharding == params["layers_1/mlp/down_proj/kernel"].sharding
    assert opt.count.sharding == NamedSharding(mesh, P())
    assert opt.hyperparams["learning_rate"].sharding == NamedSharding(mesh, P())


def test_rule_missing_a_param_names_it():
    rules = [r for r in sharding.RULE_SETS["fsdp"].params if "down_proj/kernel" not in r[0]]
    with pytest.raises(errors.ShardingError, match=re.escape("'layers_0/mlp/down_proj/kernel'")):
        sharding.param_specs(param_shapes(preset("tiny")), rules)


def test_rule_with_wrong_rank_or_unknown_axis():
    q_only = {"layers_0": {"attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((64, 4, 16), jnp.float32)}}}}
    with pytest.raises(errors.ShardingError, match=r"layers_0/attn/q_proj/kernel.*3 dims.*2-dim spec"):
        sharding.param_specs(q_only, [(r"q_proj/kernel", ("fsdp", None))], mesh_of(8, 1, 1))
    shapes = param_shapes(preset("tiny"))
    with pytest.raises(errors.ShardingError, match=r"names mesh axes \['model'\]"):
        sharding.param_specs(shapes, [(r"embed", ("model", None)), (r".", (None,) * 3)], mesh_of(8, 1, 1))


def test_tensor_not_dividing_heads_names_fields():
    c = base_config("tiny")  # num_heads=4, num_kv_heads=2
    with pytest.raises(errors.ShardingError, match=r"model.num_kv_heads=2 is not divisible by mesh tensor=4") as e:
        program_of(c, mesh=mesh_of(2, 1, 4))
    assert "one of [1, 2]" in str(e.value)  # the fix: tensor sizes that divide every split dim


def test_fsdp_not_dividing_a_dim_names_param_dim_and_axis():
    shapes = param_shapes(preset("tiny", dim=36, num_heads=2, num_kv_heads=2))  # 36 % 8 != 0
    with pytest.raises(
        errors.ShardingError,
        match=r"param 'layers_0/attn/k_proj/kernel' has shape \(36, 2, 18\): dim 0 \(size 36\) is sharded "
        r"over mesh axes \('fsdp',\) of total size 8",
    ):
        sharding.param_specs(shapes, sharding.RULE_SETS["fsdp"].params, mesh_of(1, 8, 1))


def test_idle_mesh_axis_is_an_error():
    c = base_config("tiny", **MODEL)
    c.sharding.rule_set = "fsdp"
    with pytest.raises(errors.ShardingError, match=r"mesh axes \['tensor'\] have size > 1"):
        program_of(c, mesh=mesh_of(2, 1, 4))


def test_batch_must_split_over_data_parallel_axes():
    with pytest.raises(errors.ShardingError, match=r"microbatch.*= 2 is not divisible by mesh data\*fsdp = 4"):
        sharding.check_batch_fits_mesh(8, 4, mesh_of(2, 2, 2))
    sharding.check_batch_fits_mesh(16, 4, mesh_of(2, 2, 2))


def test_explicit_rules_from_config():
    c = base_config("tiny")
    c.sharding.param_rules = [(r"embed", ["fsdp", None]), (r".*", [None])]
    rules = sharding.resolve_rules(sharding.ShardingConfig.from_dict(c.sharding))
    assert rules.params == ((r"embed", ("fsdp", None)), (r".*", (None,)))
    assert rules.activations == sharding.RULE_SETS["fsdp_tp"].activations
    c.sharding.rule_set = "zero"
    with pytest.raises(errors.ShardingError, match=r"rule_set='zero' is not one of"):
        sharding.resolve_rules(sharding.ShardingConfig.from_dict(c.sharding))


# ---------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_opt_state_specs_follow_params(name):
    # dim/ffn >= 128 so that Adafactor factors the second moments into row and column statistics.
    cfg = preset("tiny", dim=128, ffn_dim=256, num_heads=4, num_kv_heads=4)
    tx = make_optimizer(OptimizerConfig(name=name), total_steps=100)
    shapes = param_shapes(cfg)
    p_specs = sharding.param_specs(shapes, sharding.RULE_SETS["fsdp_tp"].params, mesh_of(1, 4, 2))
    opt_shapes = jax.eval_shape(tx.init, shapes)
    specs = sharding.opt_state_specs(opt_shapes, shapes, p_specs)
    s_flat, o_flat = flat_specs(specs), flat(opt_shapes)
    assert s_flat.keys() == o_flat.keys()
    down = P("tensor", "fsdp")
    found = {path: spec for path, spec in s_flat.items() if path.endswith("layers_0/mlp/down_proj/kernel")}
    assert found
    for path, spec in found.items():
        shape = o_flat[path].shape
        if shape == (256, 128):
            assert spec == down, path
        elif shape == (128,):  # factored: the F dim was averaged away
            assert spec == P("fsdp"), path
        elif shape == (256,):  # factored: the D dim was averaged away
            assert spec == P("tensor"), path
        else:
            assert math.prod(shape) <= 1 and spec == P(), path
    if name == "adafactor":
        assert {o_flat[p].shape for p in found} >= {(128,), (256,)}
    for path, spec in s_flat.items():
        if o_flat[path].ndim == 0:
            assert spec == P(), path


def test_opt_state_leaf_without_a_param_is_an_error():
    shapes = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    tx = optax.GradientTransformation(lambda p: {"stray": jnp.zeros((4, 4))}, None)
    with pytest.raises(errors.ShardingError, match=r"optimizer-state leaf 'stray'"):
        sharding.opt_state_specs(jax.eval_shape(tx.init, shapes), shapes, {"w": P()})


# ---------------------------------------------------------------------- batches and processes
def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = mesh_of(2, 2, 2)
    assert sharding.process_batch_slice(mesh, 8) == slice(0, 8)  # one process owns all rows
    local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    batch = sharding.shard_batch(local, mesh)
    x = batch["inputs"]
    assert x.shape == (8, 3) and x.sharding == NamedSharding(mesh, P(("data", "fsdp")))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(x), local["inputs"])
    with pytest.raises(errors.ShardingError, match=r"6 global rows, which do not split over mesh data\*fsdp = 4"):
        sharding.shard_batch({"inputs": np.zeros((6, 3), np.int32)}, mesh)
