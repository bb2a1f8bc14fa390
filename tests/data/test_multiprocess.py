"""Real processes (jax.distributed on 127.0.0.1, gloo): the global batches of a mixture read from a token cache
that the processes build together are the same for 1, 2 and 4 processes, and a data state saved by 2
processes resumes on 1 with exactly the batches of an uninterrupted run."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.data.test_files import write_shard
from tests.helpers import REPO, free_port

WORKER = REPO / "tests" / "data" / "data_worker.py"


def corpus(d):
    d.mkdir()
    for i in range(5):
        write_shard(d / f"big-{i}.jsonl.zst", [f"big {i}.{j} " + "lorem " * (j % 11) for j in range(25)])
    for i in range(2):
        write_shard(d / f"small-{i}.jsonl.gz", [f"small {i}.{j} " + "ipsum " * (j % 3) for j in range(6)])
    for name in ("big", "small"):
        write_shard(d / f"{name}-eval.jsonl", [f"held out {name}"])


def run(n: int, tmp_path, name: str, start: int, stop: int, cache, state=""):
    out = tmp_path / name
    out.mkdir()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), f"--port={port}", f"--num_processes={n}", f"--process_id={i}",
                          f"--corpus={tmp_path / 'corpus'}", f"--cache={cache}", f"--out={out}", f"--start={start}",
                          f"--stop={stop}", f"--state={state}"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(n)
    ]
    for p in procs:
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, text[-4000:]
    parts = [np.load(out / f"rows-{i}.npz") for i in range(n)]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0].files}, out  # [steps, batch, L]


@pytest.mark.slow
def test_batches_are_the_same_for_1_2_and_4_processes_and_across_a_resume(tmp_path):
    corpus(tmp_path / "corpus")
    # Four processes build the cache together (each its share of the shards), the others reuse it.
    four, _ = run(4, tmp_path, "four", 0, 12, tmp_path / "cache")
    one, _ = run(1, tmp_path, "one", 0, 12, tmp_path / "cache")
    two, _ = run(2, tmp_path, "two", 0, 12, tmp_path / "fresh_cache")  # and two build another from scratch
    for k in one:
        assert np.array_equal(one[k], four[k]) and np.array_equal(one[k], two[k]), k
    assert len({one["inputs"][s].tobytes() for s in range(12)}) == 12  # the steps differ
    # Saved with 2 processes at step 5 (before the stage change at step 6), resumed with 1.
    _, saved = run(2, tmp_path, "first", 0, 5, tmp_path / "cache")
    resumed, _ = run(1, tmp_path, "resumed", 5, 12, tmp_path / "cache", state=str(saved / "state-0.json"))
    for k in one:
        assert np.array_equal(resumed[k], one[k][5:]), k
