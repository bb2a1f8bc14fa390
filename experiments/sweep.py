"""Ablation sweeps over config overrides and seeds.

    python -m experiments.sweep --config=configs/ablation_example.py --workdir=runs/abl \
        --sweep='model.norm=rmsnorm,layernorm' --sweep='model.num_kv_heads=1,4' --seeds=2 \
        [--set=num_steps=200] [--mode=local|print|report]

local: run every variant here, one after another, then write WORKDIR/sweep.md and sweep.png.
print: print one launch command per run (paste into your cluster's job launcher), run nothing.
report: only (re)write the report from finished runs.
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
_MODE = flags.DEFINE_enum("mode", "local", ["local", "print", "report"], "What to do with the grid.")


def main(argv):
    variants = sweep.expand(sweep.parse_sweeps(_SWEEP.value))
    seeds = list(range(_SEEDS.value))
    argvs = sweep.commands(_CONFIG.value, _WORKDIR.value, variants, seeds, fixed=_SET.value)
    if _MODE.value == "print":
        for a in argvs:
            print(shlex.join(a))
        return
    if _MODE.value == "local":
        sweep.run_local(argvs)
    md, png = sweep.report(_WORKDIR.value, variants, seeds)
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    cli.run(main)
