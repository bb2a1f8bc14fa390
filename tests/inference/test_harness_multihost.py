"""lm_eval on two emulated hosts (processes on 127.0.0.1, 4 CPU devices each, gloo) == one 8-device process:
process 0 drives lm_eval, process 1 follows every scoring step and generation (harness_worker.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO
from tests.train.test_multihost import free_port

WORKER = REPO / "tests" / "inference" / "harness_worker.py"
TIMEOUT_S = 600


@pytest.mark.slow
def test_two_processes_score_as_one(hf_tiny_workdir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("harness_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4-device flag
    port = free_port()
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    start = time.monotonic()
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:  # files, not pipes: a full pipe would block a worker
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), f"--port={port}", f"--process_id={i}", f"--workdir={hf_tiny_workdir}"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        reference = worker.mesh_and_run(str(hf_tiny_workdir))  # this process, its 8 devices, while they run
        for p in procs:
            try:
                p.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"--- process {i}:\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
                pytest.fail(f"two-process run did not finish within {TIMEOUT_S}s; output:\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        text = log.read_text()
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-5000:]}"
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        assert len(lines) == 1, f"process {i} printed no RESULT line:\n{text[-5000:]}"
        results.append(json.loads(lines[0].removeprefix("RESULT ")))
    assert [r["process"] for r in results] == [0, 1] and results[1]["metrics"] == {}
    got = results[0]["metrics"]
    assert sorted(got) == sorted(reference) and "lm_eval/llama_jax_tiny_gen/exact_match" in got
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
