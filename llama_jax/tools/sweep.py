"""Ablation sweeps: expand a grid of config overrides x seeds, run or print it, and report the results.

    --sweep='model.norm=rmsnorm,layernorm' --sweep='model.num_kv_heads=1,4' --seeds=2

is 2 x 2 variants x 2 seeds = 8 runs, each an ordinary `experiments.train` command with its own workdir
(WORKDIR/<variant>/seed<k>), so a sweep is resumable run by run and every run can be inspected alone.
The report is a markdown table of final held-out loss and bits-per-byte (mean ± std over seeds) and a PNG
of eval loss against step for every variant. `rank_by` ranks the variants by any metric of metrics.jsonl
(each run's last logged value: `eval/wiki/bits_per_byte`, `eval/mean/bits_per_byte`, `lm_eval/tiny_mc/acc`),
best first by its mean over seeds; see `parse_rank_by` for which way is better.
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


# A metric whose name (its last part, without an lm-eval ",filter" suffix) matches this is better lower
# (losses, perplexities, bits per byte, error rates); any other (accuracy, exact match, F1, ...) higher.
LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|bits_per_byte|bpb|nll|error")


def parse_rank_by(spec: str) -> tuple[str, bool]:
    """'KEY' -> (KEY, higher_is_better) by LOWER_IS_BETTER; '+KEY' says higher is better, '-KEY' lower."""
    spec = spec.strip()
    key = spec[1:] if spec[:1] in "+-" else spec
    if not key:
        raise SweepError(f"--rank_by={spec!r} names no metric; give a metrics.jsonl key, e.g. "
                         "--rank_by=eval/mean/bits_per_byte or --rank_by=+lm_eval/tiny_mc/acc.")
    if spec[:1] in "+-":
        return key, spec[0] == "+"
    return key, not LOWER_IS_BETTER.search(key.rsplit("/", 1)[-1].split(",")[0])


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def collect(workdir: str, variants: Sequence[dict[str, str]], seeds: Sequence[int], rank_by: str = "") -> list[dict]:
    """Per variant: final eval loss / bits-per-byte per seed, the eval curves, and with `rank_by` (a metric
    key) its last value per seed as "rank_metric" (mean, std)."""
    rows = []
    for overrides in variants:
        finals, curves, ranked = [], [], []
        for seed in seeds:
            path = run_dir(workdir, overrides, seed)
            if not os.path.exists(os.path.join(path, "metrics.jsonl")):
                raise SweepError(f"{path}/metrics.jsonl is missing: that run has not finished. Run the sweep again.")
            metrics = read_metrics(path)
            evals = [r for r in metrics if "eval/loss" in r]
            if not evals:
                raise SweepError(f"{path} logged no evaluation; set config.eval_every > 0.")
            finals.append(evals[-1])
            curves.append([(r["step"], r["eval/loss"]) for r in evals])
            if rank_by:
                ranked.append(_last_value(metrics, rank_by, path))
        rows.append({
            "variant": variant_name(overrides),
            "overrides": overrides,
            "loss": _mean_std([f["eval/loss"] for f in finals]),
            "bits_per_byte": _mean_std([f["eval/bits_per_byte"] for f in finals]),
            "step": finals[0]["step"],
            "seeds": len(seeds),
            "curves": curves,
            **({"rank_metric": _mean_std(ranked)} if rank_by else {}),
        })
    return rows


def _last_value(metrics: list[dict], key: str, path: str) -> float:
    """The last value of `key` a run logged (a non-finite one, written as null, is nan)."""
    values = [r[key] for r in metrics if key in r]
    if not values:
        keys = sorted({k for r in metrics for k in r if k.startswith(("eval/", "lm_eval/"))})
        raise SweepError(f"{path}/metrics.jsonl has no {key!r} (--rank_by); it has {keys}.")
    return math.nan if values[-1] is None else float(values[-1])


def ranked(rows: Sequence[dict], higher_is_better: bool) -> list[dict]:
    """`rows` best first by their rank_metric mean over seeds; a nan (a diverged seed) ranks last."""
    def order(r):
        m = r["rank_metric"][0]
        return (math.isnan(m), -m if higher_is_better else m)

    return sorted(rows, key=order)


def markdown_table(rows: Sequence[dict], rank_by: str = "") -> str:
    """The grid's rows in order, best bits/byte in bold; with `rank_by`, ranked best first by that metric
    (mean ± std over seeds, in bold for the best), with the direction in the header."""
    fields = list(rows[0]["overrides"]) if rows else []
    extra = []
    if rank_by:
        key, higher = parse_rank_by(rank_by)
        rows = ranked(rows, higher)
        extra = [f"{key} ({'higher' if higher else 'lower'} is better)"]
    head = ["rank"] * bool(rank_by) + fields + ["step", "seeds", "eval loss (nats/token)", "bits/byte"] + extra
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = min(r["bits_per_byte"][0] for r in rows) if rows else None
    for i, r in enumerate(rows):
        bpb = _cell(r["bits_per_byte"], bold=not rank_by and r["bits_per_byte"][0] == best)
        cells = [r["overrides"][f] for f in fields] + [
            str(r["step"]), str(r["seeds"]), _cell(r["loss"]), bpb
        ]
        if rank_by:
            cells = [str(i + 1), *cells, _cell(r["rank_metric"], bold=i == 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(mean_std: tuple[float, float], bold: bool = False) -> str:
    text = f"{mean_std[0]:.4f} ± {mean_std[1]:.4f}"
    return f"**{text}**" if bold else text


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


def report(workdir: str, variants: Sequence[dict[str, str]], seeds: Sequence[int], rank_by: str = "") -> tuple[str, str]:
    """Write WORKDIR/sweep.md (ranked by the metric `rank_by` names, if any) and WORKDIR/sweep.png; returns
    their paths."""
    key = parse_rank_by(rank_by)[0] if rank_by else ""  # a bad spec fails before any run is read
    rows = collect(workdir, variants, seeds, key)
    md, png = os.path.join(workdir, "sweep.md"), os.path.join(workdir, "sweep.png")
    with open(md, "w") as f:
        f.write(markdown_table(rows, rank_by))
    plot(rows, png)
    return md, png
