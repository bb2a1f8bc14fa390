"""Will it fit? Compile a config's step for a TPU slice with the TPU compiler, on any machine (needs libtpu:
`pip install -e ".[tpu]"`; no TPU):

    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128
    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128 --num_slices=2 \\
        --config.mesh.data=2
    python -m experiments.plan --config=configs/llama3_8b_c4_tpu.py --topology=v5p-128 --search \\
        --meshes=64x1,16x4 --policies=full,save_dots_except_mlp
    python -m experiments.plan --config=configs/shakespeare.py --topology=v5litepod-8 --step=eval

Prints the slice, the per-chip ledger, the compiler's memory analysis and headroom, compiled vs model
FLOPs, the collectives, an estimated step time with the MFU and tokens/s/chip it implies (the compiler's own
where it is sound, else the roofline model of the compiled HLO, with its parts), and a JSON line last. Exits
1 when the step does not fit. `--search` compiles the candidates (llama_jax/tools/plan_search.py) and prints the
largest global batch that fits per mesh and remat policy, the cheapest (least recompute) policy that fits
the config's batch per mesh, the fitting candidates ranked by estimated tokens/s/chip, the experiments.train
command that applies the best, and a JSON line; it exits 1 when nothing fits.
"""

import json
import shlex
import sys

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.experiment import Experiment
from llama_jax.tools import plan_search, planner, tpu

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama3_8b_c4_tpu.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice as Cloud names it: v4-32, v5litepod-16, v5p-128, "
                                "v6e-8, ...", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (data parallel across them).")
_STEP = flags.DEFINE_enum("step", "train", list(planner.STEPS), "Which jitted step to compile.")
_SEARCH = flags.DEFINE_bool("search", False, "Rank (mesh, remat policy, batch) candidates that fit by estimated "
                             "tokens/s/chip; the largest fitting batch per mesh and policy.")
_MESHES = flags.DEFINE_string("meshes", None, "--search: FSDPxTENSOR meshes within a slice, e.g. 64x1,16x4 "
                              "(default: tensor 1, 2, 4, 8 with fsdp the rest, those the model admits).")
_POLICIES = flags.DEFINE_string("policies", ",".join(planner.BY_RECOMPUTE), "--search: remat policies, "
                                "comma-separated.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 10, "--search: compiles per (mesh, policy) for the "
                                     "largest fitting batch.")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Also compile 1- and 2-layer variants for the compiler's time "
                              "estimate (the HLO model's needs no extra compile).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1024, "--step=decode: prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 1024, "--step=decode: generated tokens.")


def _mesh_name(mesh: dict[str, int]) -> str:
    return "x".join(str(mesh[a]) for a in ("data", "fsdp", "tensor"))


def _print_largest(found: plan_search.Search, num_slices: int) -> None:
    print("largest global batch that fits, per mesh (data x fsdp x tensor) and remat policy:")
    for (fsdp, tensor), policy in found.largest:
        batch, exact = found.largest[(fsdp, tensor), policy]
        note = "" if exact else "  (at least: the search stopped before closing in)"
        print(f"  {num_slices}x{fsdp}x{tensor:<4d} {policy:22s} {batch:6d}{note}")
    for (fsdp, tensor), why in found.skipped.items():
        print(f"  {num_slices}x{fsdp}x{tensor}: skipped, {why}")
    cheapest = {f"{num_slices}x{f}x{t}": found.cheapest((f, t)) or "none" for f, t in found.meshes}
    print(f"cheapest policy (least recompute) that fits batch {found.batch_size}: "
          + "; ".join(f"{m} {p}" for m, p in cheapest.items()))


def _print_ranked(found: plan_search.Search) -> None:
    print("candidates that fit, ranked by estimated tokens/s/chip (estimates from the compiled program, not "
          f"measurements; {planner.compiler_versions()}):")
    print(f"  {'rank':>4}  {'mesh':8s} {'remat':22s} {'batch':>6}  {'peak / HBM':>15}  {'est. step':>10}  "
          f"{'MFU':>6}  {'tokens/s/chip':>13}")
    for i, r in enumerate(found.ranked, 1):
        print(f"  {i:4d}  {_mesh_name(r.mesh):8s} {r.remat_policy:22s} {r.batch_size:6d}  "
              f"{r.peak_bytes / planner.GIB:5.1f} / {r.slice.hbm_bytes / planner.GIB:4.1f} GiB  "
              f"{r.estimate_s:8.3f} s  {r.mfu:6.1%}  {r.tokens_per_s_per_chip:13,.0f}")
    for r in found.untimed:
        print(f"     -  {_mesh_name(r.mesh):8s} {r.remat_policy:22s} {r.batch_size:6d}  fits, no estimate: "
              f"{r.estimate_note}")


def _progress(r: planner.Report) -> None:
    """One stderr line per compile of a search, as it is made: an 8B search runs for an hour or more."""
    verdict = (f"fits, peak {r.peak_bytes / planner.GIB:.1f} GiB" if r.fits else
               f"does not fit, needs {r.peak_bytes / planner.GIB:.1f} GiB")
    speed = f", estimated {r.tokens_per_s_per_chip:,.0f} tokens/s/chip" if r.fits and r.estimate_s else ""
    print(f"compiled {_mesh_name(r.mesh)} {r.remat_policy} batch {r.batch_size}: {verdict}{speed} "
          f"({r.compile_s:.0f} s)", file=sys.stderr, flush=True)


def _command(best: planner.Report) -> str:
    """experiments.train with this run's config file and overrides, and the best candidate's."""
    applied = plan_search.train_flags(best)
    keys = {f.split("=", 1)[0] for f in applied}
    own = [a for a in sys.argv[1:] if a.startswith("--config.") and a.split("=", 1)[0] not in keys]
    config = config_flags.get_config_filename(flags.FLAGS["config"])
    return shlex.join(["python", "-m", "experiments.train", f"--config={config}", *own, *applied])


def _search(exp: Experiment) -> int:
    chips = tpu.parse_slice(_TOPOLOGY.value).chips
    meshes = plan_search.parse_meshes(_MESHES.value, chips) if _MESHES.value else None
    found = plan_search.search(exp, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, meshes=meshes,
                               policies=plan_search.parse_policies(_POLICIES.value), max_compiles=_MAX_COMPILES.value,
                               progress=_progress)
    print(f"search: {_TOPOLOGY.value} x {_NUM_SLICES.value} slice(s), seq {exp.loop.seq_len}, "
          f"the config's batch {exp.loop.batch_size}")
    _print_largest(found, _NUM_SLICES.value)
    _print_ranked(found)
    best = found.ranked[0] if found.ranked else None
    print("best: " + (_command(best) if best else "nothing fits with a time estimate"))
    print(json.dumps({"search": {
        "batch_size": found.batch_size,
        "largest": {f"{_NUM_SLICES.value}x{f}x{t} {p}": b for ((f, t), p), (b, _) in found.largest.items()},
        "cheapest_policy": {f"{_NUM_SLICES.value}x{f}x{t}": found.cheapest((f, t)) for f, t in found.meshes},
        "ranked": [{"mesh": r.mesh, "remat_policy": r.remat_policy, "batch_size": r.batch_size,
                    "peak_gib": round(r.peak_bytes / planner.GIB, 3), "estimate_s": r.estimate_s,
                    "mfu": round(r.mfu, 4), "tokens_per_s_per_chip": round(r.tokens_per_s_per_chip, 1)}
                   for r in found.ranked],
        "best_command": _command(best) if best else None, "compiler": planner.compiler_versions()}}))
    return 0 if best else 1


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
