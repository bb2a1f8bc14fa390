"""One process of the two-host emulation in test_harness_multihost.py: 4 CPU devices, gloo collectives.

    PYTHONPATH=. python tests/inference/harness_worker.py --port=PORT --process_id={0,1} --workdir=DIR

Both processes load DIR's params onto one mesh over all 8 devices and call run_tasks: process 0 drives
lm_eval, process 1 follows. Each prints one line `RESULT {"process": i, "metrics": {...}}` (process 1's
metrics are empty: it only computes)."""

from __future__ import annotations

import argparse
import json
import os
import sys

TASKS = ["llama_jax_tiny_mc", "llama_jax_tiny_ppl", "llama_jax_tiny_gen"]
LIMIT = 4


def mesh_and_run(workdir: str) -> dict:
    """The tasks' metrics on a data=4 x fsdp=2 mesh of the 8 devices (process 0), {} on a follower."""
    from llama_jax.inference import HarnessLM, inference_mesh, metrics_of, run_tasks

    lm = HarnessLM.from_workdir(workdir, mesh=inference_mesh(data=4, fsdp=2), batch_size=2)
    results = run_tasks(lm, TASKS, limit=LIMIT)
    return {} if results is None else metrics_of(results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from llama_jax.distributed import maybe_initialize_distributed

    assert maybe_initialize_distributed(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                                        process_id=args.process_id, local_device_ids=[0, 1, 2, 3])
    metrics = mesh_and_run(args.workdir)
    print("RESULT " + json.dumps({"process": jax.process_index(), "metrics": metrics}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
