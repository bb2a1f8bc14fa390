"""The training loop end to end: exact resume after SIGKILL/SIGTERM, interrupted saves, resharded restore,
fine-tuning starts, logged metrics, and refusing bad input without touching the workdir."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import checkpoint, errors
from llama_jax.checkpoint import config_diff
from llama_jax.errors import ConfigMismatchError
from llama_jax.experiment import Experiment
from llama_jax.model import Llama, ModelConfig, init_params, param_shapes, preset
from llama_jax.tools import hf
from llama_jax.train import read_metrics, restore_state, save_state, train
from tests.helpers import REPO, load_config, program_of, run_module, train_config

pytestmark = pytest.mark.slow

NUM_STEPS = 12


def _flags(manual_dir, data_dir, **extra):
    flags = {
        "num_steps": NUM_STEPS,
        "checkpoint_every": 4,
        "log_every": 1,
        # Evaluating every step makes each step take a few hundred ms, so a kill lands between steps 8 and 12.
        "eval_every": 1,
        "data.eval_batch_size": 64,
        "data.manual_dir": manual_dir,
        "data.data_dir": data_dir,
        **extra,
    }
    return [f"--config.{k}={v}" for k, v in flags.items()]


def _start(workdir, flags):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONUNBUFFERED="1")
    log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "a")
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _run(workdir, flags, timeout=300):
    proc, log = _start(workdir, flags)
    try:
        assert proc.wait(timeout=timeout) == 0, open(log.name).read()[-3000:]
    finally:
        log.close()
    return open(log.name).read()


def _complete_steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.exists(root) else []


def _train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _final_params(workdir):
    cfg = checkpoint.read_model_config(workdir)
    return checkpoint.restore_params(workdir, param_shapes(cfg), step=NUM_STEPS)


def _assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def data_flags(tfds_manual_dir, tfds_data_dir):
    return str(tfds_manual_dir), str(tfds_data_dir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_flags):
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    _run(workdir, _flags(*data_flags))
    return workdir


def _kill_after_checkpoint(workdir, flags, step, sig):
    proc, log = _start(workdir, flags)
    try:
        deadline = time.time() + 240
        while step not in _complete_steps(workdir):
            assert proc.poll() is None, open(log.name).read()[-3000:]
            assert time.time() < deadline, "timed out waiting for the checkpoint"
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_sigkill_after_step_8_checkpoint_resumes_bit_identically(straight, tmp_path, data_flags):
    workdir = str(tmp_path / "killed")
    flags = _flags(*data_flags)
    assert _kill_after_checkpoint(workdir, flags, 8, signal.SIGKILL) == -signal.SIGKILL
    assert NUM_STEPS not in _complete_steps(workdir), "the run finished before the kill; the test proves nothing"
    out = _run(workdir, flags)
    assert "resuming from the checkpoint at step 8" in out
    want, got = _train_losses(straight), _train_losses(workdir)
    assert sorted(got) == list(range(1, NUM_STEPS + 1))  # rows logged after step 8 by the killed run were dropped
    assert [got[s] for s in range(9, 13)] == [want[s] for s in range(9, 13)]
    _assert_bit_identical(_final_params(workdir), _final_params(straight))


@pytest.mark.parametrize(
    "sig, status, says",
    [
        (signal.SIGTERM, 0, "preempted: saved step {step} to {workdir}"),
        # The first Ctrl-C finishes the step, saves it, and exits 130 with one line (no traceback).
        (signal.SIGINT, 130, "train: interrupted by Ctrl-C: saved step {step} to {workdir}"),
    ],
    ids=["sigterm", "ctrl-c"],
)
def test_sigterm_and_ctrl_c_save_exit_and_resume_bit_identically(straight, tmp_path, data_flags, sig, status, says):
    workdir = str(tmp_path / "stopped")
    flags = _flags(*data_flags)
    assert _kill_after_checkpoint(workdir, flags, 4, sig) == status
    stopped_at = max(_complete_steps(workdir))
    assert 4 <= stopped_at < NUM_STEPS
    log = open(workdir + ".log").read()
    assert says.format(step=stopped_at, workdir=workdir) in log and "Traceback" not in log
    out = _run(workdir, flags)
    assert f"resuming from the checkpoint at step {stopped_at}" in out
    assert _train_losses(workdir) == _train_losses(straight)
    _assert_bit_identical(_final_params(workdir), _final_params(straight))


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path, data_flags):
    """Relaunching while the first run still trains: the second is refused in one line naming the holder and
    writes nothing; the first, stopped later with SIGTERM, has every step logged once and its own config."""
    workdir = str(tmp_path / "shared")
    first, log = _start(workdir, _flags(*data_flags, num_steps=10_000))  # runs until it is stopped
    try:
        deadline = time.time() + 240
        while not _complete_steps(workdir):
            assert first.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.02)
        second = run_module("experiments.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                            *_flags(*data_flags, **{"optimizer.lr": 0.001}), timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused; the test proves nothing"
        assert second.returncode == 1
        assert f"is in use by a training run (pid {first.pid} on " in second.stderr, second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, open(log.name).read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == list(range(1, max(_complete_steps(workdir)) + 1))
    assert checkpoint.read_config(workdir)["optimizer"]["lr"] == 3e-4
    assert not os.path.exists(os.path.join(workdir, "lock.json"))


def test_interrupted_save_is_ignored_and_the_previous_checkpoint_used(straight, tmp_path, data_flags):
    workdir = str(tmp_path / "crashed")
    flags = _flags(*data_flags)
    assert _kill_after_checkpoint(workdir, flags, 8, signal.SIGKILL) == -signal.SIGKILL
    # What a crash between writing step 8 and Orbax's final rename leaves behind.
    root = os.path.join(workdir, "checkpoints")
    os.rename(os.path.join(root, "8"), os.path.join(root, "8.orbax-checkpoint-tmp-1234567"))
    out = _run(workdir, flags)
    assert "ignoring incomplete checkpoint(s) ['8.orbax-checkpoint-tmp-1234567']" in out
    assert "resuming from the checkpoint at step 4" in out
    assert _train_losses(workdir) == _train_losses(straight)
    _assert_bit_identical(_final_params(workdir), _final_params(straight))


def test_logged_metrics_and_bits_per_byte_recomputed(straight, shakespeare_path, tfds_data_dir):
    rows = read_metrics(straight)
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu"):
        assert all(key in r for r in train_rows), key
    assert all(k in eval_rows[-1] for k in ("eval/loss", "eval/perplexity", "eval/bits_per_byte"))
    assert [r["step"] for r in eval_rows] == list(range(1, NUM_STEPS + 1))
    assert all(r["train/tokens_per_sec"] > 0 and 0 < r["train/mfu"] < 1 for r in train_rows)
    assert json.load(open(os.path.join(straight, "config.json")))["num_steps"] == NUM_STEPS
    assert os.listdir(os.path.join(straight, "tensorboard"))

    # Independent recomputation: the byte stream of TFDS's validation split, [BOS] text [EOS], cut into
    # non-overlapping windows of seq_len targets, scored by a plain forward pass with the final params.
    import tensorflow_datasets as tfds

    text = tfds.data_source("tiny_shakespeare", data_dir=str(tfds_data_dir), split="validation")[0]["text"]
    stream = np.array([256, *text, 257], np.int32)
    cfg = checkpoint.read_model_config(straight)
    params = _final_params(straight)
    seq = 64
    nll = 0.0
    forward = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))
    for start in range(0, len(stream) - 1, seq * 32):
        rows_x, rows_y = [], []
        for r in range(start, min(start + seq * 32, len(stream) - 1), seq):
            chunk = stream[r : r + seq + 1]
            pad = seq + 1 - len(chunk)
            rows_x.append(np.pad(chunk[:-1], (0, pad)))
            rows_y.append(np.pad(chunk[1:], (0, pad), constant_values=-1))
        x, y = np.stack(rows_x), np.stack(rows_y)
        logp = jax.nn.log_softmax(forward(params, x), axis=-1)
        picked = np.take_along_axis(np.asarray(logp), np.maximum(y, 0)[..., None], -1)[..., 0]
        nll -= float(np.where(y >= 0, picked, 0.0).astype(np.float64).sum())
    bpb = nll / (len(text) * math.log(2))
    final = eval_rows[-1]
    assert final["eval/bytes"] == len(text) == 55770
    assert final["eval/tokens"] == len(stream) - 1
    assert final["eval/bits_per_byte"] == pytest.approx(bpb, rel=2e-5)
    assert final["eval/loss"] == pytest.approx(nll / (len(stream) - 1), rel=2e-5)
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]), rel=1e-9)


def _config(data_flags, **overrides):
    config = load_config("tiny")
    config.data.manual_dir, config.data.data_dir = data_flags
    config.eval_every = 0
    for k, v in overrides.items():
        target = config
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return config


def test_resume_with_a_different_config_is_refused_and_nothing_is_touched(straight, tmp_path, data_flags):
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight, workdir)
    before = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    config = _config(data_flags, **{"model.num_layers": 3, "optimizer.lr": 0.1, "num_steps": 20})
    config.data.eval_batch_size = 64
    config.eval_every, config.checkpoint_every, config.log_every = 1, 4, 1
    with pytest.raises(ConfigMismatchError) as e:
        train_config(config, workdir)
    msg = str(e.value)
    assert "model.num_layers: 2 -> 3" in msg and "optimizer.lr" in msg and "allow_config_change" in msg
    assert "num_steps" not in msg  # run-control fields may change
    after = {f: os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    assert after == before


def test_config_diff_lists_nested_changes():
    assert config_diff({"a": 1, "m": {"x": 1, "y": [1, 2]}}, {"a": 1, "m": {"x": 2, "y": (1, 2)}, "b": 0}) == [
        "b: '<absent>' -> 0",
        "m.x: 1 -> 2",
    ]


def test_resharded_restore(tmp_path, data_flags):
    """Saved on a (8,1,1) mesh, restored onto (2,2,2): equal values, target shardings."""
    config = _config(data_flags, **{"model.num_heads": 8, "model.num_kv_heads": 4, "model.dim": 128})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 8, 1, 1
    src = program_of(config)
    state = src.init_state(3)
    mngr = checkpoint.manager(str(tmp_path))
    save_state(mngr, state, 5, {"step": 5})
    mngr.wait_until_finished()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    dst = program_of(config)
    restored, data_state = restore_state(mngr, dst.abstract_state, 5)
    mngr.close()
    assert data_state == {"step": 5}
    _assert_bit_identical(restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(dst.state_shardings)):
        assert leaf.sharding == want
    q = restored.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (64, 4, 16)  # [D/fsdp, H/tensor, head_dim]


def test_unreadable_checkpoint_names_the_fix(tmp_path, data_flags):
    config = _config(data_flags)
    trainer = program_of(config)
    mngr = checkpoint.manager(str(tmp_path))
    save_state(mngr, trainer.init_state(0), 4, {"step": 4})
    mngr.wait_until_finished()
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "train_state"):
        for f in files:
            if not f.startswith("_"):
                open(os.path.join(root, f), "wb").write(b"garbage")
    with pytest.raises(errors.CheckpointError, match="4 cannot be read, its files are damaged .*only checkpoint"):
        restore_state(mngr, trainer.abstract_state, 4)
    mngr.close()


def test_init_from_trained_and_hf_imported_workdirs(straight, tmp_path, data_flags):
    # lr 0: the one step applies a zero update, so the saved params are exactly the starting params.
    frozen = {"optimizer.lr": 0.0, "num_steps": 1, "checkpoint_every": 1}

    config = _config(data_flags, init_from=straight, **frozen)
    train_config(config, str(tmp_path / "ft_trained"))
    got = checkpoint.restore_params(str(tmp_path / "ft_trained"), program_of(config).abstract_state.params)
    _assert_bit_identical(got, _final_params(straight))

    hf_cfg = preset("tiny")
    hf_params = init_params(hf_cfg, jax.random.key(7))
    hf.save_hf_llama(hf_cfg, hf_params, str(tmp_path / "hf"))
    hf.import_to_workdir(str(tmp_path / "hf"), str(tmp_path / "imported"))
    imported_cfg = ModelConfig.from_dict(checkpoint.read_config(str(tmp_path / "imported"))["model"])
    config = _config(data_flags, init_from=str(tmp_path / "imported"), **frozen)
    config.model = imported_cfg.to_dict()
    train_config(config, str(tmp_path / "ft_hf"))
    got = checkpoint.restore_params(str(tmp_path / "ft_hf"), program_of(config).abstract_state.params)
    _assert_bit_identical(got, hf_params)

    # The model comes from the source (tests/train/test_init_from.py): an explicit override of a shape is
    # refused, naming it, before the workdir exists.
    config = _config(data_flags, init_from=straight, **{**frozen, "model.ffn_dim": 96})
    with pytest.raises(errors.ConfigError, match=r"--config.model.ffn_dim=96 \(its ffn_dim is 172\) would change"):
        train(Experiment.from_config(config), str(tmp_path / "ft_bad"), explicit={"model.ffn_dim"})
    assert not (tmp_path / "ft_bad").exists()


def test_optax_lr_zero_is_a_no_op_update():
    """Guards the premise of the init_from test: AdamW with lr 0 (decay included) leaves params unchanged."""
    tx = optax.adamw(0.0, weight_decay=0.1)
    p = {"w": jnp.ones(3)}
    u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
    assert float(jnp.abs(u["w"]).max()) == 0.0
