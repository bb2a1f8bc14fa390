"""The chunked LM head + cross-entropy equals the plain one; remat policies save what their names say."""

import collections
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from llama_jax.experiment import base_config
from llama_jax.model import REMAT_POLICIES, REMAT_SAVES, Llama, batch_loss_sums, init_params, preset
from tests.helpers import program_of


def _batch(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    mask = (rng.random((batch, seq)) > 0.2).astype(np.float32)
    seg = np.ones((batch, seq), np.int32)
    seg[:, seq // 2 :] = 2
    seg[0, -5:] = 0  # padding
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]), "loss_mask": jnp.asarray(mask),
            "segment_ids": jnp.asarray(seg)}


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [16, 24])  # 24 does not divide 64: the last chunk is shorter
def test_chunked_loss_equals_plain_values_and_grads(tie, chunk):
    cfg = preset("tiny", tie_embeddings=tie, max_seq_len=64)
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, init_params(cfg, jax.random.key(0)))
    batch = _batch(3, 64, cfg.vocab_size)

    def objective(c):
        def f(p):
            sums = batch_loss_sums(Llama(c), p, batch)
            return sums["nll_sum"] + 1e-2 * sums["z_sum"], sums
        return jax.value_and_grad(f, has_aux=True)(params)

    (plain_obj, plain), plain_grads = objective(cfg)
    (chunk_obj, chunked), chunk_grads = objective(cfg.replace(loss_chunk=chunk))
    assert float(plain["tokens"]) == float(chunked["tokens"]) > 100
    np.testing.assert_allclose(chunk_obj, plain_obj, rtol=1e-6)
    for k in ("nll_sum", "z_sum"):
        np.testing.assert_allclose(chunked[k], plain[k], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunk_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.slow
def test_chunked_loss_with_the_vocab_sharded_over_tensor():
    """One train step on a data 2 x fsdp 2 x tensor 2 mesh (vocab-parallel head and embedding): the same
    loss, gradient norm and updated params with and without chunks."""
    results = {}
    for chunk in (0, 16):
        c = base_config("tiny", loss_chunk=chunk, max_seq_len=64)
        c.batch_size, c.seq_len = 8, 64
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
        prog = program_of(c)
        assert prog.state_shardings.params["lm_head"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        batch = prog.shard_batch({k: np.asarray(v) for k, v in _batch(8, 64, 384, seed=1).items()})
        state, metrics = prog.train_step(prog.init_state(0), batch)
        results[chunk] = (float(metrics["loss"]), float(metrics["grad_norm"]), state.params)
    np.testing.assert_allclose(results[16][:2], results[0][:2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[16][2]), jax.tree.leaves(results[0][2])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _saved_names(policy: str) -> collections.Counter:
    """What one remat'd layer keeps for the backward pass: the `checkpoint_name`s among the residuals,
    and the count of unnamed residuals computed inside attention and the MLP."""
    cfg = preset("tiny", num_layers=1, remat_policy=policy)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.ones((2, 16), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: Llama(cfg).apply({"params": p}, tokens).sum(), params)
    counts = collections.Counter(re.findall(r"named '(\w+)'", out.getvalue()))
    counts["unnamed inside the layer"] = len(
        [line for line in out.getvalue().splitlines()
         if "named" not in line and re.search(r"model/(attention|mlp)\.py", line)]
    )
    return counts


# Per layer: q, k, v; the attention output; the output projection; gate and up.
_PER_NAME = {"qkv_proj": 3, "attn_out": 1, "out_proj": 1, "mlp_in": 2}


@pytest.mark.parametrize("policy", REMAT_SAVES)
def test_remat_policies_save_exactly_the_named_activations(policy):
    counts = _saved_names(policy)
    want = {name: _PER_NAME[name] for name in REMAT_SAVES[policy]}
    assert {k: v for k, v in counts.items() if v} == want


def test_no_remat_saves_the_intermediates_too():
    counts = _saved_names("none")
    assert counts["unnamed inside the layer"] > 5
    assert "none" in REMAT_POLICIES and "none" not in REMAT_SAVES
