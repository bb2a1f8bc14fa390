"""One process of the two-host emulation in test_multihost.py: 4 CPU devices, gloo collectives.

    PYTHONPATH=. python tests/train/multihost_worker.py --port=PORT --process_id={0,1}

Both processes build the same (2, 2, 2) mesh over all 8 devices, each feeds only its own rows of every
global batch (`process_batch_slice` + `shard_batch`), and each prints one line
`RESULT {"process": i, "losses": [...], ...}`. The test runs `config()` / `run()` in its own
8-device process as the reference, so the two paths share every line except the process layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

NUM_STEPS = 3
GLOBAL_BATCH = 8


def config():
    from llama_jax.experiment import base_config

    c = base_config("tiny", num_heads=8, num_kv_heads=4, ffn_dim=128)
    c.batch_size, c.seq_len, c.num_steps = GLOBAL_BATCH, 16, 10
    c.optimizer.warmup_steps = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    return c


def global_batch(step: int) -> dict[str, np.ndarray]:
    """The same global batch on every process; each then keeps only its rows."""
    rng = np.random.default_rng(100 + step)
    tokens = rng.integers(0, 256, (GLOBAL_BATCH, 17)).astype(np.int32)
    mask = (rng.random((GLOBAL_BATCH, 16)) < 0.8).astype(np.float32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask)


def run(trainer, rows: slice) -> dict:
    """NUM_STEPS train steps from seed 0; returns per-step losses and the final param norm."""
    state = trainer.init_state(seed=0)
    losses = []
    for step in range(NUM_STEPS):
        local = {k: v[rows] for k, v in global_batch(step).items()}
        state, metrics = trainer.train_step(state, trainer.shard_batch(local))
        losses.append(float(metrics["loss"]))  # metrics are replicated: readable on every process
    return {"losses": losses, "param_norm": float(metrics["param_norm"]), "step": int(state.step)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    args = parser.parse_args()

    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from llama_jax.distributed import is_main_process, maybe_initialize_distributed
    from tests.helpers import program_of

    start = time.monotonic()
    assert maybe_initialize_distributed(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=2,
        process_id=args.process_id,
        local_device_ids=[0, 1, 2, 3],
    )
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    trainer = program_of(config())
    rows = trainer.process_batch_slice(GLOBAL_BATCH)
    result = run(trainer, rows)
    result.update(
        process=jax.process_index(),
        main=is_main_process(),
        rows=[rows.start, rows.stop],
        seconds=round(time.monotonic() - start, 2),
    )
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
