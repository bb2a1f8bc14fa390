"""lm_eval on two emulated hosts (processes on 127.0.0.1, 4 CPU devices each, gloo) == one 8-device process:
process 0 drives lm_eval, process 1 follows every scoring step and generation (harness_worker.py)."""

import pytest

from tests.helpers import REPO, load_module, run_two_processes

WORKER = REPO / "tests" / "inference" / "harness_worker.py"
TIMEOUT_S = 600


@pytest.mark.slow
def test_two_processes_score_as_one(hf_tiny_workdir, tmp_path):
    worker = load_module(WORKER)
    reference, results, _ = run_two_processes(  # the reference: this process, its 8 devices, while they run
        WORKER, [f"--workdir={hf_tiny_workdir}"], tmp_path, TIMEOUT_S, lambda: worker.mesh_and_run(str(hf_tiny_workdir)))
    assert [r["process"] for r in results] == [0, 1] and results[1]["metrics"] == {}
    got = results[0]["metrics"]
    assert sorted(got) == sorted(reference) and "lm_eval/llama_jax_tiny_gen/exact_match" in got
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
