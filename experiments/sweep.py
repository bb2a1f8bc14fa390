"""Ablation sweeps over config overrides and seeds.

    python -m experiments.sweep --config=configs/ablation_example.py --workdir=runs/abl \
        --sweep='model.norm=rmsnorm,layernorm' --sweep='model.num_kv_heads=1,4' --seeds=2 \
        [--set=num_steps=200] [--mode=local|print|report] [--rank_by=eval/mean/bits_per_byte]

local: run every variant here, one after another, then write WORKDIR/sweep.md and sweep.png.
print: print one launch command per run (paste into your cluster's job launcher), run nothing.
report: only (re)write the report from finished runs.
--rank_by=KEY ranks the variants best first by a metrics.jsonl key (each run's last value, mean ± std over
seeds): lower is better for losses, perplexities, bits/byte and errors, higher for anything else (accuracy,
exact match); +KEY forces higher is better, -KEY lower (llama_jax/tools/sweep.py, parse_rank_by).
"""

import shlex

from absl import flags

from experiments import cli
from llama_jax.tools import sweep

_CONFIG = flags.DEFINE_string("config", "configs/ablation_example.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root dir; each run goes to WORKDIR/<variant>/seed<k>.", required=True)
_SWEEP = flags.DEFINE_multi_string("sweep", [], "field=v1,v2,... (repeat for a grid).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per variant (0..N-1).")
_SET = flags.DEFINE_multi_string("set", [], "field=value applied to every run, e.g. num_steps=200.")
_RANK_BY = flags.DEFINE_string(
    "rank_by", "", "Rank variants by this metrics.jsonl key (e.g. eval/wiki/bits_per_byte, lm_eval/tiny_mc/acc); "
    "+KEY: higher is better, -KEY: lower; a bare KEY: lower for loss/perplexity/bits_per_byte/error, else higher."
)
_MODE = flags.DEFINE_enum("mode", "local", ["local", "print", "report"], "What to do with the grid.")


def main(argv):
    variants = sweep.expand(sweep.parse_sweeps(_SWEEP.value))
    seeds = list(range(_SEEDS.value))
    argvs = sweep.commands(_CONFIG.value, _WORKDIR.value, variants, seeds, fixed=_SET.value)
    if _MODE.value == "print":
        for a in argvs:
            print(shlex.join(a))
        return
    if _RANK_BY.value:
        sweep.parse_rank_by(_RANK_BY.value)  # a bad spec fails before the runs, not after them
    if _MODE.value == "local":
        sweep.run_local(argvs)
    md, png = sweep.report(_WORKDIR.value, variants, seeds, rank_by=_RANK_BY.value)
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    cli.run(main)
