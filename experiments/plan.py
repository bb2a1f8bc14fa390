"""Will it fit? Compile a config's step for a TPU slice with the TPU compiler, on any machine (needs libtpu:
`pip install -e ".[tpu]"`; no TPU):

    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128
    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128 --num_slices=2 \\
        --config.mesh.data=2
    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128 --search
    python -m experiments.plan --config=configs/shakespeare.py --topology=v5litepod-8 --step=eval

Prints the slice, the per-chip ledger, the compiler's memory analysis and headroom, compiled vs model
FLOPs, the collectives, an estimated step time with the MFU and tokens/s/chip it implies (the compiler's own
where it is sound, else the roofline model of the compiled HLO, with its parts), and a JSON line last. Exits
1 when the step does not fit. `--search` prints, per remat policy, the largest global batch that fits and
which policy is the cheapest (least recompute) that fits the config's batch.
"""

import json

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.experiment import Experiment
from llama_jax.tools import planner, tpu

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama3_8b_c4_tpu.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice as Cloud names it: v4-32, v5litepod-16, v5p-128, "
                                "v6e-8, ...", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (data parallel across them).")
_STEP = flags.DEFINE_enum("step", "train", list(planner.STEPS), "Which jitted step to compile.")
_SEARCH = flags.DEFINE_bool("search", False, "Largest fitting global batch per remat policy.")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Also compile 1- and 2-layer variants for the compiler's time "
                              "estimate (the HLO model's needs no extra compile).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "--step=decode: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 1024, "--step=decode: generated tokens.")


def _search(exp: Experiment) -> int:
    results = planner.search(exp, _TOPOLOGY.value, num_slices=_NUM_SLICES.value)
    print(f"largest global batch that fits {_TOPOLOGY.value} x {_NUM_SLICES.value}, per remat policy "
          f"(seq {exp.loop.seq_len}):")
    for policy, (batch, report, exact) in results.items():
        peak = f"peak {report.peak_bytes / planner.GIB:.2f} GiB" if report else "nothing fits"
        note = "" if exact else "  (at least: the search stopped before closing in)"
        print(f"  {policy:22s} {batch:6d}  {peak}{note}")
    want = exp.loop.batch_size
    cheapest = next((p for p, (b, _, _) in results.items() if b >= want), None)
    print(f"cheapest policy (least recompute) that fits batch {want}: {cheapest or 'none'}")
    print(json.dumps({"search": {p: b for p, (b, _, _) in results.items()}, "batch_size": want,
                      "cheapest_policy": cheapest}))
    return 0 if cheapest else 1


def main(argv):
    cli.quiet_logs()
    # The planner compiles for TPU chips that are not here, and jax cannot load such a program back from the
    # persistent compilation cache (it warns, then compiles again): store none. Before the first compile,
    # when jax decides once per process whether to use the cache.
    jax.config.update("jax_enable_compilation_cache", False)
    exp = Experiment.from_config(_CONFIG.value)
    tpu.parse_slice(_TOPOLOGY.value)  # a bad name fails before anything is built
    if _SEARCH.value:
        raise SystemExit(_search(exp))
    report = planner.plan(exp, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, step=_STEP.value,
                       estimate=_ESTIMATE.value, decode_lengths=(_PROMPT_LEN.value, _NEW_TOKENS.value))
    print("\n".join(report.lines()))
    print(json.dumps(report.to_json()))
    raise SystemExit(0 if report.fits else 1)


if __name__ == "__main__":
    cli.run(main)
