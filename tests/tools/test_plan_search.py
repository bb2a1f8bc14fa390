"""plan --search: the ranking, the cheapest fitting policy and the train command, from real TPU compiles of a
tiny model (libtpu on this CPU)."""

import json
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from llama_jax.errors import ConfigError
from llama_jax.experiment import Experiment
from llama_jax.tools import plan_search, planner
from tests.helpers import REPO, run_module

pytest.importorskip("libtpu", reason="needs libtpu, the TPU compiler: pip install -e '.[tpu]'")


def _parse_train_command(command: str) -> Experiment:
    """The experiment `python -m experiments.train ...` would run: its config file and --config overrides
    through config_flags, the parser experiments.train uses."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "experiments.train"], command
    argv = ["train", *argv[3:]]
    path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    saved, sys.argv = sys.argv, argv
    try:
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", str(REPO / path), flag_values=fv)
        fv(argv)
        return Experiment.from_config(fv.config)
    finally:
        sys.argv = saved


def test_bad_meshes_and_policies_are_one_line_errors():
    assert plan_search.parse_meshes("64x1,16x4", 64) == [(64, 1), (16, 4)]
    with pytest.raises(ConfigError, match="FSDP\\*TENSOR=64"):
        plan_search.parse_meshes("16x2", 64)
    with pytest.raises(ConfigError, match="write FSDPxTENSOR"):
        plan_search.parse_meshes("16-4", 64)
    assert plan_search.parse_policies("full,none") == ("none", "full")  # least recompute first
    with pytest.raises(ConfigError, match="choose from"):
        plan_search.parse_policies("full,save_everything")


@pytest.mark.slow
def test_search_ranks_fitting_candidates_names_the_cheapest_policy_and_prints_a_command_that_applies_the_best():
    """configs/tiny.py (seq 64) on v5litepod-8 at batch 163840: without remat it needs ~16.6 GiB of the v5e's
    15.7 (libtpu 0.0.42.1: 16.6 at 164056), with full remat ~12. So the least-recompute policy does not fit the
    config's batch and `full` is the cheapest that does; the failing compile must not rank."""
    batch = 163840
    r = run_module("experiments.plan", "--config=configs/tiny.py", "--topology=v5litepod-8", "--search",
                   "--meshes=8x1", "--policies=none,full", "--max_compiles=2", f"--config.batch_size={batch}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])["search"]
    # The cheapest policy: `none` fails at the config's batch (an independent compile agrees), `full` fits.
    assert out["cheapest_policy"] == {"1x8x1": "full"}
    assert f"fits batch {batch}: 1x8x1 full" in r.stdout
    exp = _parse_train_command("python -m experiments.train --config=configs/tiny.py "
                               f"--config.batch_size={batch} --config.model.remat_policy=none --config.mesh.fsdp=8")
    assert not planner.plan(exp, "v5litepod-8", estimate=False, explain=False).fits
    # Ranked: fitting candidates only (the failing `none` at the config's batch is not among them), fastest
    # first; `full` at the config's batch is.
    ranked = out["ranked"]
    hbm = planner.parse_slice("v5litepod-8").hbm_bytes / planner.GIB
    assert ranked and all(0 < c["peak_gib"] < hbm for c in ranked)
    assert ("none", batch) not in {(c["remat_policy"], c["batch_size"]) for c in ranked}
    assert ("full", batch) in {(c["remat_policy"], c["batch_size"]) for c in ranked}
    speeds = [c["tokens_per_s_per_chip"] for c in ranked]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] > 0
    assert "not measurements" in r.stdout
    # The printed command, parsed as experiments.train parses it, trains the best candidate.
    best = ranked[0]
    trained = _parse_train_command(out["best_command"])
    assert f"best: {out['best_command']}" in r.stdout
    assert (trained.mesh.data, trained.mesh.fsdp, trained.mesh.tensor) == tuple(
        best["mesh"][a] for a in ("data", "fsdp", "tensor"))
    assert (trained.model.remat_policy, trained.loop.batch_size) == (best["remat_policy"], best["batch_size"])
