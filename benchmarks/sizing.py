"""The README's "what fits where" table, from the planner: each row is one TPU compile of the train step.

    python -m benchmarks.sizing            # ~15 min on 2 CPU cores; prints a markdown table and a JSON line

Rows are the TPU configs as shipped (on the slice each documents) and presets on common slices, at the
batch, sequence length, mesh and remat stated in the row. Peak = arguments + outputs + temporaries -
aliases per chip, as the TPU compiler (libtpu) assigns them; nothing here is arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib

from llama_jax.experiment import Experiment, base_config, config_from_file
from llama_jax.tools import planner

GIB = planner.GIB
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str):
    return config_from_file(CONFIGS / f"{name}.py")


def _preset(name, *, batch, seq, mesh, remat="full", chunk=512, **model):
    c = base_config(name, dtype="bfloat16", remat_policy=remat, scan_layers=True, loss_chunk=chunk, **model)
    c.model.max_seq_len = max(c.model.max_seq_len, seq)
    c.batch_size, c.seq_len = batch, seq
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def rows():
    """(label, experiment config, topology) per table row."""
    return [
        ("configs/llama3_8b_c4_tpu.py", load_config("llama3_8b_c4_tpu"), "v5p-128"),
        ("configs/llama2_7b_c4_tpu.py", load_config("llama2_7b_c4_tpu"), "v4-64"),
        ("llama3_2_1b", _preset("llama3_2_1b", batch=32, seq=4096, mesh=(1, -1, 1)), "v5litepod-8"),
        ("llama3_8b", _preset("llama3_8b", batch=32, seq=8192, mesh=(1, -1, 1)), "v6e-32"),
        ("llama2_13b", _preset("llama2_13b", batch=64, seq=4096, mesh=(1, -1, 1)), "v5p-64"),
        ("llama3_70b", _preset("llama3_70b", batch=128, seq=8192, mesh=(1, -1, 8)), "v5p-512"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    lines = ["| model / config | slice | mesh (data x fsdp x tensor) | batch x seq | remat | peak / HBM per chip "
             "| fits | compiled by, on |", "|---|---|---|---|---|---|---|---|"]
    stamp = f"{planner.compiler_versions()}, {datetime.date.today().isoformat()}"
    results = []
    for label, config, topology in rows():
        if only and label not in only:
            continue
        exp = Experiment.from_config(config)
        report = planner.plan(exp, topology, estimate=False)
        m = report.mesh
        lines.append(
            f"| {label} | {topology} | {m['data']} x {m['fsdp']} x {m['tensor']} | {report.batch_size} x "
            f"{report.seq_len} | {report.remat_policy} | {report.peak_bytes / GIB:.1f} / "
            f"{report.slice.hbm_bytes / GIB:.1f} GiB | {'yes' if report.fits else 'no'} | {stamp} |"
        )
        results.append({"label": label, **dataclasses.asdict(report.slice), **report.to_json()})
        print(lines[-1], flush=True)
    print("\n".join(lines))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
