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


@pytest.mark.parametrize("spec, expected", [
    ("eval/wiki/bits_per_byte", ("eval/wiki/bits_per_byte", False)),
    ("eval/mean/loss", ("eval/mean/loss", False)),
    ("eval/perplexity", ("eval/perplexity", False)),
    ("lm_eval/tiny_mc/acc", ("lm_eval/tiny_mc/acc", True)),
    ("lm_eval/tiny_mc/acc,none", ("lm_eval/tiny_mc/acc,none", True)),
    ("lm_eval/wikitext/word_perplexity,none", ("lm_eval/wikitext/word_perplexity,none", False)),
    ("eval/exact_match", ("eval/exact_match", True)),
    ("+eval/loss", ("eval/loss", True)),
    ("-lm_eval/tiny_mc/acc", ("lm_eval/tiny_mc/acc", False)),
])
def test_rank_direction_follows_the_metric_name_or_its_sign(spec, expected):
    assert sweep.parse_rank_by(spec) == expected


def _runs_with_task_metrics(root, variants, values):
    """Runs whose metrics.jsonl hold eval/* per set and lm_eval/* rows (an early and a final evaluation)."""
    for v, per_seed in zip(variants, values):
        for seed, (wiki_bpb, acc) in enumerate(per_seed):
            path = sweep.run_dir(str(root), v, seed)
            os.makedirs(path)
            with open(os.path.join(path, "metrics.jsonl"), "w") as f:
                for step, late in ((10, 0.0), (20, 1.0)):
                    f.write(json.dumps({"step": step, "eval/loss": 2.0, "eval/bits_per_byte": 1.5,
                                        "eval/wiki/bits_per_byte": wiki_bpb + 1 - late}) + "\n")
                    f.write(json.dumps({"step": step, "lm_eval/tiny_mc/acc": None if acc is None else acc * late})
                            + "\n")


def test_report_ranks_variants_by_any_metric_with_mean_and_std_over_seeds(tmp_path):
    variants = sweep.expand(sweep.parse_sweeps(["model.norm=rmsnorm,layernorm,none"]))
    _runs_with_task_metrics(tmp_path, variants, [
        [(1.0, 0.50), (1.2, 0.60)],  # rmsnorm: bpb 1.1 ± 0.1414, acc 0.55 ± 0.0707
        [(0.9, 0.30), (0.9, 0.40)],  # layernorm: the best bpb, the worst acc
        [(1.4, 0.70), (1.6, None)],  # none: one seed's acc was non-finite (null): ranks last
    ])
    md, _ = sweep.report(str(tmp_path), variants, [0, 1], rank_by="eval/wiki/bits_per_byte")
    table = open(md).read().splitlines()
    assert table[0] == ("| rank | model.norm | step | seeds | eval loss (nats/token) | bits/byte | "
                        "eval/wiki/bits_per_byte (lower is better) |")
    assert table[1] == "|" + "---|" * 7
    assert table[2] == "| 1 | layernorm | 20 | 2 | 2.0000 ± 0.0000 | 1.5000 ± 0.0000 | **0.9000 ± 0.0000** |"
    assert table[3] == "| 2 | rmsnorm | 20 | 2 | 2.0000 ± 0.0000 | 1.5000 ± 0.0000 | 1.1000 ± 0.1414 |"
    assert table[4].startswith("| 3 | none |") and table[4].endswith("| 1.5000 ± 0.1414 |")

    md, _ = sweep.report(str(tmp_path), variants, [0, 1], rank_by="lm_eval/tiny_mc/acc")
    table = open(md).read().splitlines()
    assert table[0].endswith("| lm_eval/tiny_mc/acc (higher is better) |")
    assert [line.split(" | ")[1] for line in table[2:]] == ["rmsnorm", "layernorm", "none"]
    assert table[2].endswith("| **0.5500 ± 0.0707** |") and table[4].endswith("| nan ± nan |")

    md, _ = sweep.report(str(tmp_path), variants, [0, 1], rank_by="-lm_eval/tiny_mc/acc")  # forced: lower
    assert [line.split(" | ")[1] for line in open(md).read().splitlines()[2:]] == ["layernorm", "rmsnorm", "none"]


def test_rank_by_a_metric_a_run_never_logged_names_what_it_has(tmp_path):
    _runs_with_task_metrics(tmp_path, [{}], [[(1.0, 0.5)]])
    with pytest.raises(errors.SweepError, match=r"base/seed0/metrics.jsonl has no 'lm_eval/tiny_mc/acc_norm' "
                                                r"\(--rank_by\); it has \['eval/bits_per_byte', 'eval/loss', "
                                                r"'eval/wiki/bits_per_byte', 'lm_eval/tiny_mc/acc'\]"):
        sweep.report(str(tmp_path), [{}], [0], rank_by="lm_eval/tiny_mc/acc_norm")
    with pytest.raises(errors.SweepError, match="names no metric"):
        sweep.report(str(tmp_path), [{}], [0], rank_by="+")
