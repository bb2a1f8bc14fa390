"""Metric sinks (metrics.jsonl, TensorBoard, optionally Weights & Biases) and MFU against a per-backend peak.

Only process 0 writes. Metric names are a contract other tools read: "step", "train/loss", "train/lr",
"train/grad_norm", "train/tokens_per_sec", "train/mfu", "eval/loss", "eval/perplexity",
"eval/bits_per_byte".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

from llama_jax.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run logs on to the same W&B run

# Dense bf16 peak FLOP/s per chip (vendor figures). Matched against jax's device_kind by substring, the
# most specific first.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("V100", 125e12),
)


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """f32 matmul FLOP/s of this host's CPU, best of `repeats` (one XLA matmul uses every core)."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices(backend="cpu")[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops() -> tuple[float, str]:
    """Total peak FLOP/s of all devices of the job, and where the figure came from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        # Emulated CPU devices share the host's cores, so the host's matmul peak is the whole machine.
        source = "measured f32 matmul peak of the CPU host"
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            # Measured while other work ran, the peak is low and the MFU against it too high.
            source += f", under load ({load:.1f} on {cores} cores): MFU reads high"
            logging.getLogger(__name__).warning(
                "the CPU is busy (1-minute load %.1f on %d cores): the matmul peak measured now is low, so "
                "train/mfu will read high; compare MFU only between runs on a quiet machine.", load, cores
            )
        return measure_matmul_peak() * jax.process_count(), source
    for name, flops in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops * jax.device_count(), f"{name} bf16 peak x {jax.device_count()} devices"
    return math.nan, f"unknown device kind {device.device_kind!r}: MFU not reported"


def import_wandb():
    """The wandb module; it is imported only by a run that logs to W&B (`wandb_project`), so an install
    without the `wandb` extra trains as before."""
    try:
        import wandb
    except ImportError:
        raise ConfigError('wandb_project is set but wandb is not installed: pip install -e ".[wandb]", or leave '
                          "--config.wandb_project empty.") from None
    return wandb


class MetricWriter:
    """Appends one JSON object per call to DIR/metrics.jsonl and mirrors its scalars to TensorBoard and, when
    `wandb_project` is set, to that Weights & Biases project (WANDB_MODE=offline keeps the run on disk)."""

    def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = "",
                 config: dict[str, Any] | None = None):
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            self._wandb = _wandb_run(import_wandb(), workdir, wandb_project, config)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        self._jsonl.write(json_line(row) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float | int)}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


def _wandb_run(wandb, workdir: str, project: str, config: dict[str, Any] | None):
    """A W&B run named after the workdir; its id is kept in the workdir, so a resumed run continues it (W&B
    drops the rows of steps it already holds, those a resumed run recomputes)."""
    id_file = os.path.join(workdir, WANDB_ID_FILE)
    run_id = None
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    run = wandb.init(project=project, id=run_id, name=os.path.basename(os.path.normpath(workdir)),
                     resume="allow", config=config)
    with open(id_file, "w") as f:
        f.write(run.id)
    return run


def _scalar(v):
    v = np.asarray(v)
    return int(v) if v.dtype.kind in "iu" else float(v)


def json_line(row: dict[str, Any]) -> str:
    """`row` as one line of strict JSON: JSON has no NaN or Infinity, so a non-finite float is written as
    null and its key listed under "nonfinite" (json.dumps would write NaN, which other tools reject)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad}
    return json.dumps(row, allow_nan=False)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop metrics.jsonl rows written after the checkpoint a run resumes from: they will be recomputed."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)
