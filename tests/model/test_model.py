"""Model numerics and invariants: modules against numpy, causality, packing, caching, kernels, layouts."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.experiment import base_config
from llama_jax.model import (
    REMAT_POLICIES,
    KVCache,
    Llama,
    for_platform,
    init_params,
    preset,
    stack_layers,
    to_layout,
    unstack_layers,
)
from llama_jax.model.attention import (
    causal_attention,
    dot_product_attention,
    make_mask,
    resolve_impl,
    splash_attention,
    xla_attention,
)
from llama_jax.model.linear import dense
from llama_jax.model.mlp import Mlp
from llama_jax.model.norm import Norm
from llama_jax.model.rope import apply_rope, inverse_frequencies
from tests.helpers import program_of

TINY = preset("tiny")


def _tokens(batch, seq, vocab=256, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


def _randomise(params, seed=3, scale=0.3):
    """Random weights of a realistic scale everywhere (norm scales near 1), so no term is negligible."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (1.0 + 0.2 * jax.random.normal(k, x.shape)) if x.ndim == 1 and x.shape[0] == TINY.dim else
        scale * jax.random.normal(k, x.shape) / math.sqrt(max(x.shape[0], 1))
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(tree, new)


# ---------------------------------------------------------------------- modules vs numpy
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_matches_numpy(kind):
    cfg = TINY.replace(norm=kind, norm_eps=1e-6)
    x = np.random.default_rng(0).normal(size=(2, 3, 64)).astype(np.float32) * 3 + 1
    norm = Norm(cfg)
    params = norm.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + np.random.default_rng(1).normal(size=p.shape).astype(np.float32), params)
    got = norm.apply(params, x)
    scale = np.asarray(params["params"]["scale"])
    if kind == "rmsnorm":
        want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    else:
        c = x - x.mean(-1, keepdims=True)
        want = c / np.sqrt((c**2).mean(-1, keepdims=True) + 1e-6) * scale + np.asarray(params["params"]["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu", "relu2"])
def test_mlp_activations_match_numpy(act):
    from scipy.special import erf

    cfg = TINY.replace(mlp_activation=act)
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    mlp = Mlp(cfg)
    p = mlp.init(jax.random.key(0), x)["params"]
    got = mlp.apply({"params": p}, x)
    up = x @ np.asarray(p["up_proj"]["kernel"])
    gelu = lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))
    if act == "swiglu":
        g = x @ np.asarray(p["gate_proj"]["kernel"])
        h = g / (1 + np.exp(-g)) * up
    elif act == "geglu":
        h = gelu(x @ np.asarray(p["gate_proj"]["kernel"])) * up
    elif act == "gelu":
        h = gelu(up)
    else:
        h = np.maximum(up, 0) ** 2
    assert ("gate_proj" in p) == (act in ("swiglu", "geglu"))
    np.testing.assert_allclose(got, h @ np.asarray(p["down_proj"]["kernel"]), rtol=1e-4, atol=1e-5)


def test_rope_rotates_pairs_half_split():
    cfg = TINY
    inv = inverse_frequencies(cfg)
    np.testing.assert_allclose(inv, 1.0 / 10000 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(1, 4, 2, 16)).astype(np.float32)
    pos = np.array([[0, 1, 5, 100]])
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    ang = pos[0][:, None] * inv  # [seq, 8]
    x1, x2 = x[..., :8], x[..., 8:]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    np.testing.assert_allclose(got, np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1), atol=1e-5)
    np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity


def test_rope_scores_depend_only_on_relative_position():
    inv = inverse_frequencies(TINY.replace(rope_theta=500000.0))
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(pq, pk):
        return float((apply_rope(q, jnp.array([[pq]]), inv) * apply_rope(k, jnp.array([[pk]]), inv)).sum())

    assert score(7, 3) == pytest.approx(score(1007, 1003), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_rope_theta_is_used():
    a = inverse_frequencies(TINY)
    b = inverse_frequencies(TINY.replace(rope_theta=500000.0))
    assert a[0] == b[0] == 1.0 and b[-1] < a[-1] / 10


def test_llama3_scaling_matches_reference_formula():
    cfg = TINY.replace(
        head_dim=64, rope_theta=500000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
    )
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    # Meta's llama3.1 apply_scaling, written as its loop.
    want = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(inverse_frequencies(cfg), np.array(want), rtol=1e-6)
    assert (inverse_frequencies(cfg) != base.astype(np.float32)).sum() > 5


# ---------------------------------------------------------------------- attention kernels
def test_attention_impl_follows_the_compile_target():
    """Resolved for the platform a program is compiled for: an ahead-of-time TPU compile on a CPU host
    gets the Mosaic kernel, a CPU run the interpreted one."""
    assert resolve_impl("auto", "tpu") == "splash"
    assert resolve_impl("auto", "gpu") == "cudnn"
    assert resolve_impl("auto", "cpu") == "xla"
    assert resolve_impl("xla", "tpu") == "xla"
    assert resolve_impl("splash", "tpu") == "splash"
    assert resolve_impl("splash", "cpu") == "splash_interpret"
    assert for_platform(TINY.replace(attention_impl="auto"), "tpu").attention_impl == "splash"
    # jax.nn.dot_product_attention's default implementation is XLA's even on a GPU: cuDNN must be asked
    # for, and it takes bf16/fp16 only.
    assert resolve_impl("dot_product", "gpu", "bfloat16") == "cudnn"
    assert resolve_impl("dot_product", "gpu", "float32") == "dot_product"
    assert resolve_impl("auto", "gpu", "float32") == "dot_product"
    assert resolve_impl("dot_product", "cpu") == "dot_product"
    assert for_platform(TINY.replace(attention_impl="dot_product", dtype="bfloat16"), "gpu").attention_impl == "cudnn"


def test_cudnn_impl_asks_jax_for_cudnn(monkeypatch):
    """attention_impl=cudnn passes implementation='cudnn' (what configs/llama3_2_1b_gpu.py runs on a GPU);
    dot_product leaves jax's default. Checked on CPU by recording the calls and running XLA's version."""
    real, seen = jax.nn.dot_product_attention, []

    def spy(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    params = init_params(TINY, jax.random.key(0))
    tok = _tokens(2, 16)
    ref = Llama(TINY.replace(attention_impl="xla")).apply({"params": params}, tok)
    for impl, want in (("cudnn", "cudnn"), ("dot_product", None)):
        seen.clear()
        got = Llama(TINY.replace(attention_impl=impl)).apply({"params": params}, tok)
        assert seen == [want] * TINY.num_layers
        np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(("features", "num_contract", "bias"), [(12, 1, False), ((3, 4), 1, True), (6, 2, True)])
def test_dense_equals_flax_dense_general(features, num_contract, bias):
    """Same param names, shapes and initial values as nn.DenseGeneral, and the same outputs."""
    import flax.linen as nn

    cfg = TINY.replace(use_bias=bias)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6) if num_contract == 2 else (2, 5, 8))
    ours = dense(cfg, features, "p", num_contract=num_contract)
    ref = nn.DenseGeneral(
        features, axis=tuple(range(-num_contract, 0)), use_bias=bias,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
    )
    p_ours = ours.init(jax.random.key(1), x)
    p_ref = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_ref)
    np.testing.assert_array_equal(p_ours["params"]["kernel"], p_ref["params"]["kernel"])
    p_rand = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape), p_ref)
    np.testing.assert_allclose(ours.apply(p_rand, x), ref.apply(p_rand, x), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
    k = jax.random.normal(jax.random.key(1), (2, 8, 2, 16))
    v = jax.random.normal(jax.random.key(2), (2, 8, 2, 16))
    s = jnp.arange(8)
    mask = make_mask(s, s, jnp.ones((2, 8)), jnp.ones((2, 8)))
    gqa = xla_attention(q, k, v, mask)
    mha = xla_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
    np.testing.assert_allclose(gqa, mha, atol=1e-6)


def test_xla_attention_matches_naive_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 6, 2, 8)).astype(np.float32) for _ in range(3))
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    s = jnp.arange(6)
    got = np.asarray(xla_attention(q, k, v, make_mask(s, s, seg, seg)))
    want = np.zeros_like(q)
    for h in range(2):
        for i in range(6):
            js = [j for j in range(i + 1) if seg[0, j] == seg[0, i]]
            w = np.exp([q[0, i, h] @ k[0, j, h] for j in js])
            w /= w.sum()
            want[0, i, h] = sum(wj * v[0, j, h] for wj, j in zip(w, js))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("t", "block", "kv"),
    [(256, 128, 2), pytest.param(200, 64, 4, marks=pytest.mark.slow), (64, 128, 1), (96, 32, 2)],
)
@pytest.mark.slow
def test_causal_attention_equals_dense_masked_forward_and_backward(t, block, kv):
    """Block skipping is exact: packed segments, padding (segment 0), GQA/MQA, a ragged last block."""
    b, h, d = 2, 4, 16
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (b, t, h, d))
    k = jax.random.normal(k2, (b, t, kv, d))
    v = jax.random.normal(k3, (b, t, kv, d))
    cut = [t // 3, t - 7]
    seg = np.ones((b, t), np.int32)
    seg[0, cut[0] :] = 2
    seg[1, cut[1] :] = 0  # right padding
    s = jnp.arange(t)

    def ref(q, k, v):
        return xla_attention(q, k, v, make_mask(s, s, seg, seg))

    def run(q, k, v):
        return causal_attention(q, k, v, jnp.asarray(seg), block=block)

    np.testing.assert_allclose(run(q, k, v), ref(q, k, v), atol=1e-5)
    loss = lambda f: lambda *a: (f(*a) * jnp.cos(jnp.arange(d))).sum()
    for a, r in zip(jax.grad(loss(run), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, r, atol=2e-5)


def test_causal_attention_skips_masked_blocks():
    """Two query blocks of 128 score 3 of the 4 key blocks: about 3/4 of the dense attention FLOPs."""
    q = jnp.zeros((1, 256, 4, 64))
    seg = jnp.ones((1, 256), jnp.int32)
    s = jnp.arange(256)

    def flops(f):
        return jax.jit(f).lower(q, q, q).compile().cost_analysis()["flops"]

    dense = flops(lambda q, k, v: xla_attention(q, k, v, make_mask(s, s, seg, seg)))
    blocked = flops(lambda q, k, v: causal_attention(q, k, v, seg, block=128))
    assert 0.7 < blocked / dense < 0.8, (blocked, dense)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_match_xla_forward_and_backward(impl, packed):
    """The exact kernel a TPU (splash, Pallas interpret mode) or GPU user runs, against the XLA path."""
    b, t, h, kv, d = 2, 256, 4, 2, 32
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (b, t, h, d))
    k = jax.random.normal(k2, (b, t, kv, d))
    v = jax.random.normal(k3, (b, t, kv, d))
    seg = None
    if packed:
        seg = jnp.concatenate([jnp.ones((b, 100), jnp.int32), 2 * jnp.ones((b, 156), jnp.int32)], 1)
    s = jnp.arange(t)
    ref_seg = seg if packed else jnp.ones((b, t), jnp.int32)

    def ref(q, k, v):
        return xla_attention(q, k, v, make_mask(s, s, ref_seg, ref_seg))

    kernel = {"dot_product": dot_product_attention, "splash": partial(splash_attention, interpret=True)}[impl]

    def run(q, k, v):
        return kernel(q, k, v, seg)

    np.testing.assert_allclose(run(q, k, v), ref(q, k, v), atol=2e-5)
    loss = lambda f: lambda *a: (f(*a) * v.sum(-1, keepdims=True).mean()).sum()
    g_ref = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    g_run = jax.grad(loss(run), (0, 1, 2))(q, k, v)
    for a, r in zip(g_run, g_ref):
        np.testing.assert_allclose(a, r, atol=2e-4 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("impl", ["dot_product", "splash_interpret"])
def test_model_with_kernel_matches_xla(impl):
    cfg = preset("tiny", max_seq_len=128)
    params = init_params(cfg, jax.random.key(0))
    tok = _tokens(2, 128)
    seg = jnp.concatenate([jnp.ones((2, 50), jnp.int32), 2 * jnp.ones((2, 78), jnp.int32)], 1)
    ref = Llama(cfg.replace(attention_impl="xla")).apply({"params": params}, tok, segment_ids=seg)
    got = Llama(cfg.replace(attention_impl=impl)).apply({"params": params}, tok, segment_ids=seg)
    np.testing.assert_allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------------- model invariants
def test_logits_shape_and_dtype(tiny_params):
    logits = Llama(TINY).apply({"params": tiny_params}, _tokens(2, 16))
    assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == jnp.float32


def test_causal_prefix_invariance(tiny_params):
    p = _randomise(tiny_params)
    tok = _tokens(2, 32)
    other = tok.at[:, 20:].set(_tokens(2, 12, seed=9))
    a = Llama(TINY).apply({"params": p}, tok)
    b = Llama(TINY).apply({"params": p}, other)
    np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3


@pytest.mark.slow
def test_packed_documents_do_not_attend_to_each_other(tiny_params):
    p = _randomise(tiny_params)
    doc_a, doc_b = _tokens(1, 10, seed=4), _tokens(1, 14, seed=5)
    packed = jnp.concatenate([doc_a, doc_b], 1)
    seg = jnp.array([[1] * 10 + [2] * 14])
    pos = jnp.array([list(range(10)) + list(range(14))])
    got = Llama(TINY).apply({"params": p}, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(got[:, :10], Llama(TINY).apply({"params": p}, doc_a), atol=1e-5)
    np.testing.assert_allclose(got[:, 10:], Llama(TINY).apply({"params": p}, doc_b), atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward(tiny_params, scan):
    cfg = TINY.replace(scan_layers=scan)
    p = to_layout(_randomise(tiny_params), cfg)
    model = Llama(cfg)
    tok = _tokens(3, 24)
    full = model.apply({"params": p}, tok)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = step(p, tok[:, :9], KVCache.init(cfg, 3, 32))
    outs = [logits]
    for i in range(9, 24):
        logits, cache = step(p, tok[:, i : i + 1], cache)
        outs.append(logits)
    assert int(cache.index) == 24
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)


@pytest.mark.slow
def test_left_padded_prompt_in_cache_matches_unpadded(tiny_params):
    p = _randomise(tiny_params)
    model = Llama(TINY)
    prompt = _tokens(1, 7)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), prompt], 1)
    seg = jnp.array([[0] * pad + [1] * 7])
    pos = jnp.array([[0] * pad + list(range(7))])
    logits, cache = model.apply({"params": p}, padded, positions=pos, segment_ids=seg, cache=KVCache.init(TINY, 1, 16))
    want = model.apply({"params": p}, prompt)
    np.testing.assert_allclose(logits[:, pad:], want, atol=1e-5)
    nxt = _tokens(1, 1, seed=7)
    got, _ = model.apply({"params": p}, nxt, positions=jnp.array([[7]]), cache=cache)
    want = model.apply({"params": p}, jnp.concatenate([prompt, nxt], 1))[:, -1:]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_scan_and_remat_give_same_outputs_and_grads(tiny_params, remat):
    p = _randomise(tiny_params)
    tok = _tokens(2, 16)

    def loss(cfg, params):
        return Llama(cfg).apply({"params": params}, tok).mean()

    base_val, base_grad = jax.value_and_grad(lambda q: loss(TINY, q))(p)
    for scan in (False, True):
        cfg = TINY.replace(scan_layers=scan, remat_policy=remat)
        val, grad = jax.value_and_grad(lambda q, cfg=cfg: loss(cfg, q))(to_layout(p, cfg))
        np.testing.assert_allclose(val, base_val, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(unstack_layers(grad)), jax.tree.leaves(base_grad)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_stack_unstack_round_trip(tiny_params):
    stacked = stack_layers(tiny_params)
    assert stacked["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tiny_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tiny_params)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- precision
def test_bf16_compute_over_f32_params(tiny_params):
    cfg = TINY.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tok = _tokens(2, 16)
    logits = Llama(cfg).apply({"params": params}, tok)
    assert logits.dtype == jnp.float32
    ref = Llama(TINY).apply({"params": params}, tok)
    err = float(jnp.abs(logits - ref).max())
    assert 0 < err < 0.05  # bf16 really was used, and stays close


def test_param_dtype_bf16_is_applied():
    params = init_params(TINY.replace(param_dtype="bfloat16"), jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------- ablation flags, behaviour
def test_position_none_is_order_invariant_in_one_layer():
    """Without positions, a 1-layer model's last logit ignores the order of earlier tokens; RoPE does not."""
    tok = _tokens(1, 12)
    perm = jnp.concatenate([tok[:, :11][:, ::-1], tok[:, 11:]], 1)
    for position, invariant in (("none", True), ("rope", False)):
        cfg = TINY.replace(num_layers=1, position=position)
        p = _randomise(init_params(cfg, jax.random.key(0)))
        a = Llama(cfg).apply({"params": p}, tok)[:, -1]
        b = Llama(cfg).apply({"params": p}, perm)[:, -1]
        assert np.allclose(a, b, atol=1e-5) == invariant


def test_qk_norm_makes_attention_scale_invariant():
    cfg = TINY.replace(qk_norm=True)
    p = _randomise(init_params(cfg, jax.random.key(0)))
    assert p["layers_0"]["attn"]["q_norm"]["scale"].shape == (cfg.head_dim,)
    scale_q = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10 if "q_proj" in jax.tree_util.keystr(path) else x, params
    )
    tok = _tokens(2, 16)
    np.testing.assert_allclose(
        Llama(cfg).apply({"params": scale_q(p)}, tok), Llama(cfg).apply({"params": p}, tok), atol=1e-4
    )
    # Without qk_norm the same rescaling sharpens attention and changes the output.
    p_off = {
        k: {**v, "attn": {n: w for n, w in v["attn"].items() if not n.endswith("_norm")}} if k.startswith("layers_") else v
        for k, v in p.items()
    }
    a = Llama(TINY).apply({"params": p_off}, tok)
    b = Llama(TINY).apply({"params": scale_q(p_off)}, tok)
    assert np.abs(a - b).max() > 1e-3


def test_tied_embeddings_share_the_embedding_matrix():
    cfg = TINY.replace(tie_embeddings=True)
    p = init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p
    tok = jnp.array([[6, 7, 8, 9]])
    bumped = {**p, "embed": {"embedding": p["embed"]["embedding"].at[5].add(1.0)}}
    base = Llama(cfg).apply({"params": p}, tok)
    changed = Llama(cfg).apply({"params": bumped}, tok)
    # Token 5 is never an input, yet its logit moves and no other does: the head reads the embedding.
    assert np.abs(changed[..., 5] - base[..., 5]).max() > 1e-3
    np.testing.assert_allclose(np.delete(changed, 5, -1), np.delete(base, 5, -1), atol=1e-6)


def test_parallel_block_has_one_norm_and_sums_branches():
    cfg = TINY.replace(parallel_block=True, num_layers=1)
    p = _randomise(init_params(cfg, jax.random.key(0)))
    assert "mlp_norm" not in p["layers_0"]
    tok = _tokens(1, 8)
    # Zeroing the MLP output projection must leave exactly the attention branch, in both block kinds.
    no_mlp = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if "down_proj" in jax.tree_util.keystr(path) else x, p
    )
    seq_cfg = cfg.replace(parallel_block=False)
    seq_params = {**no_mlp, "layers_0": {**no_mlp["layers_0"], "mlp_norm": no_mlp["layers_0"]["attn_norm"]}}
    np.testing.assert_allclose(
        Llama(cfg).apply({"params": no_mlp}, tok), Llama(seq_cfg).apply({"params": seq_params}, tok), atol=1e-5
    )
    full = Llama(cfg).apply({"params": p}, tok)
    seq_full = Llama(seq_cfg).apply({"params": {**p, "layers_0": {**p["layers_0"], "mlp_norm": p["layers_0"]["attn_norm"]}}}, tok)
    assert np.abs(full - seq_full).max() > 1e-3


def test_use_bias_adds_biases_that_are_used():
    cfg = TINY.replace(use_bias=True)
    p = init_params(cfg, jax.random.key(0))
    attn = p["layers_0"]["attn"]
    assert attn["q_proj"]["bias"].shape == (4, 16) and attn["o_proj"]["bias"].shape == (64,)
    assert p["layers_0"]["mlp"]["down_proj"]["bias"].shape == (64,)
    tok = _tokens(1, 8)
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if "bias" in jax.tree_util.keystr(path) else x, p
    )
    assert np.abs(Llama(cfg).apply({"params": bumped}, tok) - Llama(cfg).apply({"params": p}, tok)).max() > 1e-3
    assert "bias" not in init_params(TINY, jax.random.key(0))["layers_0"]["attn"]["q_proj"]


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_num_kv_heads_shapes(kv):
    p = init_params(TINY.replace(num_kv_heads=kv), jax.random.key(0))
    assert p["layers_0"]["attn"]["k_proj"]["kernel"].shape == (64, kv, 16)
    assert p["layers_0"]["attn"]["v_proj"]["kernel"].shape == (64, kv, 16)


@pytest.mark.slow
def test_splash_under_a_sharded_train_step_matches_xla():
    """On a (2,2,2) mesh the Mosaic kernel runs inside shard_map; one train step must equal the XLA path."""

    c = base_config("tiny", num_heads=8, num_kv_heads=4, dim=128, max_seq_len=128)
    c.batch_size, c.seq_len = 8, 128
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    x = np.random.default_rng(0).integers(0, 300, (8, 129)).astype(np.int32)
    seg = np.ones((8, 128), np.int32)
    seg[:, 60:] = 2
    results = {}
    for impl in ("xla", "splash"):
        c.model.attention_impl = impl
        trainer = program_of(c)
        batch = trainer.shard_batch({"inputs": x[:, :-1], "targets": x[:, 1:], "segment_ids": seg})
        state, metrics = trainer.train_step(trainer.init_state(0), batch)
        results[impl] = (float(metrics["loss"]), float(metrics["grad_norm"]), state.params)
    np.testing.assert_allclose(results["splash"][:2], results["xla"][:2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["splash"][2]), jax.tree.leaves(results["xla"][2])):
        np.testing.assert_allclose(a, b, atol=1e-5)
