"""A real training run of a GPU config for a few hundred steps: tokens/s, MFU, peak device memory, and the
attention kernel the compiled step calls.

    python -m benchmarks.gpu_train --config=configs/llama3_2_1b_gpu.py --steps=300 \
        --config.data.train_files=train.txt --config.data.eval_files=eval.txt --config.data.tokenizer=byte

It runs `llama_jax.train.train`, the loop `experiments.train` runs (the same data pipeline, train step,
logger, tokens/s and MFU), from random weights in a temporary workdir, and stops after --steps steps
without a checkpoint (the config's num_steps, and so its lr schedule, are kept). Two hooks are added: one
reads the device's memory_stats() at every log step, one stops the run. With --dump_hlo the compiled train
step is dumped (XLA_FLAGS --xla_dump_to) and its cuDNN custom calls are counted: the proof of which
attention kernel ran. Figures are the median over the logged intervals after the first (which includes
compilation). MFU is the logger's: model FLOPs (ModelConfig.flops_per_token, causal-halved attention) x
tokens/s over the chip's dense bf16 peak (llama_jax/train/metrics.py PEAK_FLOPS). The last line is JSON.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax import sharding
from llama_jax.experiment import Experiment
from llama_jax.model import for_platform
from llama_jax.train import hooks, read_metrics, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama3_2_1b_gpu.py", "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 300, "Train this many steps, then stop (no checkpoint is written).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Workdir (default: a new temporary directory).")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", "", "Dump the train step's HLO here and count its cuDNN calls.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON result to this file.")

CUDNN_CALL = re.compile(r'custom_call_target="(__cudnn\$[A-Za-z0-9_$]+)"')


class DeviceMemory(hooks.Hook):
    """memory_stats() of every local device at each log step (backends without it report nothing)."""

    def __init__(self, every: int):
        self.every, self.rows = every, []

    def __call__(self, run: hooks.Run) -> None:
        import jax

        stats = [d.memory_stats() or {} for d in jax.local_devices()]
        keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
        row = {k: max(s.get(k, 0) for s in stats) for k in keys}
        self.rows.append({"step": run.done, **row})
        print(f"device memory at step {run.done}: peak {row['peak_bytes_in_use'] / 2**30:.2f} GiB, in use "
              f"{row['bytes_in_use'] / 2**30:.2f} GiB, limit {row['bytes_limit'] / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)


class StopAfter(hooks.Hook):
    """Ends the loop after `steps` steps (it runs after the logger, so that step is logged)."""

    def __init__(self, steps: int):
        self.every = steps

    def __call__(self, run: hooks.Run) -> None:
        run.stop = True


def versions() -> dict:
    import jax
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            out["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
            out["cudnn"] = cuda_versions.cudnn_get_version()
            out["cuda_driver"] = cuda_versions.cuda_driver_get_version()
    except Exception as e:
        out["cuda_versions_error"] = repr(e)
    return out


def cudnn_calls(dump_dir: str) -> dict:
    """The cuDNN custom-call targets in the train step's HLO as jax emitted it and as XLA compiled it."""
    out = {}
    for stage in ("before_optimizations", "after_optimizations"):
        files = sorted(glob.glob(os.path.join(dump_dir, f"*jit_train_step*{stage}.txt")))
        counts: dict[str, int] = {}
        for path in files:
            with open(path) as f:
                for target in CUDNN_CALL.findall(f.read()):
                    counts[target] = counts.get(target, 0) + 1
        out[f"hlo_{stage}"] = {"files": [os.path.basename(p) for p in files], "cudnn_custom_calls": counts}
    return out


def main(argv):
    del argv
    cli.quiet_logs()
    if _DUMP_HLO.value:  # read when the backend starts, which is below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP_HLO.value}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*").strip()
    import jax

    exp = Experiment.from_config(_CONFIG.value)
    loop = exp.loop
    platform = sharding.mesh_platform(sharding.make_mesh(exp.mesh))
    impl = for_platform(exp.model, platform).attention_impl
    device = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {device.device_kind} ({platform}); attention_impl "
          f"{exp.model.attention_impl!r} -> {impl!r}; {versions()}", flush=True)
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="gpu_train_")
    memory = DeviceMemory(loop.log_every)
    train(exp, workdir, extra_hooks=[memory, StopAfter(_STEPS.value)])

    rows = [r for r in read_metrics(workdir) if "train/tokens_per_sec" in r]
    steady = rows[1:] or rows
    tps = statistics.median(r["train/tokens_per_sec"] for r in steady)
    tokens_per_step = loop.batch_size * loop.seq_len
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        **versions(),
        "attention_impl": impl,
        "params": exp.model.param_count(),
        "batch_size": loop.batch_size,
        "seq_len": loop.seq_len,
        "remat_policy": exp.model.remat_policy,
        "dtype": exp.model.dtype,
        "steps": rows[-1]["step"] if rows else 0,
        "intervals_used": len(steady),
        "first_interval_s": rows[0]["step"] * tokens_per_step / rows[0]["train/tokens_per_sec"],
        "tokens_per_sec": tps,
        "tokens_per_sec_range": [min(r["train/tokens_per_sec"] for r in steady),
                                 max(r["train/tokens_per_sec"] for r in steady)],
        "step_time_s": tokens_per_step / tps,
        "mfu": statistics.median(r["train/mfu"] for r in steady),
        "flops_per_token": exp.model.flops_per_token(loop.seq_len),
        "peak_bytes_in_use": max((m["peak_bytes_in_use"] for m in memory.rows), default=None),
        "bytes_limit": max((m["bytes_limit"] for m in memory.rows), default=None),
        "final_loss": rows[-1].get("train/loss") if rows else None,
    }
    if _DUMP_HLO.value:
        result.update(cudnn_calls(_DUMP_HLO.value))
    for r in rows:
        print(f"step {r['step']:>5}: loss {r['train/loss']:.4f}  {r['train/tokens_per_sec']:,.0f} tok/s  "
              f"mfu {r['train/mfu']:.1%}")
    print(json.dumps(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
