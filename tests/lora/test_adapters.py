"""LoRA adapters without the loop: the config section, target selection and its errors, exact base logits at
init, the merge against a numpy reference, shardings on an 8-device mesh, and a train step that moves only
the adapters (also with a bf16 base)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import lora, sharding
from llama_jax.errors import ConfigError
from llama_jax.experiment import Experiment, base_config
from llama_jax.model import Llama, init_params, path_str, preset
from llama_jax.train import OptimizerConfig, TrainProgram, make_optimizer
from tests.test_experiment import CONFIGS, _load

TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 384)


def leaves(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------- the config section
def test_config_defaults_command_line_and_errors():
    exp = Experiment.from_config(base_config("tiny"))
    assert exp.lora == lora.LoraConfig() and not exp.lora.enabled  # off by default
    assert exp.lora.targets == (r"attn/(q|k|v|o)_proj/kernel$",) and exp.lora.alpha == 16.0
    tiny = next(p for p in CONFIGS if p.stem == "tiny")
    c = _load(tiny, "--config.lora.rank=8", "--config.lora.alpha=32", "--config.lora.base_dtype=bfloat16",
              "--config.init_from=/base")
    exp = Experiment.from_config(c)
    assert (exp.lora.rank, exp.lora.scale, exp.lora.base_dtype) == (8, 4.0, "bfloat16")
    assert Experiment.from_config(exp.to_dict()).lora == exp.lora  # config.json round trip
    c.init_from = ""
    with pytest.raises(ConfigError, match=r"lora.rank=8 .* pass --config.init_from=BASE_WORKDIR"):
        Experiment.from_config(c)
    for bad, match in [({"rank": -1}, "lora.rank=-1 must be >= 0"), ({"alpha": 0.0}, "lora.alpha=0.0 must be > 0"),
                       ({"base_dtype": "float16"}, "lora.base_dtype='float16' is not one of"),
                       ({"targets": ("attn/(",)}, "not a valid regex"), ({"dropout": 0.1}, r"unknown lora config field")]:
        with pytest.raises(ConfigError, match=match):
            lora.LoraConfig.from_dict({"rank": 4, **bad})


def test_targets_that_match_nothing_or_no_matrix_are_errors():
    shapes = jax.eval_shape(lambda: init_params(preset("tiny"), jax.random.key(0)))
    with pytest.raises(ConfigError, match=r"\['attn/qq_proj'\] match no param(.|\n)*layers_<i>/attn/q_proj/kernel"):
        lora.target_paths(lora.LoraConfig(rank=4, targets=("attn/qq_proj",)), shapes)
    with pytest.raises(ConfigError, match=r"not matrices: \['final_norm/scale \(64,\)'\]"):
        lora.target_paths(lora.LoraConfig(rank=4, targets=("^final_norm/scale$",)), shapes)
    cfg = lora.LoraConfig(rank=4, targets=(r"attn/(q|o)_proj/kernel$", r"mlp/down_proj/kernel$"))
    assert lora.target_paths(cfg, shapes) == [
        f"layers_{i}/{m}" for i in range(2) for m in ("attn/o_proj/kernel", "attn/q_proj/kernel", "mlp/down_proj/kernel")]
    for head in ("^embed/", "^lm_head/"):  # not projections: no low-rank path (the error names the ones that have)
        with pytest.raises(ConfigError, match=r"which LoRA cannot adapt(.|\n)*mlp/\(gate\|up\|down\)_proj"):
            lora.target_paths(lora.LoraConfig(rank=4, targets=(head, "q_proj/kernel$")), shapes)


def test_adapter_param_count_and_the_train_flops_it_implies():
    tiny = preset("tiny")  # dim 64, 4 heads (kv 2) of 16, ffn 172, 2 layers
    cfg = lora.LoraConfig(rank=4, targets=(r"attn/(q|k|v|o)_proj/kernel$", r"mlp/down_proj/kernel$"))
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + (172 + 64))  # r * (in + out): q, k, v, o, down
    assert lora.adapter_param_count(cfg, tiny) == 2 * per_layer
    c = base_config("tiny")
    c.lora.rank, c.lora.targets, c.init_from = 4, cfg.targets, "/base"
    exp = Experiment.from_config(c)
    n, a = tiny.matmul_param_count(), 2 * per_layer
    assert exp.train_flops_per_token(0) == 4 * n + 6 * a  # MFU counts what LoRA computes
    c.lora.rank = 0
    assert Experiment.from_config(c).train_flops_per_token(0) == 6 * n


# ---------------------------------------------------------------------- the math
@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_rank_r_adapters_give_exactly_the_base_logits_at_init(scan):
    cfg = preset("tiny", scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    adapters = lora.init_adapters(lora.LoraConfig(rank=4), params, jax.random.key(2), jnp.float32)
    a = leaves(adapters)
    q = "layers/attn/q_proj/kernel" if scan else "layers_0/attn/q_proj/kernel"
    o = q.replace("q_proj", "o_proj")
    lead = (2,) if scan else ()
    assert a[q + "/lora_a"].shape == (*lead, 64, 4) and a[q + "/lora_b"].shape == (*lead, 4, 4, 16)
    assert a[o + "/lora_a"].shape == (*lead, 4, 16, 4) and a[o + "/lora_b"].shape == (*lead, 4, 64)
    assert float(jnp.abs(a[q + "/lora_a"]).max()) > 0 and float(jnp.abs(a[q + "/lora_a"]).max()) <= 1 / 8  # 1/sqrt(64)
    logits = jax.jit(lambda p: Llama(cfg).apply({"params": p}, TOKENS))
    np.testing.assert_array_equal(logits(lora.merge(params, adapters, 4.0)), logits(params))


def test_merge_matches_a_numpy_reference():
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    adapters = lora.init_adapters(lora.LoraConfig(rank=3), params, jax.random.key(2), jnp.float32)
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)  # B != 0
    merged, p, a = leaves(lora.merge(params, adapters, 0.5)), leaves(params), leaves(adapters)
    for path in ("layers_1/attn/q_proj/kernel", "layers_1/attn/o_proj/kernel"):
        w = np.asarray(p[path], np.float64)
        n_in = 1 if "q_proj" in path else 2
        in_size = int(np.prod(w.shape[:n_in]))
        want = w + 0.5 * (np.asarray(a[path + "/lora_a"], np.float64).reshape(in_size, 3)
                          @ np.asarray(a[path + "/lora_b"], np.float64).reshape(3, -1)).reshape(w.shape)
        np.testing.assert_allclose(merged[path], want, rtol=1e-5, atol=1e-5)
    assert merged["layers_0/mlp/up_proj/kernel"] is p["layers_0/mlp/up_proj/kernel"]  # not adapted: untouched


# ---------------------------------------------------------------------- the program
def program(scan=False, mesh=(2, 2, 2), **lora_fields):
    m = sharding.make_mesh(sharding.MeshConfig(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
    return TrainProgram.build(preset("tiny", scan_layers=scan), m, sharding.RULE_SETS["fsdp_tp"],
                              make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10), lora=lora.LoraConfig(rank=4, **lora_fields))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_adapters_and_their_optimizer_state_are_sharded_like_their_kernels(scan):
    prog = program(scan, targets=(r"attn/(q|k|v|o)_proj/kernel$", r"mlp/down_proj/kernel$"))
    s = prog.state_shardings
    layer, lead = ("layers", (None,)) if scan else ("layers_1", ())
    specs = {k: v.spec for k, v in leaves(s.params).items()}
    assert s.base[layer]["attn"]["q_proj"]["kernel"].spec == P(*lead, "fsdp", "tensor", None)
    assert specs[f"{layer}/attn/q_proj/kernel/lora_a"] == P(*lead, "fsdp", None)
    assert specs[f"{layer}/attn/q_proj/kernel/lora_b"] == P(*lead, None, "tensor", None)
    assert specs[f"{layer}/attn/o_proj/kernel/lora_a"] == P(*lead, "tensor", None, None)
    assert specs[f"{layer}/attn/o_proj/kernel/lora_b"] == P(*lead, None, "fsdp")
    assert specs[f"{layer}/mlp/down_proj/kernel/lora_a"] == P(*lead, "tensor", None)
    assert specs[f"{layer}/mlp/down_proj/kernel/lora_b"] == P(*lead, None, "fsdp")
    # Adam's mu and nu: exactly one per adapter, placed like it; nothing of the base's size.
    opt = {k: v for k, v in leaves(s.opt_state).items() if v.spec != P()}
    for moment in ("mu", "nu"):
        got = {k.split(f"/{moment}/", 1)[1]: v.spec for k, v in opt.items() if f"/{moment}/" in k}
        assert got == specs
    assert len(opt) == 2 * len(specs)
    state = prog.init_state(0)  # created in those shards
    for k, x in leaves(state.params).items():
        assert x.sharding.spec == specs[k]


@pytest.mark.slow
def test_a_train_step_moves_only_the_adapters_also_from_a_bf16_base():
    prog = program(base_dtype="bfloat16")
    state = prog.init_state(0)
    base = jax.device_get(state.base)
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 384, (8, 33))
    batch = prog.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    before = leaves(jax.device_get(state.params))
    losses = []
    for _ in range(3):
        state, metrics = prog.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    for x, y in zip(jax.tree.leaves(jax.device_get(state.base)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(x, y)  # frozen, bit for bit
    after = leaves(jax.device_get(state.params))
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in after if k.endswith("lora_b"))
    assert losses[-1] < losses[0]  # the same batch three times: the adapters fit it
    sums = prog.eval_step(prog.eval_params(state), batch)
    np.testing.assert_allclose(float(sums["nll_sum"]) / float(sums["tokens"]),
                               float(prog.train_step(state, batch)[1]["loss"]), rtol=1e-5)
