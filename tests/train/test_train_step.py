"""The sharded train step against a single-device reference, loss/accumulation/skip semantics, optimizer.

Every sharded run starts from the same host copy of the reference's initial state, so any difference is
the sharding's. Compiles are the cost here: each TrainProgram compiles its step once and tests share them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import sharding
from llama_jax.errors import ConfigError, TrainingHalted
from llama_jax.experiment import base_config
from llama_jax.model import (
    Llama,
    ModelConfig,
    loss_sums,
    param_shapes,
    path_str,
    stack_layers,
    unstack_layers,
)
from llama_jax.train import DivergenceGuard, OptimizerConfig, Run, TrainProgram, TrainState, optim
from tests.helpers import program_of

# num_kv_heads=4 so that tensor=4 divides it; all dims divisible by 8; biases and q/k norms on so that
# every partition rule is exercised.
MODEL = dict(num_heads=8, num_kv_heads=4, ffn_dim=128, use_bias=True, qk_norm=True)
BATCH, SEQ, Z_LOSS, LR = 8, 16, 1e-3, 1e-3
MESHES = [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)]


def small_config(**model_overrides):
    c = base_config("tiny", **{**MODEL, **model_overrides})
    c.batch_size, c.seq_len, c.num_steps, c.z_loss = BATCH, SEQ, 10, Z_LOSS
    c.optimizer.schedule, c.optimizer.warmup_steps, c.optimizer.lr = "constant", 0, LR
    # Adam's first update is lr * g / (|g| + eps): with eps=1e-8 it is a sign function of g, and a gradient
    # that cancels to ~1e-8 flips with the summation order of a different sharding. A larger eps keeps
    # the update a smooth function of g, so comparing params compares the gradients, not rounding luck.
    c.optimizer.eps = 1e-4
    return c


def make_batch(seed: int, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Two packed documents per row, then padding (segment 0); loss masks of different density per row.

    Rows hold different numbers of target tokens, so a per-sequence mean would differ from the
    per-token mean.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (batch, seq + 1)).astype(np.int32)
    segment_ids = np.zeros((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        a = rng.integers(2, seq // 2)
        b = rng.integers(a + 1, seq + 1)
        segment_ids[r, :a], segment_ids[r, a:b] = 1, 2
        positions[r, :a], positions[r, a:b] = np.arange(a), np.arange(b - a)
    loss_mask = (rng.random((batch, seq)) < np.linspace(0.3, 1.0, batch)[:, None]).astype(np.float32)
    return dict(
        inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=loss_mask,
        segment_ids=segment_ids, positions=positions,
    )


def single_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def mesh_of(data, fsdp, tensor):
    return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def flat(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(actual, expected, rtol=1e-5, leaf_rtol=1e-4):
    """Relative error of the whole tree <= rtol, and of every leaf <= leaf_rtol.

    The per-leaf bound is looser because a zero-initialised bias after one step *is* its update, a
    small vector whose summation-order noise is measured against itself (~1e-5 seen here); the
    per-leaf check still catches any leaf that is wrong, which the global norm could hide.
    """
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys()
    for k in expected:
        err = np.linalg.norm(actual[k] - expected[k]) / max(np.linalg.norm(expected[k]), 1e-12)
        assert err <= leaf_rtol, f"{k}: relative error {err:.2e}"
    num = math.sqrt(sum(float(np.sum((actual[k] - expected[k]) ** 2)) for k in expected))
    den = math.sqrt(sum(float(np.sum(expected[k] ** 2)) for k in expected))
    assert num <= rtol * den, f"relative error of the params {num / den:.2e}"


@pytest.fixture(scope="module")
def reference():
    """Single-device trainer, its initial state (host copy) and the result of one step on batch 0."""
    trainer = program_of(small_config(), mesh=single_device_mesh())
    init = jax.device_get(trainer.init_state(seed=0))
    state, metrics = trainer.train_step(jax.device_put(init, trainer.state_shardings), trainer.shard_batch(make_batch(0)))
    return dict(trainer=trainer, init=init, params=jax.device_get(state.params), metrics=jax.device_get(metrics))


def fresh(trainer: TrainProgram, host_state: TrainState) -> TrainState:
    """A device copy of a host state in the trainer's shardings (the step donates its input)."""
    return jax.device_put(host_state, trainer.state_shardings)


# ---------------------------------------------------------------------- mesh equivalence
@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(reference, shape):
    mesh = mesh_of(*shape)
    trainer = program_of(small_config(), mesh=mesh)
    batch = trainer.shard_batch(make_batch(0))
    state, metrics = trainer.train_step(fresh(trainer, reference["init"]), batch)
    metrics = jax.device_get(metrics)
    ref = reference["metrics"]
    for k in ("loss", "z_loss", "grad_norm", "update_norm", "param_norm"):
        assert math.isclose(metrics[k], ref[k], rel_tol=1e-5), (k, metrics[k], ref[k])
    assert metrics["tokens"] == ref["tokens"] and metrics["skipped"] == 0
    assert math.isclose(metrics["lr"], LR, rel_tol=1e-6)
    assert_trees_close(state.params, reference["params"])
    # The step keeps every param in its rule's sharding (out_shardings = in_shardings).
    for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.param_shardings)):
        assert x.sharding == s
    assert ref["update_norm"] > 1e-3  # the step moved the params, so the comparison is not vacuous
    if shape == (2, 2, 2):
        sums = jax.device_get(trainer.eval_step(state.params, batch))
        ref_trainer = reference["trainer"]
        ref_sums = jax.device_get(
            ref_trainer.eval_step(
                jax.device_put(reference["params"], ref_trainer.param_shardings), ref_trainer.shard_batch(make_batch(0))
            )
        )
        assert math.isclose(sums["nll_sum"], ref_sums["nll_sum"], rel_tol=1e-5)
        assert sums["tokens"] == ref_sums["tokens"] == ref["tokens"]


@pytest.mark.slow
def test_scanned_layers_use_the_same_rules(reference):
    """scan_layers params (leading [layers] axis) take the same rules and give the same step."""
    mesh = mesh_of(1, 2, 4)
    trainer = program_of(small_config(scan_layers=True), mesh=mesh)
    q = trainer.state_shardings.params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    init = reference["init"]
    params = stack_layers(init.params)
    host = TrainState(
        step=init.step, params=params, opt_state=trainer.tx.init(params),
        consecutive_skips=init.consecutive_skips,
    )
    state, metrics = trainer.train_step(fresh(trainer, host), trainer.shard_batch(make_batch(0)))
    assert math.isclose(float(metrics["loss"]), reference["metrics"]["loss"], rel_tol=1e-5)
    assert_trees_close(unstack_layers(jax.device_get(state.params)), reference["params"])


@pytest.mark.slow
def test_grad_accumulation_equals_big_batch(reference):
    """2 microbatches on the (2,2,2) mesh == one batch on one device (token-weighted, not per-microbatch)."""
    c = small_config()
    c.grad_accum_steps = 2
    trainer = program_of(c, mesh=mesh_of(2, 2, 2))
    state, metrics = trainer.train_step(fresh(trainer, reference["init"]), trainer.shard_batch(make_batch(0)))
    metrics = jax.device_get(metrics)
    ref = reference["metrics"]
    for k in ("loss", "z_loss", "grad_norm", "tokens"):
        assert math.isclose(metrics[k], ref[k], rel_tol=1e-5), (k, metrics[k], ref[k])
    assert_trees_close(state.params, reference["params"])
    # The microbatches (strided rows) have unequal token counts, so averaging per-microbatch means
    # would give a different loss: the equality above is not an accident of equal weights.
    mask = make_batch(0)["loss_mask"] * (make_batch(0)["segment_ids"] != 0)
    assert mask[0::2].sum() != mask[1::2].sum()


# ---------------------------------------------------------------------- loss
def numpy_losses(logits, batch):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]  # [batch, seq]
    nll = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"] * (batch["segment_ids"] != 0)
    return nll, lse, mask


def test_loss_is_per_target_token_with_mask_and_z_loss(reference):
    trainer, init, batch = reference["trainer"], reference["init"], make_batch(0)
    logits = jax.jit(Llama(trainer.model_config).apply)(
        {"params": init.params}, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    nll, lse, mask = numpy_losses(np.asarray(logits), batch)
    expected_loss = (nll * mask).sum() / mask.sum()
    rows = mask.sum(1) > 0
    per_sequence = np.mean((nll * mask).sum(1)[rows] / mask.sum(1)[rows])
    assert abs(per_sequence - expected_loss) > 1e-4 * expected_loss  # 10x the tolerance used below

    m = reference["metrics"]  # the reference step ran on exactly this batch and these params
    assert m["tokens"] == mask.sum()
    assert math.isclose(m["loss"], expected_loss, rel_tol=1e-5)
    assert math.isclose(m["z_loss"], Z_LOSS * (lse**2 * mask).sum() / mask.sum(), rel_tol=1e-5)

    params = jax.device_put(init.params, trainer.param_shardings)
    sums = jax.device_get(trainer.eval_step(params, trainer.shard_batch(batch)))
    assert math.isclose(sums["nll_sum"], (nll * mask).sum(), rel_tol=1e-5)
    assert sums["tokens"] == mask.sum()

    # loss_sums on its own, on hand-made logits: uniform logits over V give nll = log V and lse = log V.
    s = loss_sums(jnp.zeros((1, 3, 8)), jnp.array([[1, 2, 3]]), jnp.array([[1.0, 0.0, 1.0]]))
    assert math.isclose(float(s["nll_sum"]), 2 * math.log(8), rel_tol=1e-6)
    assert math.isclose(float(s["z_sum"]), 2 * math.log(8) ** 2, rel_tol=1e-6)
    assert float(s["tokens"]) == 2.0


# ---------------------------------------------------------------------- non-finite steps
class NoCheckpoints:
    def resume_hint(self):
        return "No checkpoint was saved."


def test_nan_batch_is_skipped_and_streak_halts(reference):
    trainer, init = reference["trainer"], reference["init"]
    bad = make_batch(0)
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][3, 5] = np.nan
    state = fresh(trainer, init)
    guard = DivergenceGuard(max_consecutive_skips=2, spike_factor=0.0, checkpoints=NoCheckpoints())
    run = Run(program=trainer, state=state, num_steps=100, start=0)
    state, m1 = trainer.train_step(state, trainer.shard_batch(bad))
    run.done, run.metrics = 1, m1
    guard(run)
    m1 = jax.device_get(m1)
    assert m1["skipped"] == 1 and m1["consecutive_skips"] == 1 and m1["update_norm"] == 0.0
    host = jax.device_get(state)
    assert int(host.step) == 1
    # Params and the whole optimizer state (moments, count) are exactly as before the step.
    for a, b in zip(jax.tree.leaves((host.params, host.opt_state)), jax.tree.leaves((init.params, init.opt_state))):
        np.testing.assert_array_equal(a, b)
    DivergenceGuard(2, 0.0, NoCheckpoints()).check(1, m1)  # one skip: no halt

    state, m2 = trainer.train_step(state, trainer.shard_batch(bad))
    run.done, run.metrics = 2, m2
    guard(run)  # checks m1 (streak 1): no halt yet
    assert int(m2["consecutive_skips"]) == 2
    with pytest.raises(TrainingHalted, match=r"2 consecutive train steps up to step 2 had a non-finite"):
        DivergenceGuard(2, 0.0, NoCheckpoints()).check(2, m2)
    run.done = run.num_steps
    with pytest.raises(TrainingHalted):
        guard(run)  # at the last step the deferred check of m2 runs too

    # A finite batch applies the update the skipped steps did not, and resets the streak.
    state, m3 = trainer.train_step(state, trainer.shard_batch(make_batch(0)))
    m3 = jax.device_get(m3)
    assert m3["skipped"] == 0 and m3["consecutive_skips"] == 0 and int(state.step) == 3
    assert math.isclose(m3["loss"], reference["metrics"]["loss"], rel_tol=1e-6)
    assert_trees_close(state.params, reference["params"], rtol=1e-6, leaf_rtol=1e-6)


def test_a_huge_loss_in_the_first_steps_halts_before_there_is_a_median():
    """Step 2 of a probe's run logged loss 742,501: no history yet, so only the uniform-guess bound can see it."""
    healthy = {"consecutive_skips": 0, "loss": 5.9, "update_norm": 0.3}
    guard = DivergenceGuard(5, 3.0, NoCheckpoints(), uniform_loss=math.log(384))
    guard.check(1, healthy)
    with pytest.raises(TrainingHalted, match=r"diverged at step 2: loss 7.425e\+05 is \d+\.\dx the loss of a "
                       r"uniform guess over the vocabulary \(5.951 nats; .*No checkpoint was saved"):
        guard.check(2, {**healthy, "loss": 742501.0})
    DivergenceGuard(5, 0.0, NoCheckpoints(), uniform_loss=math.log(384)).check(2, {**healthy, "loss": 742501.0})  # off
    DivergenceGuard(5, 3.0, NoCheckpoints(), uniform_loss=math.log(384)).check(1, {**healthy, "loss": 12.0})  # 2x: ok


# ---------------------------------------------------------------------- optimizer
def test_weight_decay_mask_touches_exactly_kernels():
    c = base_config("tiny", use_bias=True, qk_norm=True, norm="layernorm")
    shapes = param_shapes(ModelConfig.from_dict(c.model))
    mask = flat(optim.decay_mask_fn(c.optimizer.no_decay)(shapes))
    decayed = {p for p, m in mask.items() if m}
    assert decayed == {p for p in mask if p.endswith("/kernel")}
    assert "lm_head/kernel" in decayed and "embed/embedding" not in decayed
    assert {"final_norm/bias", "layers_0/attn/q_norm/scale", "layers_1/mlp/down_proj/bias"} <= set(mask) - decayed
    scanned_shapes = param_shapes(ModelConfig.from_dict(c.model).replace(scan_layers=True))
    scanned = flat(optim.decay_mask_fn(c.optimizer.no_decay)(scanned_shapes))
    assert "layers/attn/q_proj/kernel" in scanned
    assert {p for p, m in scanned.items() if m} == {p for p in scanned if p.endswith("/kernel")}

    # The optimizer applies it: with zero gradients AdamW's update is exactly -lr * wd * param, masked.
    c.optimizer.schedule, c.optimizer.warmup_steps, c.optimizer.lr, c.optimizer.weight_decay = "constant", 0, 0.5, 0.1
    tx = optim.make_optimizer(OptimizerConfig.from_dict(c.optimizer), total_steps=10)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype), shapes)
    updates, opt_state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for path, u in flat(updates).items():
        np.testing.assert_allclose(u, -0.5 * 0.1 * 2.0 if path in decayed else 0.0, rtol=1e-6, err_msg=path)
    assert float(optim.learning_rate(opt_state)) == 0.5


@pytest.mark.parametrize(
    "schedule, extra, expected",
    [
        # warmup 10 steps (lr * (step+1)/10), then decay from 1.0 to 0.1 over steps 10..110
        ("cosine", {}, {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 35: 1 - 0.9 * 0.5 * (1 - math.cos(math.pi / 4)),
                        60: 0.55, 110: 0.1, 500: 0.1}),
        ("linear", {}, {0: 0.1, 9: 1.0, 35: 0.775, 60: 0.55, 110: 0.1}),
        ("constant", {}, {0: 0.1, 9: 1.0, 60: 1.0, 500: 1.0}),
        # wsd: decay over the last 20% (22 steps: 88..110), stable at 1.0 in between
        ("wsd", {"decay_fraction": 0.2}, {0: 0.1, 9: 1.0, 50: 1.0, 88: 1.0, 99: 0.55, 110: 0.1}),
        ("wsd", {"decay_fraction": 0.2, "wsd_decay_shape": "1-sqrt"}, {88: 1.0, 99: 1 - 0.9 * math.sqrt(0.5), 110: 0.1}),
        ("wsd", {"decay_fraction": 0.2, "wsd_decay_shape": "cosine"}, {88: 1.0, 99: 0.55, 110: 0.1}),
    ],
)
def test_schedule_values(schedule, extra, expected):
    c = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, **extra)
    fn = optim.make_schedule(c, total_steps=110)
    for step, lr in expected.items():
        assert math.isclose(float(fn(step)), lr, rel_tol=1e-5), (schedule, step, float(fn(step)), lr)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_each_optimizer_descends(name):
    """Every optimizer lowers a quadratic with the same config plumbing (name, schedule, clipping)."""
    tx = optim.make_optimizer(OptimizerConfig(name=name, lr=0.05, warmup_steps=0, schedule="constant"), 100)
    params = {"w": {"kernel": jnp.full((4, 4), 2.0)}}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"]["kernel"] ** 2)
    start = float(loss(params))
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    assert float(loss(params)) < 0.8 * start


def test_unknown_optimizer_and_schedule_are_errors():
    with pytest.raises(ConfigError, match=r"optimizer.name='sgdd' is not one of"):
        OptimizerConfig(name="sgdd")
    with pytest.raises(ConfigError, match=r"optimizer.schedule='cosin' is not one of"):
        OptimizerConfig.from_dict({"schedule": "cosin"})
