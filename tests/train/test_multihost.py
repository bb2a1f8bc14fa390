"""Two emulated hosts (processes on 127.0.0.1, 4 CPU devices each, gloo) == one 8-device process.

The workers (tests/train/multihost_worker.py) train 3 steps on a (2, 2, 2) mesh, so every mesh axis crosses
or stays within a "host": data spans the two processes, fsdp and tensor stay inside each. Their losses
must equal this process's run of the same code on its 8 devices.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, program_of

WORKER = REPO / "tests" / "train" / "multihost_worker.py"
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    worker = load_worker()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4-device flag
    port = free_port()
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    start = time.monotonic()
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:  # files, not pipes: a full pipe would block a worker
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), f"--port={port}", f"--process_id={i}"],
                        stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                    )
                )
        # The reference, in this process on its 8 devices, while the workers compile.
        reference = worker.run(program_of(worker.config()), slice(0, worker.GLOBAL_BATCH))
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
                p.wait()
    duration = time.monotonic() - start

    results = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        text = log.read_text()
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-5000:]}"
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"process {i} printed no RESULT line:\n{text[-5000:]}"
        results.append(json.loads(lines[0][len("RESULT "):]))

    print(
        f"\ntwo-process run: {duration:.1f}s wall (worker-reported {[r['seconds'] for r in results]}s, "
        f"including distributed init and compiles); losses {results[0]['losses']}"
    )
    assert [r["process"] for r in results] == [0, 1]
    assert [r["main"] for r in results] == [True, False]
    assert [r["rows"] for r in results] == [[0, 4], [4, 8]]  # each process fed only its half of the batch
    for r in results:
        assert r["step"] == reference["step"] == worker.NUM_STEPS
        for got, want in zip(r["losses"], reference["losses"], strict=True):
            assert math.isclose(got, want, rel_tol=1e-5), (r["losses"], reference["losses"])
        assert math.isclose(r["param_norm"], reference["param_norm"], rel_tol=1e-5)
    assert reference["losses"][0] != reference["losses"][2]  # the steps trained (distinct batches)
