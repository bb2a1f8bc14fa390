"""Two emulated hosts (processes on 127.0.0.1, 4 CPU devices each, gloo) == one 8-device process.

The workers (tests/train/multihost_worker.py) train 3 steps on a (2, 2, 2) mesh, so every mesh axis crosses
or stays within a "host": data spans the two processes, fsdp and tensor stay inside each. Their losses
must equal this process's run of the same code on its 8 devices.
"""

import math

import pytest

from tests.helpers import REPO, load_module, program_of, run_two_processes

WORKER = REPO / "tests" / "train" / "multihost_worker.py"
TIMEOUT_S = 180


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    worker = load_module(WORKER)
    # The reference, in this process on its 8 devices, while the workers compile.
    reference, results, duration = run_two_processes(
        WORKER, [], tmp_path, TIMEOUT_S, lambda: worker.run(program_of(worker.config()), slice(0, worker.GLOBAL_BATCH)))

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
