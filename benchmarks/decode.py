"""Greedy decoding: our jitted sampler (`sampling.generate`) vs HF `generate`, same weights, and the
memory-bandwidth limit.

    python -m benchmarks.decode                    # small (d384 L6 V1024) and smollm2_135m-shaped, batch 1 and 8
    python -m benchmarks.decode --quick            # smoke run (< 1 min): small model, 32-token prompt, 16 new
    python -m benchmarks.decode --models=small --batches=1 --new_tokens=64

Both sides decode `--new_tokens` tokens after a `--prompt_len`-token random prompt, greedy, f32, with a
KV cache; neither can stop early (ours: eos_id=None; HF: min_new_tokens = max_new_tokens). HF gets
exactly our weights (random, seeded) through `llama_jax.tools.hf.save_hf_llama`. Our compile is excluded
(a warm-up call with the same shapes first). tokens/s = batch * new_tokens / wall time of the whole call
(prefill included), best of --repeats.

The bandwidth limit at batch 1: every new token reads every matmul weight once (blocks + LM head, f32),
so limit tok/s = read bandwidth / weight bytes, with the read bandwidth of a jitted jnp.sum over a
512 MB f32 array measured in the same run. (KV-cache reads are left out of the limit: at 384 slots they
are < 2% of the weight bytes.) The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from benchmarks import common
from llama_jax.inference import sampling


def time_ours(cfg, params, prompts, new_tokens: int, repeats: int):
    def call():
        return sampling.generate(params, cfg, prompts, max_new_tokens=new_tokens, eos_id=None)

    t = time.perf_counter()
    out = call()  # compile + first run
    first = time.perf_counter() - t
    times = common.timeit(call, repeats, warmup=0)
    assert all(len(r) == new_tokens for r in out), "ours stopped early"
    return min(times), first, np.array(out)


def time_hf(model, prompts, new_tokens: int, repeats: int):
    torch = common.setup_torch()
    ids = torch.tensor(np.array(prompts, np.int64))
    attn = torch.ones_like(ids)

    def call(n=new_tokens):
        with torch.no_grad():
            return model.generate(
                input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
            )

    call(4)  # warm-up (first-call setup), untimed as our compile is
    out = None
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    gen = out[:, ids.shape[1]:].numpy()
    assert gen.shape[1] == new_tokens, f"HF generated {gen.shape[1]} tokens, not {new_tokens}"
    return min(times), gen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,smollm2_135m", help="comma list of: small, smollm2_135m")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per side (best reported)")
    p.add_argument("--hf_attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--quick", action="store_true", help="smoke run: small model, batch 1 and 2, 32+16 tokens")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.batches, a.prompt_len, a.new_tokens, a.repeats = "small", "1,2", 32, 16, 1

    common.setup_torch()
    info = common.machine()
    print(f"machine: {info}")
    bw = common.read_bandwidth()
    print(f"read bandwidth (jitted jnp.sum over 512 MB f32, best of 10): {bw / 1e9:.1f} GB/s")
    configs = {"small": common.small_decode_config, "smollm2_135m": common.smollm2_config}
    rows, figures = [], {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    for name in a.models.split(","):
        cfg = configs[name]()
        params = common.random_params(cfg, seed=0)
        hf = common.hf_model(cfg, params, a.hf_attn)
        hf.eval()
        weight_bytes = 4 * cfg.matmul_param_count()
        limit = bw / weight_bytes
        print(f"\n{name}: {cfg.param_count() / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB of matmul weights "
              f"read per step -> batch-1 limit {limit:.1f} tok/s")
        for batch in map(int, a.batches.split(",")):
            rng = np.random.default_rng(batch)
            prompts = rng.integers(1, cfg.vocab_size, size=(batch, a.prompt_len)).tolist()
            ours_s, first_s, ours_out = time_ours(cfg, params, prompts, a.new_tokens, a.repeats)
            hf_s, hf_out = time_hf(hf, prompts, a.new_tokens, a.repeats)
            ntok = batch * a.new_tokens
            ours_tps, hf_tps = ntok / ours_s, ntok / hf_s
            agree = float(np.mean(ours_out == hf_out))
            pct = 100 * ours_tps / limit if batch == 1 else float("nan")
            rows.append([name, batch, ours_tps, hf_tps, ours_tps / hf_tps, pct, first_s - ours_s, agree])
            key = f"{name}_b{batch}"
            figures[f"{key}_ours_tokens_per_sec"] = ours_tps
            figures[f"{key}_peer_tokens_per_sec"] = hf_tps
            figures[f"{key}_ratio"] = ours_tps / hf_tps
            if batch == 1:
                figures[f"{name}_bandwidth_limit_tokens_per_sec"] = limit
                figures[f"{name}_b1_pct_of_limit"] = pct
            print(f"  batch {batch}: ours {ours_tps:.1f} tok/s, HF {hf_tps:.1f} tok/s, {ours_tps / hf_tps:.2f}x, "
                  f"same greedy tokens {100 * agree:.0f}%", flush=True)
        del hf, params

    print()
    common.print_table(
        rows,
        ["model", "batch", "ours tok/s", "HF tok/s", "ours/HF", "% of bw limit", "our compile s", "same tokens"],
    )
    figures["read_bandwidth_gbs"] = bw / 1e9
    figures["load_1min_at_start"] = info["load_1min_at_start"]
    common.emit_json(figures)


if __name__ == "__main__":
    main()
