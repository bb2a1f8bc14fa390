"""LoRA runs end to end (in-process, configs/tiny.py on local files): the loss falls with only adapters
trained; checkpoints hold adapters, their optimizer state and the base reference; a resumed run is bit-exact;
resuming on a different base is refused; load_workdir and the HF export give the merged model."""

import shutil

import jax
import numpy as np
import pytest

from llama_jax import checkpoint
from llama_jax.errors import CheckpointError
from llama_jax.experiment import Experiment
from llama_jax.inference import evaluate_workdir, load_workdir
from llama_jax.lora.workdir import BASE_FILE, fingerprint, read_base_ref
from llama_jax.model import Llama, param_shapes, path_str
from llama_jax.tools import hf
from llama_jax.train import Hook, read_metrics, train
from tests.helpers import load_config, program_of

STEPS = 8


def lora_config(base, **top):
    c = load_config("tiny")
    c.data.train_files = str(base.parent / "data" / "train.txt")
    c.data.eval_files = str(base.parent / "data" / "eval.txt")
    c.init_from = str(base)
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.num_steps, c.eval_every, c.checkpoint_every, c.log_every, c.keep_checkpoints = STEPS, 0, 4, 1, 0
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-2, 2
    for k, v in top.items():
        c[k] = v
    return c


def leaves(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


class StopAt(Hook):
    """Ends the run after step `step`, after that step's checkpoint hook: what a preemption leaves behind."""

    def __init__(self, step):
        self.step = self.every = step

    def __call__(self, run):
        run.stop = run.done == self.step


@pytest.fixture(scope="module")
def straight(trained_tiny_workdir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "straight"
    train(Experiment.from_config(lora_config(trained_tiny_workdir)), workdir)
    return workdir


def adapters_at(workdir, step):
    config = config_of(workdir)
    return checkpoint.restore_params(workdir, program_of(config).abstract_state.params, step=step)


def config_of(workdir):
    return checkpoint.read_config(workdir)


@pytest.mark.slow
def test_only_adapters_train_and_the_loss_falls(straight, trained_tiny_workdir):
    config = config_of(straight)
    assert config["lora"]["rank"] == 4 and config["init_from"] == str(trained_tiny_workdir)
    ref = read_base_ref(straight)
    assert (ref.workdir, ref.step) == (str(trained_tiny_workdir), 20)
    prog = program_of(config)
    base = checkpoint.restore_params(trained_tiny_workdir, prog.abstract_state.base)
    assert ref.fingerprint == fingerprint(base)
    # The checkpoint's params item is the adapters alone, and its optimizer state is adapter-shaped.
    stored = checkpoint.restore_params(straight, prog.abstract_state.params, step=STEPS)
    names = sorted(leaves(stored))
    assert names and all(n.endswith(("/lora_a", "/lora_b")) for n in names)
    assert len(names) == 2 * 4 * 2  # A and B of q, k, v, o in 2 layers
    shapes = {a.shape for a in jax.tree.leaves(prog.abstract_state.params)}
    assert {a.shape for a in jax.tree.leaves(prog.abstract_state.opt_state) if a.size > 1} == shapes
    assert sum(a.size for a in jax.tree.leaves(prog.abstract_state.opt_state) if a.size > 1) == 2 * sum(
        a.size for a in jax.tree.leaves(prog.abstract_state.params))
    # B moved off zero; the loss went down (step 1 scores the base model exactly: B = 0 there).
    assert all(np.abs(v).max() > 0 for k, v in leaves(stored).items() if k.endswith("lora_b"))
    loss = losses(straight)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = np.mean([loss[s] for s in (1, 2)]), np.mean([loss[s] for s in (STEPS - 1, STEPS)])
    print(f"\nLoRA r=4 on the trained tiny base: train loss steps 1-2 {first:.4f} -> steps {STEPS - 1}-{STEPS} {last:.4f}")
    assert last < first - 0.05
    # The base workdir is untouched, bit for bit (its newest checkpoint is still step 20).
    assert checkpoint.all_steps(trained_tiny_workdir) == [20]


@pytest.mark.slow
def test_resume_is_bit_exact(straight, trained_tiny_workdir, tmp_path):
    config = lora_config(trained_tiny_workdir)
    train(Experiment.from_config(config), tmp_path, extra_hooks=[StopAt(4)])
    assert checkpoint.all_steps(tmp_path) == [4]
    assert train(Experiment.from_config(config), tmp_path)["step"] == STEPS  # the same command resumes
    assert losses(tmp_path) == losses(straight)
    got, want = leaves(adapters_at(tmp_path, STEPS)), leaves(adapters_at(straight, STEPS))
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_resuming_on_a_different_base_is_refused(trained_tiny_workdir, tmp_path):
    config = lora_config(trained_tiny_workdir)
    train(Experiment.from_config(config), tmp_path / "run", extra_hooks=[StopAt(4)])
    # A copy of the base resumes (same params: same fingerprint); a perturbed one is refused, naming both.
    shutil.copytree(trained_tiny_workdir, tmp_path / "copy")
    other = tmp_path / "other"
    shutil.copytree(trained_tiny_workdir, other)
    prog = program_of(config)
    params = checkpoint.restore_params(other, prog.abstract_state.base)
    params["final_norm"]["scale"] = params["final_norm"]["scale"] + 1e-3
    shutil.rmtree(other / "checkpoints")
    checkpoint.save_params(other, params, step=20)
    config.allow_config_change = True
    config.init_from = str(other)
    with pytest.raises(CheckpointError, match=rf"trained on the base {trained_tiny_workdir} step 20 \(fingerprint "
                                              rf"\w+\), but the base given is {other} step 20"):
        train(Experiment.from_config(config), tmp_path / "run")
    config.init_from = str(tmp_path / "copy")
    config.num_steps = 5
    assert train(Experiment.from_config(config), tmp_path / "run")["step"] == 5
    assert read_base_ref(tmp_path / "run").workdir == str(tmp_path / "copy")
    # A base trained further keeps its old step for the adapters; one whose step is gone is refused.
    checkpoint.save_params(tmp_path / "copy", params, step=30)
    config.num_steps = 6
    assert train(Experiment.from_config(config), tmp_path / "run")["step"] == 6
    shutil.rmtree(tmp_path / "copy" / "checkpoints" / "20")
    with pytest.raises(CheckpointError, match=r"no longer has step 20 \(its checkpoints: \[30\]\)"):
        load_workdir(tmp_path / "run")
    (tmp_path / "run" / BASE_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{BASE_FILE} is missing"):
        load_workdir(tmp_path / "run")


def test_eval_ppl_scores_the_adapted_model(straight, trained_tiny_workdir):
    """What experiments.eval_ppl runs: on the adapter workdir it scores base + adapters, lower than the base."""
    adapted, base = evaluate_workdir(straight), evaluate_workdir(trained_tiny_workdir, seq_len=64)
    print(f"\nheld-out bits/byte: base {base['bits_per_byte']:.4f}, LoRA {adapted['bits_per_byte']:.4f}")
    assert adapted["tokens"] == base["tokens"] and adapted["loss"] < base["loss"] - 0.02


@pytest.mark.slow
def test_load_workdir_and_hf_export_give_the_merged_model(straight, trained_tiny_workdir, tmp_path):
    model_config, params, _, config = load_workdir(straight)
    base = checkpoint.restore_params(trained_tiny_workdir, param_shapes(model_config))
    adapters = leaves(adapters_at(straight, STEPS))
    scale = config["lora"]["alpha"] / config["lora"]["rank"]
    merged, base = leaves(params), leaves(base)
    for k, w in base.items():  # numpy reference: W + alpha / r * A @ B on q, k, v, o; the rest the base's
        if k + "/lora_a" in adapters:
            a, b = adapters[k + "/lora_a"], adapters[k + "/lora_b"]
            want = w + scale * (a.reshape(-1, 4).astype(np.float64) @ b.reshape(4, -1)).reshape(w.shape)
            np.testing.assert_allclose(merged[k], want, rtol=1e-6, atol=1e-6)
            assert np.abs(merged[k] - w).max() > 1e-4
        else:
            np.testing.assert_array_equal(merged[k], w)
    hf.export_from_workdir(straight, tmp_path / "hf")
    hf_config, hf_params = hf.load_hf_llama(tmp_path / "hf")
    for k, v in leaves(hf_params).items():
        np.testing.assert_array_equal(v, merged[k])  # an ordinary f32 checkpoint of the merged weights
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 32), 0, 256))
    run = jax.jit(lambda p: Llama(model_config).apply({"params": p}, tokens))
    prog = program_of(config)  # the adapter model as training computes it: merged inside the eval step
    batch = {"inputs": np.tile(tokens[:, :-1], (4, 1)), "targets": np.tile(tokens[:, 1:], (4, 1))}
    state = prog.init_state(0).replace(
        params=adapters_at(straight, STEPS),
        base=checkpoint.restore_params(trained_tiny_workdir, prog.abstract_state.base))
    sums = jax.device_get(prog.eval_step(prog.eval_params(state), prog.shard_batch(batch)))
    logits = np.asarray(jax.jit(lambda p: Llama(hf_config).apply({"params": p}, tokens[:, :-1]))(hf_params))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = (lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]).sum() * 4
    np.testing.assert_allclose(sums["nll_sum"], nll, rtol=1e-5)
    np.testing.assert_array_equal(run(params), run(jax.tree.map(jax.numpy.asarray, hf_params)))


@pytest.mark.slow
def test_a_bf16_base_from_an_f32_workdir(trained_tiny_workdir, tmp_path):
    """lora.base_dtype=bfloat16 on an f32 base: restored in the saved dtype, checksums verified, then cast."""
    config = lora_config(trained_tiny_workdir, num_steps=2, checkpoint_every=0)
    config.lora.base_dtype = "bfloat16"
    prog = program_of(config)
    f32 = checkpoint.restore_params(trained_tiny_workdir, param_shapes(prog.model_config))
    bf16 = checkpoint.restore_params(trained_tiny_workdir, prog.abstract_state.base)
    for x, y in zip(jax.tree.leaves(bf16), jax.tree.leaves(f32)):
        assert x.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jax.numpy.bfloat16)))
    train(Experiment.from_config(config), tmp_path)
    assert read_base_ref(tmp_path).fingerprint == fingerprint(bf16)
    _, params, _, _ = load_workdir(tmp_path)  # merged in f32 (model.param_dtype) onto the bf16 base
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params["lm_head"]["kernel"], bf16["lm_head"]["kernel"].astype(np.float32))


@pytest.mark.slow
def test_train_also_params_are_checkpointed_resumed_and_merged_into_the_export(trained_tiny_workdir, tmp_path):
    """lora.train_also: the embedding and head train from the base's values, live in the adapter checkpoints,
    resume bit-exactly, and are what load_workdir and the HF export hold (the base workdir unchanged)."""
    config = lora_config(trained_tiny_workdir)
    config.lora.train_also = ("^embed/embedding$", "^lm_head/kernel$")
    train(Experiment.from_config(config), tmp_path / "straight")
    train(Experiment.from_config(config), tmp_path / "resumed", extra_hooks=[StopAt(4)])
    assert train(Experiment.from_config(config), tmp_path / "resumed")["step"] == STEPS
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    adapters = leaves(adapters_at(tmp_path / "straight", STEPS))
    for k, v in leaves(adapters_at(tmp_path / "resumed", STEPS)).items():
        np.testing.assert_array_equal(v, adapters[k], err_msg=k)
    base = leaves(checkpoint.restore_params(trained_tiny_workdir, param_shapes(program_of(config).model_config)))
    _, params, _, _ = load_workdir(tmp_path / "straight")
    merged = leaves(params)
    for k in ("embed/embedding", "lm_head/kernel"):
        assert np.abs(adapters[k] - base[k]).max() > 1e-4  # trained away from the base's values
        np.testing.assert_array_equal(merged[k], adapters[k])
    hf.export_from_workdir(tmp_path / "straight", tmp_path / "hf")
    _, hf_params = hf.load_hf_llama(tmp_path / "hf")
    for k, v in leaves(hf_params).items():
        np.testing.assert_array_equal(v, merged[k], err_msg=k)
    assert checkpoint.all_steps(trained_tiny_workdir) == [20]
