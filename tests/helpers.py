"""Shared test helpers (importable as `tests.helpers`); pytest fixtures live in conftest.py.

Import it after XLA_FLAGS is set (conftest.py does): it imports jax."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from llama_jax.experiment import Experiment, config_from_file
from llama_jax.train import TrainProgram, train

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def load_config(name: str):
    """`configs/<name>.py`'s get_config() (a fresh ConfigDict each call)."""
    return config_from_file(REPO / "configs" / f"{name}.py")


def run_module(*args: str, timeout: int = 600, env: dict | None = None, check: bool = False):
    """`python -m ARGS...` from the repo root on the CPU; returns the CompletedProcess (text output)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONIOENCODING": "utf-8", **(env or {})}
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       encoding="utf-8", timeout=timeout)
    if check:
        assert r.returncode == 0, f"python -m {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def program_of(config, mesh=None):
    """The TrainProgram of an experiment ConfigDict (optionally on `mesh`), as experiments.train builds it."""
    return TrainProgram.from_experiment(Experiment.from_config(config), mesh)


def train_config(config, workdir):
    """llama_jax.train.train on an experiment ConfigDict, as experiments.train runs it."""
    return train(Experiment.from_config(config), workdir)
