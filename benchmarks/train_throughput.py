"""Training throughput: our sharded train step vs HF transformers (PyTorch eager), same model and batch.

    python -m benchmarks.train_throughput                 # reference config: d512 L8 h8 ffn1408 V4096, 16x256
    python -m benchmarks.train_throughput --quick         # smoke run (< 1 min)
    python -m benchmarks.train_throughput --profile       # also: where the time of our step goes

Ours: `TrainProgram.build` (f32, AdamW + global-norm clipping, one-CPU-device mesh), jitted and donated.
Peer: `LlamaForCausalLM` (f32, sdpa attention, eager PyTorch) with torch.optim.AdamW and
clip_grad_norm_, on every core. Both compute the same loss (mean next-token cross-entropy over all
batch*seq targets). Compile and the first steps are excluded; figures are the median of --steps steady
steps (best also shown). MFU = model FLOPs (config.flops_per_token, causal-halved attention) x tokens/s
over an f32 matmul peak measured in the same run. The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from llama_jax import sharding
from llama_jax.train import OptimizerConfig, TrainProgram, make_optimizer

# lr 3e-4 throughout, as the peer's torch.optim.AdamW
OPTIMIZER = OptimizerConfig(warmup_steps=0, schedule="constant")


def build_trainer(cfg, steps: int) -> TrainProgram:
    tx = make_optimizer(OPTIMIZER, total_steps=max(steps, 10) * 10)
    return TrainProgram.build(cfg, common.one_device_mesh(), sharding.resolve_rules(sharding.ShardingConfig()), tx)


def time_ours(cfg, batch_np, steps: int, warmup: int) -> dict:
    trainer = build_trainer(cfg, steps)
    state = trainer.init_state(0)
    init_params = jax.device_get(state.params)  # the peer starts from these (state is donated)
    batch = trainer.shard_batch(batch_np)
    holder = {"state": state}

    def step():
        holder["state"], m = trainer.train_step(holder["state"], batch)
        jax.block_until_ready(m)
        return m

    times = common.timeit(step, steps, warmup=warmup)
    loss = float(step()["loss"])
    return {
        **common.summary(times), "loss": loss, "trainer": trainer, "state": holder["state"], "init_params": init_params,
    }


def time_hf(cfg, params, batch_np, steps: int, warmup: int, attn: str) -> dict:
    torch = common.setup_torch()
    model = common.hf_model(cfg, params, attn)
    model.train()
    opt_cfg = OPTIMIZER
    opt = torch.optim.AdamW(
        model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
    )
    inputs = torch.from_numpy(batch_np["inputs"].astype(np.int64))
    targets = torch.from_numpy(batch_np["targets"].astype(np.int64))
    out = {}

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
        opt.step()
        out["loss"] = float(loss.detach())

    times = common.timeit(step, steps, warmup=warmup)
    return {**common.summary(times), "loss": out["loss"], "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------- profile (our step, by parts)
def profile(cfg, batch_np, steps: int) -> list[list[object]]:
    """Where the time of our train step goes, by timing variants of it in this process.

    full step; attention replaced by identity (out = q: projections, RoPE, o_proj stay); forward+backward
    without the optimizer; forward only (loss); the LM head + cross-entropy alone (fwd+bwd); the
    optimizer alone (clip + AdamW on the param tree).
    """
    from llama_jax.model import Llama, attention, loss_sums

    rows = []

    def med(fn):
        return common.summary(common.timeit(fn, steps, warmup=2))["median_s"]

    full = time_ours(cfg, batch_np, steps, 2)
    t_full = full["median_s"]
    trainer, state = full["trainer"], full["state"]
    params = state.params
    rows.append(["full train step", t_full, 1.0])

    batch = trainer.shard_batch(batch_np)
    model = Llama(cfg)

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["inputs"])
        s = loss_sums(logits, b["targets"], b["loss_mask"])
        return s["nll_sum"] / s["tokens"]

    if True:  # plain jit on the default (single) device
        grad_fn = jax.jit(jax.grad(loss_fn))
        fwd_fn = jax.jit(loss_fn)
        t_fb = med(lambda: jax.block_until_ready(grad_fn(params, batch)))
        t_f = med(lambda: jax.block_until_ready(fwd_fn(params, batch)))

        # Optimizer alone: clip + AdamW update + apply, on gradients of the params' shapes.
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        @jax.jit
        def opt_step(params, opt_state, grads):
            updates, opt_state = trainer.tx.update(grads, opt_state, params)
            return jax.tree.map(jnp.add, params, updates), opt_state

        opt_state = state.opt_state
        t_opt = med(lambda: jax.block_until_ready(opt_step(params, opt_state, grads)))

        # LM head + cross-entropy alone (fwd+bwd) on final hidden states.
        b, s = batch_np["inputs"].shape
        x = jax.random.normal(jax.random.PRNGKey(1), (b, s, cfg.dim), jnp.float32)
        head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"].T

        def head_loss(x, w):
            logits = jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)
            s_ = loss_sums(logits, batch["targets"], batch["loss_mask"])
            return s_["nll_sum"] / s_["tokens"]

        head_fn = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
        t_head = med(lambda: jax.block_until_ready(head_fn(x, head)))

        # Attention replaced by identity (out = q): the difference is the attention core's share.
        orig = attention.causal_attention
        attention.causal_attention = lambda q, k, v, segment_ids: q
        try:
            grad_noattn = jax.jit(jax.grad(loss_fn))
            t_noattn = med(lambda: jax.block_until_ready(grad_noattn(params, batch)))
        finally:
            attention.causal_attention = orig

    rows.append(["forward + backward (no optimizer)", t_fb, t_fb / t_full])
    rows.append(["  forward only (loss)", t_f, t_f / t_full])
    rows.append(["  backward (fwd+bwd - fwd)", t_fb - t_f, (t_fb - t_f) / t_full])
    rows.append(["  attention core, fwd+bwd (fwd+bwd - identity attn)", t_fb - t_noattn, (t_fb - t_noattn) / t_full])
    rows.append(["  LM head + cross-entropy, fwd+bwd (alone)", t_head, t_head / t_full])
    rest = t_fb - (t_fb - t_noattn) - t_head
    rows.append(["  rest: projections, MLP, norms, RoPE, embed (by difference)", rest, rest / t_full])
    rows.append(["optimizer: clip + AdamW (alone)", t_opt, t_opt / t_full])
    rows.append(["step - fwd+bwd (optimizer + step overhead)", t_full - t_fb, (t_full - t_fb) / t_full])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steady steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    common.add_reference_args(p)
    p.add_argument("--hf_attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    p.add_argument("--quick", action="store_true", help="smoke run: a 2-layer d128 model, batch 4, 3 steps")
    p.add_argument("--profile", action="store_true", help="also time the parts of our step")
    p.add_argument("--skip_peer", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = 3, 1
    cfg = common.reference_config_of(a)
    info = common.machine()
    print(f"machine: {info}")
    print(f"model: {cfg.param_count() / 1e6:.1f}M params  d{cfg.dim} L{cfg.num_layers} h{cfg.num_heads} "
          f"ffn{cfg.ffn_dim} V{cfg.vocab_size}; batch {a.batch} x seq {a.seq}; f32, AdamW")
    batch_np = common.random_batch(cfg, a.batch, a.seq)
    tokens = a.batch * a.seq

    peak = common.matmul_peak()
    ours = time_ours(cfg, batch_np, a.steps, a.warmup)
    params = ours["init_params"]
    if not a.skip_peer:
        peer = time_hf(cfg, params, batch_np, a.steps, a.warmup, a.hf_attn)
    else:
        peer = {"median_s": float("nan"), "best_s": float("nan"), "loss": float("nan"), "threads": 0}
    peak_end = common.matmul_peak()
    peak = max(peak, peak_end)

    flops_tok = cfg.flops_per_token(a.seq, training=True)
    ours_tps = tokens / ours["median_s"]
    peer_tps = tokens / peer["median_s"]
    mfu = ours_tps * flops_tok / peak
    peer_mfu = peer_tps * flops_tok / peak
    print(f"f32 matmul peak (XLA, 1024^3, best of 10, max of start/end): {peak / 1e9:.1f} GFLOP/s; "
          f"model FLOPs/token (train): {flops_tok / 1e6:.1f} MFLOP")
    common.print_table(
        [
            ["ours (jax, TrainProgram)", ours["median_s"] * 1e3, ours["best_s"] * 1e3, ours_tps, 100 * mfu, ours["loss"]],
            [f"HF torch ({a.hf_attn}, {peer['threads']} threads)", peer["median_s"] * 1e3, peer["best_s"] * 1e3,
             peer_tps, 100 * peer_mfu, peer["loss"]],
        ],
        ["train step", "median ms", "best ms", "tokens/s", "MFU %", "last loss"],
    )
    ratio = ours_tps / peer_tps
    # The targets are for the reference model; a --quick toy model's figures would read as failures.
    ratio_goal, mfu_goal = ("", "") if a.quick else ("  (target >= 1.3x, goal 1.5x)", " (target >= 50%, goal 60%)")
    print(f"ours / HF tokens/s: {ratio:.2f}x{ratio_goal}; ours MFU {100 * mfu:.1f}%{mfu_goal}")

    figures = {
        "ours_tokens_per_sec": ours_tps,
        "peer_tokens_per_sec": peer_tps,
        "ratio": ratio,
        "mfu": mfu,
        "peer_mfu": peer_mfu,
        "ours_step_ms": ours["median_s"] * 1e3,
        "peer_step_ms": peer["median_s"] * 1e3,
        "matmul_peak_gflops": peak / 1e9,
        "params_m": cfg.param_count() / 1e6,
        "batch": a.batch,
        "seq": a.seq,
        "load_1min_at_start": info["load_1min_at_start"],
    }
    if a.profile:
        del ours
        rows = profile(cfg, batch_np, a.steps)
        print("\nwhere our train step's time goes (median of timed variants; shares of the full step):")
        common.print_table([[r[0], r[1] * 1e3, 100 * r[2]] for r in rows], ["part", "ms", "% of step"])
        by_name = {r[0].strip(): r for r in rows}
        figures["profile_attention_share"] = by_name["attention core, fwd+bwd (fwd+bwd - identity attn)"][2]
        figures["profile_head_ce_share"] = by_name["LM head + cross-entropy, fwd+bwd (alone)"][2]
        figures["profile_optimizer_share"] = by_name["optimizer: clip + AdamW (alone)"][2]
        figures["profile_forward_share"] = by_name["forward only (loss)"][2]
    common.emit_json(figures)


if __name__ == "__main__":
    main()
