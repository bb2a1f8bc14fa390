"""Multi-host start-up: jax.distributed on a pod or a hand-launched cluster, and the main process.

    maybe_initialize_distributed()   # first thing in every entry point, before anything touches a device
    if is_main_process(): ...         # process 0 logs, writes files and prints
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
from absl import logging as absl_logging


def _cluster_detected() -> bool:
    """Whether jax's own cluster auto-detection (TPU pod, SLURM, Open MPI, k8s) sees >1 process."""
    try:
        from jax._src import clusters  # no public API for "would initialize() find a cluster?"
    except ImportError:  # pragma: no cover - layout of a future jax
        return False
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return True
        except Exception:  # a half-configured environment is not a cluster
            continue
    return False


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Start jax.distributed when running as one of several processes; returns whether it did.

    Call it first thing, before anything touches a device. It initializes when:
    - `coordinator_address` / `num_processes` / `process_id` are given (or JAX_COORDINATOR_ADDRESS is
      set): multi-node GPU or any hand-launched cluster, every process with the same address and
      num_processes and its own process_id;
    - or jax's auto-detection finds a multi-process cluster: a multi-host TPU pod slice (v4-32, v5p-…),
      SLURM with several tasks, Open MPI, or a k8s indexed job.
    A single machine (one TPU VM host, one GPU box, a laptop) needs nothing and stays single-process.

    Unset arguments fall back to the environment: JAX_COORDINATOR_ADDRESS (read by jax itself),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS (comma-separated), so a launcher can
    configure every process with env vars alone.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (explicit or os.environ.get("JAX_COORDINATOR_ADDRESS") or _cluster_detected()):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """Process 0 logs, writes summaries and prints; every process runs the same jitted steps."""
    return jax.process_index() == 0


def quiet_non_main_processes() -> None:
    """Raise the log level to WARNING on processes other than 0, so that a pod logs each line once."""
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
        absl_logging.set_verbosity(absl_logging.WARNING)
