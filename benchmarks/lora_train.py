"""LoRA vs full fine-tuning of the same model: train step tokens/s, compiled matmul FLOPs and peak memory.

    python -m benchmarks.lora_train            # reference config: d512 L8 h8 ffn1408 V4096, 16x256, rank 16
    python -m benchmarks.lora_train --quick    # smoke run (< 1 min)

Both sides are `TrainProgram.build` on one CPU device, f32, AdamW, from the same init. LoRA adapts every
attention and MLP projection (rank --rank, f32 base unless --base_dtype) and trains low-rank
(x @ W + s * (x @ A) @ B: no dense weight gradient, none for the frozen base). The two steps are timed in
alternating rounds of --steps, so both see the same machine load; tokens/s is the median. Peak memory is
the compiled step's (arguments + outputs + temporaries - aliased, from memory_analysis); compiled matmul
FLOPs from the HLO (llama_jax.tools.hlo), beside the model's 6N and LoRA's 4N + 6 x adapters. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks import common
from llama_jax import lora, sharding
from llama_jax.tools import hlo
from llama_jax.train import OptimizerConfig, TrainProgram, make_optimizer

TARGETS = (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")


def build(cfg, lora_cfg: lora.LoraConfig | None, batch_np) -> dict:
    tx = make_optimizer(OptimizerConfig(warmup_steps=0, schedule="constant"), total_steps=1000)
    prog = TrainProgram.build(cfg, common.one_device_mesh(), sharding.resolve_rules(sharding.ShardingConfig()), tx,
                              lora=lora_cfg)
    state, batch = prog.init_state(0), prog.shard_batch(batch_np)
    compiled = prog.train_step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)
        return metrics

    return {"step": step, "peak": peak, "temp": m.temp_size_in_bytes,
            "matmul_flops": hlo.analyze(compiled.as_text()).matmul_flops}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (full, LoRA, full, ...)")
    common.add_reference_args(p)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--base_dtype", default="", choices=lora.config.BASE_DTYPES, help="LoRA's frozen base dtype")
    p.add_argument("--quick", action="store_true", help="smoke run: a 2-layer d128 model, batch 4")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.rounds = 3, 1
    cfg = common.reference_config_of(a)
    lora_cfg = lora.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, targets=TARGETS, base_dtype=a.base_dtype)
    print(f"machine: {common.machine()}")
    print(f"model: {cfg.param_count() / 1e6:.1f}M params d{cfg.dim} L{cfg.num_layers} ffn{cfg.ffn_dim} "
          f"V{cfg.vocab_size}; batch {a.batch} x seq {a.seq}; f32, AdamW; LoRA rank {a.rank} on every projection")
    batch_np = common.random_batch(cfg, a.batch, a.seq)
    sides = {"full fine-tune": build(cfg, None, batch_np), "LoRA": build(cfg, lora_cfg, batch_np)}
    times = {k: [] for k in sides}
    for _ in range(a.rounds):
        for name, side in sides.items():
            times[name] += common.timeit(side["step"], a.steps, warmup=1)
    tokens = a.batch * a.seq
    n, adapters = cfg.matmul_param_count(), lora.adapter_param_count(lora_cfg, cfg)
    model_flops = {"full fine-tune": 6 * n, "LoRA": 4 * n + 6 * adapters}  # per token, matmuls only
    rows, figures = [], {}
    for name, side in sides.items():
        s = common.summary(times[name])
        tps = tokens / s["median_s"]
        flops_tok = side["matmul_flops"] / tokens
        rows.append([name, s["median_s"] * 1e3, tps, flops_tok / 1e6, flops_tok / (6 * n), model_flops[name] / 1e6,
                     side["peak"] / 2**20])
        key = "full" if name == "full fine-tune" else "lora"
        figures.update({f"{key}_tokens_per_sec": tps, f"{key}_peak_mib": side["peak"] / 2**20,
                        f"{key}_compiled_mflop_per_token": flops_tok / 1e6})
    common.print_table(rows, ["train step", "median ms", "tokens/s", "compiled MFLOP/tok", "x 6N",
                              "model MFLOP/tok", "peak MiB"])
    ratio = figures["lora_tokens_per_sec"] / figures["full_tokens_per_sec"]
    goal = "" if a.quick else "  (goal on CPU >= 1.3x)"
    print(f"LoRA / full tokens/s: {ratio:.2f}x{goal}; peak memory {figures['lora_peak_mib'] / figures['full_peak_mib']:.2f}x")
    figures.update(ratio=ratio, batch=a.batch, seq=a.seq, rank=a.rank, params_m=cfg.param_count() / 1e6)
    common.emit_json(figures)


if __name__ == "__main__":
    main()
