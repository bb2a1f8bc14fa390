"""Every entry script prints a usage error (a LlamaJaxError) as one line naming the fix, exit status 1, no
traceback; --traceback shows the stack."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SHAKESPEARE, run_module


@pytest.mark.parametrize(
    "args, message",
    [
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.optimizer.lr=-1"],
         "train: invalid optimizer: optimizer.lr=-1.0 must be >= 0"),
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.optimizer.lrr=1"],
         'train: no such config field \'lrr\' (in --config.optimizer.lrr). Did you mean "lr" instead of "lrr"?'),
        (["experiments.train", "--config=configs/tiny.py", "--workdir={tmp}/run", "--config.data.manual_dir={tmp}",
          "--config.optimizer.lrr=1"],  # only the unknown flag is named
         "train: no such config field 'lrr' (in --config.optimizer.lrr). Did you mean"),
        (["experiments.sample", "--workdir={tmp}/missing"], "sample: workdir {tmp}/missing does not exist"),
        (["experiments.eval_ppl", "--workdir={tmp}/missing"], "eval_ppl: workdir {tmp}/missing does not exist"),
        (["experiments.convert_hf", "--hf_dir={tmp}/nohf", "--workdir={tmp}/w"], "convert_hf: {tmp}/nohf/config.json"),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else "",
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    r = run_module(*[a.format(tmp=tmp_path) for a in args], timeout=120)
    assert r.returncode == 1, r.stderr
    assert message.format(tmp=tmp_path) in r.stderr
    assert "Traceback" not in r.stderr


def test_traceback_flag_shows_the_stack(tmp_path):
    r = run_module("experiments.sample", f"--workdir={tmp_path}/missing", "--traceback", timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_with_libtpu_and_no_tpu_commands_use_the_cpu_backend_quietly():
    """libtpu 0.0.50+ prints errors about TPU worker hostnames whenever JAX initializes its TPU backend on a
    machine without one; the commands skip that backend there (JAX_PLATFORMS unset, as a user runs them)."""
    pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]') to have a TPU backend to skip")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}

    def python(code: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r

    if python("import jax, os; print(os.environ.get('TPU_SKIP_MDS_QUERY'))").stdout.strip() != "1":
        pytest.skip("a TPU is attached: its backend is the one to use")
    r = python("from experiments import cli\ncli.skip_the_tpu_backend_without_a_tpu()\nimport jax\n"
               "print(jax.config.jax_platforms, jax.devices()[0].platform)")
    assert r.stdout.split() == ["cpu", "cpu"]
    assert "hostname" not in r.stderr and "TPU_ACCELERATOR_TYPE" not in r.stderr


@pytest.mark.slow
def test_a_second_run_of_a_config_loads_the_compiled_train_step_from_the_default_cache(tmp_path):
    """jax's persistent compilation cache is on by default, in ~/.cache/llama_jax/jax_compilation_cache: a
    second run of the same config (here in another workdir, as a sweep's next seed) loads its train step
    instead of compiling it, and trains the same."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:-20000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(text[-20000:], encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    # JAX_LOG_COMPILES logs each cache hit; min compile time 0 stores the step however fast this machine is.
    env |= {"HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def train(workdir: str) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [sys.executable, "-m", "experiments.train", "--config=configs/tiny.py", f"--workdir={tmp_path / workdir}",
             "--config.num_steps=2", "--config.eval_every=0", "--config.checkpoint_every=0",
             f"--config.data.train_files={tmp_path / 'train.txt'}", f"--config.data.eval_files={tmp_path / 'eval.txt'}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    hit = "Persistent compilation cache hit for 'jit_train_step'"
    first = train("run1")
    cache = tmp_path / "home" / ".cache" / "llama_jax" / "jax_compilation_cache"
    assert hit not in first.stderr and any(p.name.startswith("jit_train_step-") for p in cache.iterdir())
    second = train("run2")
    assert hit in second.stderr
    loss = [line.split(",")[0] for line in (first.stdout, second.stdout)]
    assert loss[0] == loss[1] and loss[0].startswith("step 2: train/loss="), loss
