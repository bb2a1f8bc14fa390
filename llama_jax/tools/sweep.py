"""Ablation sweeps: expand a grid of config overrides x seeds, run or print it, and report the results.

    --sweep='model.norm=rmsnorm,layernorm' --sweep='model.num_kv_heads=1,4' --seeds=2

is 2 x 2 variants x 2 seeds = 8 runs, each an ordinary `experiments.train` command with its own workdir
(WORKDIR/<variant>/seed<k>), so a sweep is resumable run by run and every run can be inspected alone.
The report is a markdown table of final held-out loss and bits-per-byte (mean ± std over seeds) and a PNG
of eval loss against step for every variant.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from llama_jax.errors import SweepError
from llama_jax.train.metrics import read_metrics


def parse_sweeps(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """'field=v1,v2' -> (field, [v1, v2]); a field may appear once."""
    axes = []
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*=\s*(.+)", spec)
        if not m:
            raise SweepError(f"--sweep={spec!r} is not of the form 'field=value1,value2' (e.g. model.norm=rmsnorm,layernorm).")
        field, values = m.group(1), [v.strip() for v in m.group(2).split(",") if v.strip()]
        if field in (a for a, _ in axes):
            raise SweepError(f"{field} is swept twice; give all its values in one --sweep.")
        if not values:
            raise SweepError(f"--sweep={spec!r} lists no values.")
        axes.append((field, values))
    return axes


def expand(axes: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """The full grid, in the order the --sweep flags were given (the last varies fastest)."""
    fields = [f for f, _ in axes]
    return [dict(zip(fields, combo)) for combo in itertools.product(*(v for _, v in axes))]


def variant_name(overrides: dict[str, str]) -> str:
    """A directory-safe name: 'model.norm-layernorm__model.num_kv_heads-1' ('base' when empty)."""
    if not overrides:
        return "base"
    return "__".join(f"{k}-{re.sub(r'[^A-Za-z0-9_.+-]', '_', v)}" for k, v in overrides.items())


def run_dir(workdir: str, overrides: dict[str, str], seed: int) -> str:
    return os.path.join(workdir, variant_name(overrides), f"seed{seed}")


def commands(config_path: str, workdir: str, variants: Sequence[dict[str, str]], seeds: Sequence[int],
             fixed: Sequence[str] = ()) -> list[list[str]]:
    """One `python -m experiments.train` argv per (variant, seed)."""
    out = []
    for overrides in variants:
        for seed in seeds:
            argv = [sys.executable, "-m", "experiments.train", f"--config={config_path}",
                    f"--workdir={run_dir(workdir, overrides, seed)}", f"--config.seed={seed}"]
            argv += [f"--config.{o}" for o in fixed]
            argv += [f"--config.{k}={v}" for k, v in overrides.items()]
            out.append(argv)
    return out


def run_local(argvs: Sequence[Sequence[str]]) -> None:
    """Run one after another; a failed run stops the sweep (its workdir resumes on the next attempt)."""
    for i, argv in enumerate(argvs):
        print(f"[{i + 1}/{len(argvs)}] {shlex.join(argv)}", flush=True)
        subprocess.run(argv, check=True)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def collect(workdir: str, variants: Sequence[dict[str, str]], seeds: Sequence[int]) -> list[dict]:
    """Per variant: final eval loss / bits-per-byte per seed, and the eval curves."""
    rows = []
    for overrides in variants:
        finals, curves = [], []
        for seed in seeds:
            path = run_dir(workdir, overrides, seed)
            if not os.path.exists(os.path.join(path, "metrics.jsonl")):
                raise SweepError(f"{path}/metrics.jsonl is missing: that run has not finished. Run the sweep again.")
            evals = [r for r in read_metrics(path) if "eval/loss" in r]
            if not evals:
                raise SweepError(f"{path} logged no evaluation; set config.eval_every > 0.")
            finals.append(evals[-1])
            curves.append([(r["step"], r["eval/loss"]) for r in evals])
        rows.append({
            "variant": variant_name(overrides),
            "overrides": overrides,
            "loss": _mean_std([f["eval/loss"] for f in finals]),
            "bits_per_byte": _mean_std([f["eval/bits_per_byte"] for f in finals]),
            "step": finals[0]["step"],
            "seeds": len(seeds),
            "curves": curves,
        })
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    fields = list(rows[0]["overrides"]) if rows else []
    head = "| " + " | ".join(fields + ["step", "seeds", "eval loss (nats/token)", "bits/byte"]) + " |"
    sep = "|" + "---|" * (len(fields) + 4)
    lines = [head, sep]
    best = min(r["bits_per_byte"][0] for r in rows) if rows else None
    for r in rows:
        bpb = f"{r['bits_per_byte'][0]:.4f} ± {r['bits_per_byte'][1]:.4f}"
        if r["bits_per_byte"][0] == best:
            bpb = f"**{bpb}**"
        cells = [r["overrides"][f] for f in fields] + [
            str(r["step"]), str(r["seeds"]), f"{r['loss'][0]:.4f} ± {r['loss'][1]:.4f}", bpb
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        steps = [s for s, _ in r["curves"][0]]
        n = min(len(c) for c in r["curves"])
        mean = [sum(c[i][1] for c in r["curves"]) / len(r["curves"]) for i in range(n)]
        ax.plot(steps[:n], mean, marker="o", label=r["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/token, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir: str, variants: Sequence[dict[str, str]], seeds: Sequence[int]) -> tuple[str, str]:
    """Write WORKDIR/sweep.md and WORKDIR/sweep.png; returns their paths."""
    rows = collect(workdir, variants, seeds)
    md, png = os.path.join(workdir, "sweep.md"), os.path.join(workdir, "sweep.png")
    with open(md, "w") as f:
        f.write(markdown_table(rows))
    plot(rows, png)
    return md, png
