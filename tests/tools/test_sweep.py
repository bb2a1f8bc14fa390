"""Sweep grid expansion, launch commands and the report (real runs are in tests/test_end_to_end.py)."""

import json
import os

import pytest

from llama_jax import errors
from llama_jax.tools import sweep


def test_grid_expansion_and_names():
    axes = sweep.parse_sweeps(["model.norm=rmsnorm,layernorm", "model.num_kv_heads=1, 4"])
    variants = sweep.expand(axes)
    assert variants == [
        {"model.norm": "rmsnorm", "model.num_kv_heads": "1"},
        {"model.norm": "rmsnorm", "model.num_kv_heads": "4"},
        {"model.norm": "layernorm", "model.num_kv_heads": "1"},
        {"model.norm": "layernorm", "model.num_kv_heads": "4"},
    ]
    assert sweep.variant_name(variants[2]) == "model.norm-layernorm__model.num_kv_heads-1"
    assert sweep.expand([]) == [{}] and sweep.variant_name({}) == "base"


@pytest.mark.parametrize("bad", ["model.norm", "=a,b", "model.norm="])
def test_bad_sweep_spec_is_explained(bad):
    with pytest.raises(errors.SweepError, match="field=value"):
        sweep.parse_sweeps([bad])


def test_duplicate_field_is_rejected():
    with pytest.raises(errors.SweepError, match="twice"):
        sweep.parse_sweeps(["seed=1,2", "seed=3"])


def test_commands_one_per_variant_and_seed():
    variants = sweep.expand(sweep.parse_sweeps(["model.qk_norm=False,True"]))
    argvs = sweep.commands("configs/tiny.py", "/w", variants, [0, 1], fixed=["num_steps=5"])
    assert len(argvs) == 4
    first = argvs[0]
    assert first[1:3] == ["-m", "experiments.train"]
    assert "--workdir=/w/model.qk_norm-False/seed0" in first
    assert "--config.seed=0" in first and "--config.num_steps=5" in first and "--config.model.qk_norm=False" in first
    assert "--config.seed=1" in argvs[1] and "--config.model.qk_norm=True" in argvs[3]


def _fake_run(path, final_loss, bpb):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "train/loss": 3.0}) + "\n")
        f.write(json.dumps({"step": 10, "eval/loss": final_loss + 0.5, "eval/bits_per_byte": bpb + 0.5}) + "\n")
        f.write(json.dumps({"step": 20, "eval/loss": final_loss, "eval/bits_per_byte": bpb}) + "\n")


def test_report_table_mean_std_and_plot(tmp_path):
    variants = sweep.expand(sweep.parse_sweeps(["model.norm=rmsnorm,layernorm"]))
    for v, losses in zip(variants, [(2.0, 2.2), (1.0, 1.4)]):
        for seed, loss in enumerate(losses):
            _fake_run(sweep.run_dir(str(tmp_path), v, seed), loss, loss / 2)
    md, png = sweep.report(str(tmp_path), variants, [0, 1])
    table = open(md).read().splitlines()
    assert table[0].startswith("| model.norm | step | seeds |")
    assert "| rmsnorm | 20 | 2 | 2.1000 ± 0.1414 | 1.0500 ± 0.0707 |" in table
    assert "| layernorm | 20 | 2 | 1.2000 ± 0.2828 | **0.6000 ± 0.1414** |" in table
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_names_an_unfinished_run(tmp_path):
    with pytest.raises(errors.SweepError, match="seed0"):
        sweep.report(str(tmp_path), [{}], [0])
