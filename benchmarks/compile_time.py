"""Time to first step, scan_layers on vs off, for a deep narrow model.

    python -m benchmarks.compile_time               # 32 layers, d128 ffn352 V1024, batch 4 x seq 128
    python -m benchmarks.compile_time --quick       # smoke run (< 1 min): 8 layers

For each layout a fresh `TrainProgram` (f32, AdamW, one-CPU-device mesh) runs its first train step (trace +
compile + run: the time to first step), then --steps steady steps. compile = first step - median steady
step. The persistent compilation cache is disabled so both compile from scratch. "scanned" here is the
peer: the issue's target is scanned compile <= 25% of unrolled with a step time within 10%. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import common
from benchmarks.train_throughput import build_trainer
from llama_jax.model import ModelConfig
from llama_jax.train import TrainProgram


def measure(cfg: ModelConfig, batch_np, steps: int) -> dict:
    trainer: TrainProgram = build_trainer(cfg, steps)
    state = trainer.init_state(0)
    batch = trainer.shard_batch(batch_np)
    jax.block_until_ready(state)
    holder = {"state": state}

    def step():
        holder["state"], m = trainer.train_step(holder["state"], batch)
        jax.block_until_ready(m)

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    s = common.summary(common.timeit(step, steps, warmup=1))
    return {"first_s": first, "step_s": s["median_s"], "compile_s": first - s["median_s"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 layers, 3 steps")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.steps = 8, 3
    jax.config.update("jax_enable_compilation_cache", False)

    info = common.machine()
    print(f"machine: {info}")
    base = ModelConfig(
        vocab_size=a.vocab, dim=a.dim, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.heads,
        ffn_dim=a.ffn, max_seq_len=max(256, a.seq),
    )
    print(f"model: {base.param_count() / 1e6:.2f}M params, {a.layers} layers d{a.dim} ffn{a.ffn} V{a.vocab}; "
          f"batch {a.batch} x seq {a.seq}")
    batch_np = common.random_batch(base, a.batch, a.seq)
    res = {}
    for scan in (False, True):
        res[scan] = measure(base.replace(scan_layers=scan), batch_np, a.steps)
        print(f"  scan_layers={scan}: {res[scan]}", flush=True)
    un, sc = res[False], res[True]
    common.print_table(
        [
            ["unrolled (scan_layers=False)", un["first_s"], un["compile_s"], un["step_s"] * 1e3],
            ["scanned (scan_layers=True)", sc["first_s"], sc["compile_s"], sc["step_s"] * 1e3],
        ],
        ["layout", "first step s", "compile s", "steady step ms"],
    )
    c_ratio = sc["compile_s"] / un["compile_s"]
    s_ratio = sc["step_s"] / un["step_s"]
    # The targets are for 32 layers; --quick's 8 layers would read as failures.
    compile_goal, step_goal = ("", "") if a.quick else (" (target <= 25%)", " (target within 10%)")
    print(f"scanned/unrolled compile: {100 * c_ratio:.0f}%{compile_goal}; step time: {s_ratio:.2f}x{step_goal}")
    common.emit_json({
        "unrolled_compile_s": un["compile_s"],
        "scanned_compile_s": sc["compile_s"],
        "compile_ratio": c_ratio,
        "unrolled_first_step_s": un["first_s"],
        "scanned_first_step_s": sc["first_s"],
        "unrolled_step_ms": un["step_s"] * 1e3,
        "scanned_step_ms": sc["step_s"] * 1e3,
        "step_ratio": s_ratio,
        "layers": a.layers,
        "load_1min_at_start": info["load_1min_at_start"],
    })


if __name__ == "__main__":
    main()
