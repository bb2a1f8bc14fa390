"""Llama-3-8B on a v5p-128 slice at seq 8192, planned by the TPU compiler: ours vs MaxText, in one run.

    /tmp/mt/venv/bin/python -m benchmarks.tpu_plan            # all cases, ~1-2 h on 2 CPU cores
    /tmp/mt/venv/bin/python -m benchmarks.tpu_plan --cases=equal

Both sides compile with the same jax/libtpu (MaxText 0.2.5 needs Python 3.12; the venv and its install
are in benchmarks/maxtext_compile.py, plus `pip install -e .` of this repo into it). No TPU is used:
libtpu compiles for 64 abstract v5p chips (tools/tpu.py). Ours is `llama_jax.tools.planner` on the same
model (llama3_8b preset: bf16 compute, f32 params and AdamW moments, scanned layers, splash attention) with
the LM head + loss in 512-token chunks; MaxText is its own `train_compile` of `llama3-8b` with flash
attention (benchmarks/maxtext_compile.py). Cases:
- equal: global batch 256, full remat, on fsdp 16 x tensor 4 and on fsdp 64: peak HBM per chip (the
  compiler's peak, which is what it checks against HBM, and the arguments + outputs + temporaries -
  aliases sum), ours / MaxText; and the step time of both compiled programs by the same yardstick, the HLO
  model (`llama_jax.tools.hlo_cost.cost`: each op at max(FLOPs / peak, bytes / HBM bandwidth), each collective's
  ring traffic over ICI, both attention kernels at the model's attention FLOPs at peak);
- batch: the largest fitting global batch at fsdp 64 for full remat and for the policy that saves every
  projection (ours save_dots, MaxText minimal), both found by `planner.largest_fitting`;
- ours only: the compiled matmul FLOPs against the model's (the recompute overhead) and the compiler's
  time estimate (from unrolled 1- and 2-layer compiles; MaxText's train_compile exposes no such variants).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from benchmarks.maxtext_compile import maxtext_memory
from llama_jax.experiment import Experiment, base_config
from llama_jax.tools import hlo_cost, planner

TOPOLOGY, SEQ, BATCH = "v5p-128", 8192, 256
GIB = planner.GIB
# Ours -> MaxText remat policy with the same saved set (MaxText's minimal also keeps the MLP output).
POLICIES = {"full": "full", "save_dots": "minimal"}


def ours(*, batch: int, fsdp: int, tensor: int, remat: str, estimate: bool = False) -> planner.Report:
    c = base_config("llama3_8b", dtype="bfloat16", remat_policy=remat, scan_layers=True, loss_chunk=512)
    c.batch_size, c.seq_len = batch, SEQ
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, tensor
    return planner.plan(Experiment.from_config(c), TOPOLOGY, estimate=estimate)


def theirs(*, batch: int, fsdp: int, tensor: int, remat: str, hlo_out: str = "") -> dict:
    return maxtext_memory(TOPOLOGY, global_batch=batch, seq_len=SEQ, fsdp=fsdp, tensor=tensor, remat=remat,
                          hlo_out=hlo_out, python=sys.executable)


def maxtext_time(hlo_text: str, ours_report: planner.Report) -> hlo_cost.Cost:
    """MaxText's compiled step timed by the HLO model ours is timed by (one slice: no DCN). Its flash attention
    is a Mosaic kernel whose FLOPs the HLO does not show either: both get the same model's attention FLOPs at
    peak (ours' kernel_s)."""
    t = planner.parse_slice(TOPOLOGY)
    chip = hlo_cost.Chip(t.peak_bf16_flops, t.hbm_bytes_per_s, t.ici_bytes_per_s, t.dcn_bytes_per_s)
    return dataclasses.replace(hlo_cost.cost(hlo_text, chip), kernel_s=ours_report.cost.kernel_s)


def equal_cases(hlo_dir: str) -> list[dict]:
    rows = []
    for fsdp, tensor in ((16, 4), (64, 1)):
        r = ours(batch=BATCH, fsdp=fsdp, tensor=tensor, remat="full", estimate=fsdp == 64)
        path = os.path.join(hlo_dir, f"maxtext_fsdp{fsdp}_tensor{tensor}.hlo")
        m = theirs(batch=BATCH, fsdp=fsdp, tensor=tensor, remat="full", hlo_out=path)
        with open(path) as f:
            mt = maxtext_time(f.read(), r)
        rows.append({
            "mesh": f"fsdp {fsdp} x tensor {tensor}", "ours_peak_gib": r.memory["peak"] / GIB,
            "ours_total_gib": r.memory["total"] / GIB, "maxtext_peak_gib": m["peak_bytes"] / GIB,
            "maxtext_total_gib": m["total_bytes"] / GIB, "peak_ratio": r.memory["peak"] / m["peak_bytes"],
            "total_ratio": r.memory["total"] / m["total_bytes"],
            "ours_recompute": r.matmul_flops / r.model_flops, "ours_estimate_s": r.estimate_s,
            "ours_estimate_mfu": r.mfu, "ours_compile_s": r.compile_s, "maxtext_compile_s": m["compile_s"],
            "ours_hlo_s": r.cost.exposed_s, "maxtext_hlo_s": mt.exposed_s,
            "ours_hlo_overlapped_s": r.cost.overlapped_s, "maxtext_hlo_overlapped_s": mt.overlapped_s,
            "time_ratio": r.cost.exposed_s / mt.exposed_s, "ours_parts": _parts(r.cost), "maxtext_parts": _parts(mt),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _parts(c: hlo_cost.Cost) -> dict:
    return {"compute_s": c.compute_s, "memory_s": c.memory_s, "kernel_s": c.kernel_s, "ici_s": c.ici_s,
            "flops": c.flops, "bytes": c.bytes}


def batch_cases(max_compiles: int) -> list[dict]:
    rows, unit, hbm = [], 64, planner.parse_slice(TOPOLOGY).hbm_bytes
    for policy, their_policy in POLICIES.items():
        def ours_at(k, policy=policy):
            r = ours(batch=k * unit, fsdp=64, tensor=1, remat=policy)
            return r.fits, r.peak_bytes

        def theirs_at(k, their_policy=their_policy):
            m = theirs(batch=k * unit, fsdp=64, tensor=1, remat=their_policy)
            return m["fits"], m["peak_bytes"] or 0

        k_ours, _, exact_ours = planner.largest_fitting(ours_at, hbm, max_compiles)
        k_theirs, _, exact_theirs = planner.largest_fitting(theirs_at, hbm, max_compiles)
        rows.append({"policy": f"{policy} / {their_policy}", "ours_batch": k_ours * unit, "ours_exact": exact_ours,
                     "maxtext_batch": k_theirs * unit, "maxtext_exact": exact_theirs,
                     "batch_ratio": k_ours / k_theirs if k_theirs else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="equal,batch", help="comma-separated: equal, batch")
    p.add_argument("--max_compiles", type=int, default=8, help="per search")
    p.add_argument("--hlo_dir", default="", help="keep MaxText's compiled HLO texts here (default: a temp dir)")
    args = p.parse_args()
    cases = set(args.cases.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        equal = equal_cases(args.hlo_dir or tmp) if "equal" in cases else []
    batch = batch_cases(args.max_compiles) if "batch" in cases else []
    print(f"\nLlama-3-8B, {TOPOLOGY} (64 chips), seq {SEQ}, GiB per chip")
    print("| mesh, remat full, batch 256 | ours peak | MaxText peak | ours/MaxText | ours sum | MaxText sum |")
    print("|---|---|---|---|---|---|")
    for r in equal:
        print(f"| {r['mesh']} | {r['ours_peak_gib']:.2f} | {r['maxtext_peak_gib']:.2f} | {r['peak_ratio']:.2f} | "
              f"{r['ours_total_gib']:.2f} | {r['maxtext_total_gib']:.2f} |")
    if equal:
        print("\nstep time, the HLO model on both compiled programs (estimates, not measurements), seconds")
        print("| mesh, remat full, batch 256 | ours | MaxText | ours/MaxText | ours, every collective overlapped | "
              "MaxText, overlapped |")
        print("|---|---|---|---|---|---|")
        for r in equal:
            print(f"| {r['mesh']} | {r['ours_hlo_s']:.3f} | {r['maxtext_hlo_s']:.3f} | {r['time_ratio']:.3f} | "
                  f"{r['ours_hlo_overlapped_s']:.3f} | {r['maxtext_hlo_overlapped_s']:.3f} |")
    if batch:
        print("\n| remat (ours / MaxText), fsdp 64 | ours largest batch | MaxText largest batch | ratio |")
        print("|---|---|---|---|")
        for r in batch:
            ratio = f"{r['batch_ratio']:.2f}" if r["batch_ratio"] else "-"
            print(f"| {r['policy']} | {r['ours_batch']} | {r['maxtext_batch']} | {ratio} |")
    print(json.dumps({"equal": equal, "batch": batch, "config": dataclasses.asdict(planner.parse_slice(TOPOLOGY))}))


if __name__ == "__main__":
    main()
