"""Shared helpers of the peer benchmarks (train_throughput, eval_throughput, decode, compile_time).

Every benchmark runs ours and the peer (HF transformers' PyTorch LlamaForCausalLM) back to back in one
process, so contention from other jobs on the machine hits both alike; compare ratios, not absolutes,
across runs. Each prints a table and ends with exactly one JSON line of its figures.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import sharding
from llama_jax.model import ModelConfig, init_params, preset
from llama_jax.tools.hf import save_hf_llama
from llama_jax.train.metrics import measure_matmul_peak

# The reference training config (~30M params).
REFERENCE = dict(
    vocab_size=4096, dim=512, num_layers=8, num_heads=8, num_kv_heads=8, ffn_dim=1408, max_seq_len=256
)
# The small decode model.
SMALL_DECODE = dict(
    vocab_size=1024, dim=384, num_layers=6, num_heads=6, num_kv_heads=6, ffn_dim=1024, max_seq_len=512
)


def reference_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**REFERENCE, **overrides})


def add_reference_args(p) -> None:
    """The train benchmarks' model and batch flags, defaulting to the reference config at batch 16 x seq 256."""
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=REFERENCE["dim"])
    p.add_argument("--layers", type=int, default=REFERENCE["num_layers"])
    p.add_argument("--heads", type=int, default=REFERENCE["num_heads"])
    p.add_argument("--ffn", type=int, default=REFERENCE["ffn_dim"])
    p.add_argument("--vocab", type=int, default=REFERENCE["vocab_size"])


def reference_config_of(a) -> ModelConfig:
    """The model those flags name; `--quick` shrinks it to a 2-layer d128 model at batch 4 x seq 128."""
    if a.quick:
        a.batch, a.seq, a.dim, a.layers, a.heads, a.ffn, a.vocab = 4, 128, 128, 2, 4, 352, 1024
    return reference_config(dim=a.dim, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.heads, ffn_dim=a.ffn,
                            vocab_size=a.vocab, max_seq_len=max(a.seq, 256))


def small_decode_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL_DECODE, **overrides})


def smollm2_config(**overrides) -> ModelConfig:
    return preset("smollm2_135m", **overrides)


def one_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def setup_torch():
    """Give PyTorch every core, as XLA's CPU client uses every core by default."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def timeit(fn: Callable[[], object], steps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `steps` calls of fn (which must block until its result is ready), after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "best_s": min(times)}


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """f32 matmul FLOP/s of this host through XLA (best of `repeats`), the MFU denominator."""
    return measure_matmul_peak(n=n, repeats=repeats)


def read_bandwidth(mbytes: int = 512, repeats: int = 10) -> float:
    """Bytes/s of a jitted jnp.sum over a large f32 array (best of `repeats`): the weight-streaming limit."""
    n = mbytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    best = min(timeit(lambda: f(x).block_until_ready(), repeats, warmup=1))
    return n * 4 / best


def random_params(config: ModelConfig, seed: int = 0):
    return init_params(config, jax.random.PRNGKey(seed))


def hf_model(config: ModelConfig, params, attn_implementation: str = "sdpa"):
    """HF LlamaForCausalLM (f32, PyTorch) holding exactly `params`, via llama_jax.tools.hf.save_hf_llama."""
    import torch
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf")
        save_hf_llama(config, jax.device_get(params), out, dtype="float32")
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=attn_implementation)
    return model


def random_batch(config: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_1min_at_start": round(load, 2),
    }


def print_table(rows: list[list[object]], header: list[str]) -> None:
    cells = [[_fmt(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 1:
            return f"{c:.2f}"
        return f"{c:.3g}"
    return str(c)


def emit_json(figures: dict[str, object]) -> None:
    """The last line of every benchmark's output."""

    def clean(v):
        if isinstance(v, float | np.floating):
            return None if not math.isfinite(float(v)) else round(float(v), 4)
        return v

    print(json.dumps({k: clean(v) for k, v in figures.items()}), flush=True)


def synthetic_corpus(path: pathlib.Path, size_mb: float, seed: int = 0) -> None:
    """Random documents of Zipf-distributed pseudo-words with punctuation and line breaks, as .jsonl."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.8
    lengths = rng.integers(1, 11, size=30_000)
    words = np.array(["".join(rng.choice(letters, n, p=freq / freq.sum())) for n in lengths])
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    target = int(size_mb * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            idx = rng.choice(len(words), size=int(rng.integers(200, 4000)), p=p)
            tokens = words[idx].astype(object)
            tokens[rng.random(len(idx)) < 0.08] += ","
            tokens[rng.random(len(idx)) < 0.05] += ".\n"
            text = " ".join(tokens)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(text.encode())
