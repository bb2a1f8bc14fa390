"""The train step's low-rank form x @ W + s * (x @ A) @ B: it equals the merged W + s * A @ B in value and in
the adapters' gradients, and its compiled step forms no dense [in, out] gradient (nor merged weight) for an
adapted kernel."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora, sharding
from llama_jax.model import Llama, ModelConfig, batch_loss_sums, init_params, path_str
from llama_jax.train import OptimizerConfig, TrainProgram, make_optimizer

ALL = (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
# Odd sizes, so that no activation or other weight has an adapted kernel's [in, out] shape.
CFG = ModelConfig(vocab_size=136, dim=40, num_layers=2, num_heads=5, num_kv_heads=5, ffn_dim=72, max_seq_len=64)


def random_adapters(cfg: lora.LoraConfig, params):
    adapters = lora.init_adapters(cfg, params, jax.random.key(2), jnp.float32)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), adapters)  # B != 0


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_lowrank_equals_the_merged_weights_in_value_and_gradient(scan):
    model_cfg = CFG.replace(scan_layers=scan)
    model, cfg = Llama(model_cfg), lora.LoraConfig(rank=3, alpha=6.0, targets=ALL)
    params = init_params(model_cfg, jax.random.key(0))
    adapters = random_adapters(cfg, params)
    tokens = np.random.default_rng(1).integers(0, 136, (2, 13))
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

    def merged(a):
        return batch_loss_sums(model, lora.merge(params, a, cfg.scale), batch)["nll_sum"]

    def lowrank(a):
        return batch_loss_sums(model, params, batch, lora=lora.lowrank(a, cfg.scale))["nll_sum"]

    want, want_grads = jax.jit(jax.value_and_grad(merged))(adapters)
    got, got_grads = jax.jit(jax.value_and_grad(lowrank))(adapters)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    base_loss = batch_loss_sums(model, params, batch)["nll_sum"]
    assert abs(float(got) - float(base_loss)) > 1e-2  # the adapters do change the model
    g, w = (dict((path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(t)) for t in (got_grads, want_grads))
    assert len(g) == 2 * 7 * (1 if scan else 2) and g.keys() == w.keys()  # A and B of 7 kernels per layer
    for k in g:
        np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-6 * float(np.abs(w[k]).max()), err_msg=k)


def dense_shaped_dots(hlo: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """The dot instructions of compiled HLO text whose f32 output has one of `shapes`."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]*)\]\S* dot\(", line)
        if m and tuple(int(d) for d in m.group(1).split(",") if d) in shapes:
            found.append(line.strip()[:160])
    return found


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_the_compiled_train_step_forms_no_dense_kernel_gradient(scan):
    model_cfg = CFG.replace(scan_layers=scan)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    prog = TrainProgram.build(model_cfg, mesh, sharding.RULE_SETS["fsdp_tp"], tx,
                              lora=lora.LoraConfig(rank=3, targets=ALL))
    batch = {k: jax.ShapeDtypeStruct((2, 24), jnp.int32) for k in ("inputs", "targets")}
    hlo = prog.train_step.lower(prog.abstract_state, batch).compile().as_text()
    # Every adapted kernel's flattened [in, out] (the shape `matmul` would give its dense gradient) and its
    # transpose; [40, 40] covers q, k, v and o.
    shapes = {(40, 40), (40, 72), (72, 40)}
    assert dense_shaped_dots(hlo, shapes) == []
    assert dense_shaped_dots(hlo, {(48, 3)}), "the low-rank x @ A dots were not found: the check looks wrong"
    # The same check does find them in a full fine-tune of the same model.
    full = TrainProgram.build(model_cfg, mesh, sharding.RULE_SETS["fsdp_tp"], tx)
    full_hlo = full.train_step.lower(full.abstract_state, batch).compile().as_text()
    assert len(dense_shaped_dots(full_hlo, shapes)) >= 7
