"""llama_jax.tools.hf against transformers' PyTorch LlamaForCausalLM (CPU, float32, eager attention).

Each parity config is a random tiny HF model whose weights are re-drawn at a scale that makes logits O(1-10)
(HF's own init, std 0.02, gives near-zero logits that would agree with anything), saved with
`save_pretrained` and imported with `load_hf_llama`, exactly as a user's checkpoint would be.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_jax import checkpoint, errors
from llama_jax.model import KVCache, Llama, param_shapes
from llama_jax.tools import hf
from tests.helpers import run_module

torch = pytest.importorskip("torch", reason="the HF tests build their checkpoints with PyTorch transformers: "
                            "pip install -e '.[torch]' (pyproject.toml says how to get the CPU build)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402  (after the skip: its models need torch)

PARITY_TOL = 1e-4
BATCH, SEQ = 2, 256  # positions up to 255: 4x the llama3 config's original_max_position_embeddings

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=SEQ,
    rms_norm_eps=1e-5,
    # No special tokens: generation must never stop early on a random model's "eos".
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    # Llama-3.2-style: GQA, tied embeddings, theta 5e5 with llama3 frequency scaling.
    "gqa_tied_llama3": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
    ),
    # MQA with biases on every projection and a head_dim decoupled from hidden_size / heads.
    "mqa_bias": dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True
    ),
}


def make_hf_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**BASE, **CONFIGS[name], attn_implementation="eager", dtype=torch.float32)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in pname:
                p.copy_(0.3 * torch.randn_like(p))
            else:  # Linear [out, in]
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return m


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    # Other test processes share the 2 cores; one torch thread keeps this file from starving them.
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_model(request, tmp_path_factory):
    """(config name, torch model, its save_pretrained dir), built once per config for the module."""
    m = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return request.param, m, d


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory):
    """A saved GQA+llama3 model for the format and error tests (read-only: tests copy it before editing)."""
    d = tmp_path_factory.mktemp("small")
    make_hf_model("gqa_tied_llama3", seed=1).save_pretrained(d)
    return d


def tokens(seed=0, shape=(BATCH, SEQ)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], shape)


def hf_logits(m: LlamaForCausalLM, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(toks)).logits.numpy()


def jax_logits(cfg, params, toks: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(toks, jnp.int32)))


def assert_trees_equal(a, b):
    """Same structure, and every leaf bit-identical (dtype included)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), jax.tree_util.keystr(path)


def copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(d: pathlib.Path, **changes) -> None:
    path = d / "config.json"
    c = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    path.write_text(json.dumps(c))


# ---------------------------------------------------------------------- parity
def test_logits_match_transformers(hf_model):
    name, m, d = hf_model
    cfg, params = hf.load_hf_llama(d)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings, cfg.use_bias) == (
        m.config.num_attention_heads,
        m.config.num_key_value_heads,
        m.config.tie_word_embeddings,
        m.config.attention_bias,
    )
    if cfg.tie_embeddings:
        assert "lm_head" not in params and "lm_head.weight" not in load_file(d / "model.safetensors")
    toks = tokens()
    ref, out = hf_logits(m, toks), jax_logits(cfg, params, toks)
    diff = float(np.abs(ref - out).max())
    print(
        f"\n[{name}] f32 logits max abs diff vs transformers: {diff:.3e} (max |logit| {np.abs(ref).max():.1f})"
    )
    assert out.shape == ref.shape == (BATCH, SEQ, BASE["vocab_size"])
    assert diff <= PARITY_TOL
    if cfg.rope_scaling == "llama3":
        # The comparison must be sensitive to the scaling: without it the logits are far off.
        unscaled = jax_logits(cfg.replace(rope_scaling="none"), params, toks)
        assert np.abs(ref - unscaled).max() > 100 * PARITY_TOL


@pytest.mark.parametrize("hf_model", ["gqa_tied_llama3"], indirect=True)
def test_scanned_layout_matches(hf_model):
    name, m, d = hf_model
    cfg, params = hf.load_hf_llama(d)
    scfg, sparams = hf.load_hf_llama(d, scan_layers=True)
    assert scfg.scan_layers and "layers" in sparams and "layers_0" not in sparams
    assert sparams["layers"]["attn"]["q_proj"]["kernel"].shape[0] == cfg.num_layers
    toks = tokens()
    ref, out = hf_logits(m, toks), jax_logits(scfg, sparams, toks)
    diff = float(np.abs(ref - out).max())
    print(f"\n[{name}, scan_layers] f32 logits max abs diff vs transformers: {diff:.3e}")
    assert diff <= PARITY_TOL
    np.testing.assert_allclose(out, jax_logits(cfg, params, toks), atol=1e-5, rtol=0)


def greedy(cfg, params, prompt: np.ndarray, n: int) -> np.ndarray:
    """n greedy tokens after `prompt` [batch, t], decoding one token at a time through the KV cache."""
    batch, t = prompt.shape
    step = jax.jit(lambda p, toks, cache: Llama(cfg).apply({"params": p}, toks, cache=cache))
    logits, cache = step(params, jnp.asarray(prompt, jnp.int32), KVCache.init(cfg, batch, t + n))
    out = []
    for i in range(n):
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [batch]
        out.append(nxt)
        if i + 1 < n:
            logits, cache = step(params, nxt[:, None], cache)
    return np.asarray(jnp.stack(out, axis=1))  # [batch, n]


def test_greedy_continuations_match_transformers(hf_model):
    name, m, d = hf_model
    cfg, params = hf.load_hf_llama(d)
    prompt = tokens(seed=1, shape=(2, 8))
    n = 16
    with torch.no_grad():
        ref = m.generate(
            torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )[:, prompt.shape[1] :].numpy()
    ours = greedy(cfg, params, prompt, n)
    print(f"\n[{name}] greedy: {ours.tolist()}")
    assert ref.shape == (2, n)
    np.testing.assert_array_equal(ours, ref)


def test_import_export_import_is_bit_exact(hf_model, tmp_path):
    name, m, d = hf_model
    cfg, params = hf.load_hf_llama(d)
    hf.save_hf_llama(cfg, params, tmp_path / "out")
    cfg2, params2 = hf.load_hf_llama(tmp_path / "out")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    # transformers reads the export as the same network: same weights and config, hence identical logits.
    m2 = LlamaForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", dtype=torch.float32
    ).eval()
    ref_sd, got_sd = m.state_dict(), m2.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    toks = tokens(shape=(1, SEQ))
    np.testing.assert_array_equal(hf_logits(m2, toks), hf_logits(m, toks))


# ---------------------------------------------------------------------- formats
def test_v4_and_v5_config_forms_agree(small_hf_dir, tmp_path):
    v5 = json.loads((small_hf_dir / "config.json").read_text())
    assert v5["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in v5  # what 5.x writes
    v4_dir = copy_dir(small_hf_dir, tmp_path / "v4")
    rope = dict(v5["rope_parameters"])
    theta = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")  # the older spelling inside rope_scaling
    edit_config(v4_dir, rope_parameters=None, rope_theta=theta, rope_scaling=rope)
    cfg5, params5 = hf.load_hf_llama(small_hf_dir)
    cfg4, params4 = hf.load_hf_llama(v4_dir)
    assert (
        cfg5.rope_scaling == "llama3"
        and cfg5.rope_theta == 500000.0
        and cfg5.rope_original_max_position == 64
    )
    assert cfg4 == cfg5
    assert_trees_equal(params4, params5)
    # A v4 config with no rope_scaling is plain RoPE at the top-level theta.
    edit_config(v4_dir, rope_scaling=None, rope_theta=12345.0)
    cfg_plain, _ = hf.load_hf_llama(v4_dir)
    assert (cfg_plain.rope_scaling, cfg_plain.rope_theta) == ("none", 12345.0)


def test_exported_config_json_has_both_rope_forms(small_hf_dir, tmp_path):
    cfg, params = hf.load_hf_llama(small_hf_dir)
    hf.save_hf_llama(cfg, params, tmp_path / "out")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["rope_parameters"]["rope_type"] == "llama3" and c["rope_parameters"]["rope_theta"] == 500000.0
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_theta"] == 500000.0
    loaded = LlamaConfig.from_pretrained(tmp_path / "out")
    assert loaded.rope_parameters["original_max_position_embeddings"] == 64
    assert loaded.rope_parameters["rope_theta"] == 500000.0


def test_sharded_safetensors(small_hf_dir, tmp_path):
    m = LlamaForCausalLM.from_pretrained(small_hf_dir, dtype=torch.float32)
    m.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / hf.SINGLE_FILE).exists()
    cfg, params = hf.load_hf_llama(small_hf_dir)
    cfg_s, params_s = hf.load_hf_llama(tmp_path / "sharded")
    assert cfg_s == cfg
    assert_trees_equal(params_s, params)

    # Our own sharded export: an index transformers and we both read back.
    hf.save_hf_llama(cfg, params, tmp_path / "ours", max_shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    _, params_o = hf.load_hf_llama(tmp_path / "ours")
    assert_trees_equal(params_o, params)
    m2 = LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_bf16_safetensors(small_hf_dir, tmp_path):
    m = LlamaForCausalLM.from_pretrained(small_hf_dir, dtype=torch.float32).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    cfg, params = hf.load_hf_llama(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    sd = m.state_dict()
    # bf16 -> f32 is exact, so the values can be compared exactly after widening.
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"], np.float32), sd["model.embed_tokens.weight"].float().numpy()
    )
    q = sd["model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [H*hd, D]
    np.testing.assert_array_equal(
        np.asarray(params["layers_1"]["attn"]["q_proj"]["kernel"], np.float32),
        q.T.reshape(cfg.dim, cfg.num_heads, -1),
    )
    cfg32, params32 = hf.load_hf_llama(tmp_path / "bf16", dtype="float32")
    assert cfg32.param_dtype == "float32"
    assert_trees_equal(params32, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    # Export in bf16 and back: bit-exact, and the file really holds bf16.
    hf.save_hf_llama(cfg, params, tmp_path / "out", dtype="bfloat16")
    assert str(load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype) == "bfloat16"
    _, params2 = hf.load_hf_llama(tmp_path / "out")
    assert_trees_equal(params2, params)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="mistral"), "model_type is 'mistral'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type 'yarn'"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias=True but mlp_bias=False"),
        (dict(num_attention_heads=3), "num_heads=3"),
        (dict(hidden_size=None), "missing ['hidden_size']"),
        (dict(rope_scaling=dict(rope_type="linear", factor=2.0)), "disagree"),
    ],
)
def test_rejects_unsupported_config(small_hf_dir, tmp_path, changes, message):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    edit_config(d, **changes)
    with pytest.raises(errors.HFImportError) as e:
        hf.load_hf_llama(d)
    assert message in str(e.value) and str(d / "config.json") in str(e.value)


def rewrite_weights(d: pathlib.Path, fn) -> None:
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_import_and_export_refuse_non_finite_params_naming_the_array(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "nan")

    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan

    rewrite_weights(d, poison)
    with pytest.raises(errors.HFImportError, match=r"holds non-finite params: 1 array\(s\) with NaN or inf "
                       r"\(\['layers_1'\]\['mlp'\]\['down_proj'\]\['kernel'\]\)\. Import an intact"):
        hf.import_to_workdir(d, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    workdir = tmp_path / "workdir"
    cfg = hf.import_to_workdir(small_hf_dir, workdir)
    params = checkpoint.restore_params(workdir, param_shapes(cfg))
    checkpoint.save_params(workdir, jax.tree.map(lambda p: p.at[0].set(jnp.inf), params), step=5)  # diverged
    with pytest.raises(errors.HFExportError, match=r"step 5 holds non-finite params: .* --step=N \(the steps are \[0, 5\]\)"):
        hf.export_from_workdir(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_missing_weight(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(errors.HFImportError, match="missing weight") as e:
        hf.load_hf_llama(d)
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value) and str(d / "model.safetensors") in str(
        e.value
    )


def test_rejects_misshaped_weight(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"  # [KV*hd, D] = [32, 64]
    rewrite_weights(d, lambda t: t.update({name: np.zeros((64, 64), np.float32)}))
    with pytest.raises(errors.HFImportError) as e:
        hf.load_hf_llama(d)
    msg = str(e.value)
    assert name in msg and "(64, 64)" in msg and "(32, 64)" in msg and str(d / "model.safetensors") in msg


def test_rejects_quantized_weight(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_weights(d, lambda t: t.update({name: t[name].astype(np.int8)}))
    with pytest.raises(errors.HFImportError, match=rf"{name} has dtype I8"):
        hf.load_hf_llama(d)


def test_rejects_unexpected_weight(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    rewrite_weights(
        d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    )
    with pytest.raises(errors.HFImportError, match=r"q_norm\.weight \(model\.safetensors\)"):
        hf.load_hf_llama(d)


def test_tied_checkpoint_with_a_different_head_is_rejected(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    rewrite_weights(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    hf.load_hf_llama(d)  # an explicit copy of the embedding is fine
    rewrite_weights(d, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(errors.HFImportError, match="lm_head.weight differs"):
        hf.load_hf_llama(d)


def test_rejects_dir_without_safetensors(small_hf_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(small_hf_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(errors.HFImportError, match=r"no model\.safetensors.*pytorch_model\.bin.*save_pretrained"):
        hf.load_hf_llama(d)


def leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_refuses_non_empty_dir_and_writes_nothing_on_failure(small_hf_dir, tmp_path):
    cfg, params = hf.load_hf_llama(small_hf_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(errors.HFExportError, match="not empty"):
        hf.save_hf_llama(cfg, params, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # Failures after the temp dir exists: an unexportable architecture, and params missing a tensor.
    with pytest.raises(errors.HFExportError, match="qk_norm=True"):
        hf.save_hf_llama(cfg.replace(qk_norm=True), params, tmp_path / "new")
    broken = dict(params)
    del broken["final_norm"]
    with pytest.raises(errors.HFExportError, match="final_norm/scale"):
        hf.save_hf_llama(cfg, broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []

    hf.save_hf_llama(cfg, params, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------- convert_hf
def write_tokenizer_files(d: pathlib.Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(BASE["vocab_size"] - 1)} | {"<unk>": BASE["vocab_size"] - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>"}))


def convert(*args) -> subprocess.CompletedProcess:
    return run_module("experiments.convert_hf", *args, timeout=300)


@pytest.mark.slow
def test_convert_hf_command_line_round_trip(small_hf_dir, tmp_path):
    src = copy_dir(small_hf_dir, tmp_path / "hf")
    write_tokenizer_files(src)
    edit_config(src, bos_token_id=5, eos_token_id=[6, 7])
    work = tmp_path / "work"
    r = convert(f"--hf_dir={src}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr

    cfg, params = hf.load_hf_llama(src)
    assert checkpoint.read_model_config(work) == cfg
    source = checkpoint.read_config(work)["source"]
    assert source == {"hf_dir": str(src), "bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": None}
    restored = checkpoint.restore_params(work, param_shapes(cfg))
    assert_trees_equal(restored, params)
    tok_dir = pathlib.Path(checkpoint.tokenizer_dir(work))
    assert sorted(p.name for p in tok_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    out = tmp_path / "exported"
    r = convert("--to_hf", f"--workdir={work}", f"--hf_dir={out}")
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    exported = json.loads((out / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (5, [6, 7])
    cfg2, params2 = hf.load_hf_llama(out)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)

    # Neither direction writes into a non-empty target.
    r = convert(f"--hf_dir={src}", f"--workdir={work}")
    assert r.returncode != 0 and "is not empty" in r.stderr
    with pytest.raises(errors.HFExportError, match="not empty"):
        hf.export_from_workdir(work, out)
    assert leftovers(tmp_path) == []


def test_scanned_workdir_exports_unscanned_hf(small_hf_dir, tmp_path):
    cfg = hf.import_to_workdir(small_hf_dir, tmp_path / "work", scan_layers=True, dtype="bfloat16")
    assert cfg.scan_layers and cfg.param_dtype == "bfloat16"
    stored = checkpoint.restore_params(
        tmp_path / "work", param_shapes(checkpoint.read_model_config(tmp_path / "work"))
    )
    assert stored["layers"]["mlp"]["down_proj"]["kernel"].shape[0] == cfg.num_layers
    hf.export_from_workdir(tmp_path / "work", tmp_path / "out")  # dtype defaults to the workdir's bf16
    assert str(load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype) == "bfloat16"
    _, params = hf.load_hf_llama(tmp_path / "out", scan_layers=True)
    assert_trees_equal(params, stored)


def test_truncated_or_corrupt_safetensors_names_the_file(small_hf_dir, tmp_path):
    d = copy_dir(small_hf_dir, tmp_path / "m")
    weights = d / hf.SINGLE_FILE
    good = weights.read_bytes()
    for damaged in (good[:100], np.random.default_rng(0).bytes(5000)):
        weights.write_bytes(damaged)
        with pytest.raises(errors.HFImportError, match="truncated or corrupt") as e:
            hf.load_hf_llama(d)
        assert str(weights) in str(e.value)
    # A damaged shard of a sharded checkpoint is named too (it is first opened to check its header).
    cfg, params = hf.load_hf_llama(small_hf_dir)
    hf.save_hf_llama(cfg, params, tmp_path / "sharded", max_shard_bytes=100_000)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(errors.HFImportError, match="truncated or corrupt") as e:
        hf.load_hf_llama(tmp_path / "sharded")
    assert str(shard) in str(e.value)


def modes(root: pathlib.Path) -> set[tuple[str, int]]:
    """{("dir" | "file", permission bits)} over root and everything under it."""
    paths = [root, *root.rglob("*")]
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in paths}


def test_converted_dirs_get_the_umask_permissions_not_the_temp_dirs(small_hf_dir, tmp_path):
    old = os.umask(0o022)
    try:
        hf.import_to_workdir(small_hf_dir, tmp_path / "work")
        os.umask(0o027)
        hf.export_from_workdir(tmp_path / "work", tmp_path / "out")
    finally:
        os.umask(old)
    assert modes(tmp_path / "work") == {("dir", 0o755), ("file", 0o644)}
    assert modes(tmp_path / "out") == {("dir", 0o750), ("file", 0o640)}


@pytest.mark.slow
def test_convert_hf_prints_only_its_result_lines(small_hf_dir, tmp_path):
    """Orbax's ~60 INFO lines per save/restore are silenced; the imported/exported line stays."""
    work, out = tmp_path / "work", tmp_path / "out"
    for args, word in (([f"--hf_dir={small_hf_dir}", f"--workdir={work}"], "imported"),
                       (["--to_hf", f"--workdir={work}", f"--hf_dir={out}"], "exported")):
        r = convert(*args)
        assert r.returncode == 0, r.stderr
        lines = (r.stdout + r.stderr).splitlines()
        assert len(lines) < 10, "\n".join(lines)
        assert any(f"{word} " in line and "params)" in line for line in lines), "\n".join(lines)
