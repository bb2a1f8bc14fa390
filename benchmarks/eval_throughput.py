"""Forward-only throughput: our eval step (what eval_ppl runs) vs HF forward under torch.no_grad.

    python -m benchmarks.eval_throughput            # reference config: d512 L8 h8 ffn1408 V4096, 16x256
    python -m benchmarks.eval_throughput --quick    # smoke run (< 1 min)

Ours: `TrainProgram.eval_step` (jitted; logits + summed cross-entropy), one-CPU-device mesh, f32. Peer:
`LlamaForCausalLM` forward + cross-entropy under torch.no_grad (f32, sdpa, every core), same weights.
Median of --steps steady calls; compile excluded. MFU against an f32 matmul peak measured in the same
run, with forward FLOPs (config.flops_per_token(training=False)). The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_throughput import build_trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hf_attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer d128 model, batch 4 x 128")
    a = p.parse_args(argv)
    overrides = {}
    if a.quick:
        a.steps, a.batch, a.seq = 3, 4, 128
        overrides = dict(dim=128, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=352, vocab_size=1024)
    cfg = common.reference_config(max_seq_len=max(256, a.seq), **overrides)
    info = common.machine()
    print(f"machine: {info}")
    print(f"model: {cfg.param_count() / 1e6:.1f}M params; batch {a.batch} x seq {a.seq}; f32, forward only")
    batch_np = common.random_batch(cfg, a.batch, a.seq)
    tokens = a.batch * a.seq

    peak = common.matmul_peak()
    trainer = build_trainer(cfg, a.steps)
    params = trainer.init_state(0).params
    batch = trainer.shard_batch(batch_np)
    res = {}

    def ours():
        res["ours"] = jax.block_until_ready(trainer.eval_step(params, batch))

    ours_t = common.summary(common.timeit(ours, a.steps, warmup=2))
    ours_loss = float(res["ours"]["nll_sum"] / res["ours"]["tokens"])

    torch = common.setup_torch()
    model = common.hf_model(cfg, params, a.hf_attn)
    model.eval()
    inputs = torch.from_numpy(batch_np["inputs"].astype(np.int64))
    targets = torch.from_numpy(batch_np["targets"].astype(np.int64))

    def peer():
        with torch.no_grad():
            logits = model(input_ids=inputs).logits
            res["peer"] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1)))

    peer_t = common.summary(common.timeit(peer, a.steps, warmup=2))
    peak = max(peak, common.matmul_peak())

    flops = cfg.flops_per_token(a.seq, training=False)
    ours_tps, peer_tps = tokens / ours_t["median_s"], tokens / peer_t["median_s"]
    print(f"f32 matmul peak: {peak / 1e9:.1f} GFLOP/s; forward FLOPs/token {flops / 1e6:.1f} M")
    common.print_table(
        [
            ["ours (eval_step)", ours_t["median_s"] * 1e3, ours_tps, 100 * ours_tps * flops / peak, ours_loss],
            [f"HF torch no_grad ({a.hf_attn})", peer_t["median_s"] * 1e3, peer_tps, 100 * peer_tps * flops / peak,
             res["peer"]],
        ],
        ["forward", "median ms", "tokens/s", "MFU %", "loss"],
    )
    print(f"ours / HF: {ours_tps / peer_tps:.2f}x")
    common.emit_json({
        "ours_tokens_per_sec": ours_tps,
        "peer_tokens_per_sec": peer_tps,
        "ratio": ours_tps / peer_tps,
        "mfu": ours_tps * flops / peak,
        "peer_mfu": peer_tps * flops / peak,
        "ours_loss": ours_loss,
        "peer_loss": res["peer"],
        "matmul_peak_gflops": peak / 1e9,
        "load_1min_at_start": info["load_1min_at_start"],
    })


if __name__ == "__main__":
    main()
