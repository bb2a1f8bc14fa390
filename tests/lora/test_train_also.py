"""lora.train_also: params trained fully next to the adapters (PEFT's modules_to_save). The config field and
its errors, which params it selects, their FLOPs, their gradients against a full fine-tune's, and a train
state that holds them with their optimizer state, and a train step that moves them and leaves the base
bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora, sharding
from llama_jax.errors import ConfigError
from llama_jax.experiment import Experiment, base_config
from llama_jax.model import Llama, ModelConfig, batch_loss_sums, init_params, path_str, preset
from llama_jax.train import OptimizerConfig, TrainProgram, make_optimizer
from tests.helpers import program_of
from tests.test_experiment import CONFIGS, _load

ALL = (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
HEADS = (r"^embed/embedding$", r"^lm_head/kernel$")
NORMS = (r"norm/scale$",)
CFG = ModelConfig(vocab_size=136, dim=40, num_layers=2, num_heads=5, num_kv_heads=5, ffn_dim=72, max_seq_len=64)


def leaves(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_config_field_round_trips_and_bad_regexes_are_errors():
    assert lora.LoraConfig().train_also == ()  # off by default: only the adapters train
    c = base_config("tiny")
    c.lora.rank, c.lora.train_also, c.init_from = 4, HEADS, "/base"
    exp = Experiment.from_config(c)
    assert exp.lora.train_also == HEADS
    assert Experiment.from_config(exp.to_dict()).lora == exp.lora  # config.json round trip
    with pytest.raises(ConfigError, match=r"lora.targets / lora.train_also: 'embed/\(' is not a valid regex"):
        lora.LoraConfig(rank=4, train_also=("embed/(",))
    with pytest.raises(ConfigError, match=r"lora.train_also_lr_scale=0 must be > 0 \(to freeze those params, drop"):
        lora.LoraConfig(rank=4, train_also=HEADS, train_also_lr_scale=0)


def test_selection_and_its_errors():
    shapes = jax.eval_shape(lambda: init_params(preset("tiny"), jax.random.key(0)))
    cfg = lora.LoraConfig(rank=4, train_also=(*HEADS, *NORMS))
    assert lora.train_also_paths(cfg, shapes) == [
        "embed/embedding", "final_norm/scale",
        *(f"layers_{i}/{n}_norm/scale" for i in range(2) for n in ("attn", "mlp")), "lm_head/kernel"]
    with pytest.raises(ConfigError, match=r"\['lm_hed'\] match no param(.|\n)*lm_head/kernel(.|\n)*--config.lora.train_also"):
        lora.train_also_paths(lora.LoraConfig(rank=4, train_also=("lm_hed",)), shapes)
    with pytest.raises(ConfigError, match=r"selects \['layers_0/attn/q_proj/kernel', 'layers_1/attn/q_proj/kernel'\], "
                                          r"which lora.targets also adapts"):
        lora.train_also_paths(lora.LoraConfig(rank=4, train_also=("q_proj",)), shapes)


def test_the_sft_task_config_trains_the_embedding_and_head_with_its_adapters():
    """configs/sft_task.py ships the README sweep's best LoRA settings; with rank 0 (its full fine-tune) they
    are not read."""
    sft = next(p for p in CONFIGS if p.stem == "sft_task")
    exp = Experiment.from_config(_load(sft, "--config.lora.rank=8", "--config.init_from=/base"))
    shapes = jax.eval_shape(lambda: init_params(preset("shakespeare"), jax.random.key(0)))
    assert lora.train_also_paths(exp.lora, shapes) == ["embed/embedding", "lm_head/kernel"]
    assert lora.target_paths(exp.lora, shapes) == sorted(
        f"layers_{i}/{m}_proj/kernel" for i in range(4)
        for m in ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate", "mlp/up"))
    assert exp.lora.train_also_lr_scale == 10.0
    assert not Experiment.from_config(_load(sft)).lora.enabled


def test_the_flops_count_the_weight_gradients_of_the_fully_trained_head():
    tiny = preset("tiny")  # dim 64, vocab 384, untied head
    c = base_config("tiny")
    c.lora.rank, c.init_from = 4, "/base"
    n, a = tiny.matmul_param_count(), lora.adapter_param_count(lora.LoraConfig(rank=4), tiny)
    c.lora.train_also = HEADS
    assert lora.adapter_param_count(Experiment.from_config(c).lora, tiny) == a  # not adapter params
    # The head's weight gradient (2 per param) comes back; the embedding lookup is a gather: no FLOPs.
    assert Experiment.from_config(c).train_flops_per_token(0) == 4 * n + 6 * a + 2 * 64 * 384
    c.lora.train_also = NORMS
    assert Experiment.from_config(c).train_flops_per_token(0) == 4 * n + 6 * a
    tied = preset("tiny", tie_embeddings=True)
    assert lora.train_also_matmul_param_count(lora.LoraConfig(rank=4, train_also=HEADS[:1]), tied) == 64 * 384


@pytest.mark.slow
def test_gradients_equal_a_full_fine_tunes_and_merge_puts_the_trained_values_in_place():
    model, cfg = Llama(CFG), lora.LoraConfig(rank=3, alpha=6.0, targets=ALL, train_also=(*HEADS, *NORMS))
    params = init_params(CFG, jax.random.key(0))
    adapters = lora.init_adapters(cfg, params, jax.random.key(2), jnp.float32)
    a = leaves(adapters)
    full = lora.train_also_paths(cfg, params)
    for k in full:  # the fully trained params start as the base's values
        np.testing.assert_array_equal(a[k], leaves(params)[k])
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), adapters)
    assert not set(full) & set(leaves(lora.lowrank(adapters, cfg.scale)))  # the "lora" collection: A, B only
    tokens = np.random.default_rng(1).integers(0, 136, (2, 13))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

    def train_objective(ad):  # what the train step differentiates
        return batch_loss_sums(model, lora.overlay(params, ad), batch, lora=lora.lowrank(ad, cfg.scale))["nll_sum"]

    def full_objective(p):  # a full fine-tune of the merged model
        return batch_loss_sums(model, p, batch)["nll_sum"]

    merged = lora.merge(params, adapters, cfg.scale)
    for k in full:
        np.testing.assert_array_equal(leaves(merged)[k], leaves(adapters)[k])
    got, got_grads = jax.jit(jax.value_and_grad(train_objective))(adapters)
    want, want_grads = jax.jit(jax.value_and_grad(full_objective))(merged)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g, w = leaves(got_grads), leaves(want_grads)
    for k in full:
        assert float(jnp.abs(w[k]).max()) > 0
        np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-6 * float(jnp.abs(w[k]).max()), err_msg=k)


def test_train_also_lr_scale_scales_the_updates_of_the_trained_params_alone():
    """The optimizer the train program builds multiplies the train_also params' AdamW updates (weight decay
    included: the head decays) by lora.train_also_lr_scale and leaves the adapters' as they are."""
    c = base_config("tiny")
    c.lora.rank, c.lora.train_also, c.init_from, c.optimizer.weight_decay = 4, HEADS, "/base", 0.5
    c.model.num_layers = 1  # fewer leaves: a faster compile
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)

    def updates(scale: float) -> dict:
        c.lora.train_also_lr_scale = scale
        prog = program_of(c, mesh)
        tx = prog.tx
        params, grads = (jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                                      prog.abstract_state.params) for _ in range(2))

        def two_updates(params, grads):  # the second has Adam moments and a warmed-up lr
            u, state = tx.update(grads, tx.init(params), params)
            return tx.update(grads, state, params)[0]

        return leaves(jax.jit(two_updates)(params, grads))

    rng_state = rng.bit_generator.state
    one = updates(1.0)
    rng.bit_generator.state = rng_state  # the same params and gradients
    quarter = updates(0.25)
    assert set(one) == set(quarter) and {"embed/embedding", "lm_head/kernel"} <= set(one)
    for k in one:
        assert float(jnp.abs(one[k]).max()) > 0, k
        want = one[k] if k.endswith(("/lora_a", "/lora_b")) else 0.25 * one[k]
        np.testing.assert_array_equal(quarter[k], want, err_msg=k)


def lora_program(cfg: lora.LoraConfig) -> TrainProgram:
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0), 10)
    return TrainProgram.build(CFG, mesh, sharding.RULE_SETS["fsdp_tp"], tx, lora=cfg)


def test_the_state_holds_the_trained_params_and_their_optimizer_state_next_to_the_adapters():
    prog = lora_program(lora.LoraConfig(rank=3, targets=ALL, train_also=(*HEADS, *NORMS)))
    trained = leaves(prog.abstract_state.params)
    full = {k for k in trained if not k.endswith(("/lora_a", "/lora_b"))}
    assert full == {"embed/embedding", "lm_head/kernel", "final_norm/scale",
                    *(f"layers_{i}/{n}_norm/scale" for i in range(2) for n in ("attn", "mlp"))}
    base = leaves(prog.abstract_state.base)
    assert all(trained[k].shape == base[k].shape for k in full) and len(trained) == len(full) + 2 * 7 * 2
    for moment in ("mu", "nu"):  # Adam moments for exactly the trained leaves; none for the frozen rest
        got = {k.split(f"/{moment}/", 1)[1]: v.shape for k, v in leaves(prog.abstract_state.opt_state).items()
               if f"/{moment}/" in k}
        assert got == {k: v.shape for k, v in trained.items()}


@pytest.mark.slow
def test_a_train_step_moves_the_trained_params_and_not_the_base():
    prog = lora_program(lora.LoraConfig(rank=3, targets=ALL, train_also=HEADS))
    state = prog.init_state(0)
    # A fresh run copies the restored base into the trained params (train/loop.py): here another base.
    other = jax.tree.map(lambda x: x * 1.5, state.base)
    state = state.replace(base=other, params=lora.copy_trained(state.params, other))
    base = jax.device_get(state.base)
    before = leaves(jax.device_get(state.params))
    for k in ("embed/embedding", "lm_head/kernel"):
        np.testing.assert_array_equal(before[k], leaves(base)[k])
    tokens = np.random.default_rng(0).integers(0, 136, (4, 17))
    batch = prog.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    base_loss = float(batch_loss_sums(Llama(CFG), base, batch)["nll_sum"]) / tokens[:, 1:].size
    state, metrics = prog.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), base_loss, rtol=1e-5)  # step 1 scores the base
    after = leaves(jax.device_get(state.params))
    assert all(np.abs(after[k] - before[k]).max() > 1e-4 for k in ("embed/embedding", "lm_head/kernel"))
    for x, y in zip(jax.tree.leaves(jax.device_get(state.base)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(x, y)  # frozen, bit for bit
    merged = leaves(jax.device_get(prog.model_params(state)))
    np.testing.assert_array_equal(merged["lm_head/kernel"], after["lm_head/kernel"])
