"""Shared test helpers (importable as `tests.helpers`); pytest fixtures live in conftest.py.

Import it after XLA_FLAGS is set (conftest.py does): it imports jax."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_module(path: pathlib.Path):
    """A worker script imported as a module, so the test runs the same code in this process."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_processes(worker: pathlib.Path, args: list[str], log_dir: pathlib.Path, timeout_s: float, meanwhile):
    """`python WORKER --port=P --process_id=i ARGS` for processes 0 and 1 (two emulated hosts on 127.0.0.1),
    with `meanwhile()` run in this process while they work. Returns (its result, each process's `RESULT {json}`
    line, wall seconds); a process that fails, hangs or prints no RESULT line fails the test with its output."""
    import pytest

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4-device flag
    port = free_port()
    logs = [log_dir / f"process_{i}.log" for i in range(2)]
    procs = []
    start = time.monotonic()
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:  # files, not pipes: a full pipe would block a worker
                procs.append(subprocess.Popen([sys.executable, str(worker), f"--port={port}", f"--process_id={i}", *args],
                                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        reference = meanwhile()
        for p in procs:
            try:
                p.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"--- process {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
                pytest.fail(f"two-process run did not finish within {timeout_s}s; output:\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    duration = time.monotonic() - start
    results = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        text = log.read_text()
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-5000:]}"
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"process {i} printed no RESULT line:\n{text[-5000:]}"
        results.append(json.loads(lines[0].removeprefix("RESULT ")))
    return reference, results, duration
