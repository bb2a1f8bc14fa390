"""Every entry script prints a usage error (a LlamaJaxError) as one line naming the fix, exit status 1, no
traceback; --traceback shows the stack."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_module


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
