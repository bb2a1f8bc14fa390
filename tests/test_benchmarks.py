"""Every benchmark script still runs (its --quick smoke run), prints no target verdicts and ends with one JSON
line; the figures are measured by hand on a quiet machine (benchmarks/README.md), never asserted here."""

import json

import pytest

from tests.helpers import run_module

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["train_throughput", "eval_throughput", "decode", "compile_time", "compile_cache", "input_pipeline", "data_pipeline",
                                    "lora_train", "lm_eval_throughput"])
def test_benchmark_quick_run_ends_with_json(script, tfds_manual_dir, tfds_data_dir):
    args = [f"benchmarks.{script}", "--quick"]
    if script == "input_pipeline":
        args += [f"--manual_dir={tfds_manual_dir}", f"--data_dir={tfds_data_dir}"]
    r = run_module(*args, timeout=600, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict) and result
    # The targets are for the full-size runs: a smoke run's verdicts would read as failures.
    assert "target" not in (r.stdout + r.stderr).lower(), r.stdout


def test_gpu_train_runs_a_config_and_reports(tmp_path):
    """benchmarks.gpu_train (the README's H200 measurement) on the CPU with configs/tiny.py: it stops at
    --steps without a checkpoint, and reports tokens/s, MFU and the dumped train step's HLO files."""
    (tmp_path / "train.txt").write_text("to be or not to be, that is the question. " * 200)
    (tmp_path / "eval.txt").write_text("whether 'tis nobler in the mind to suffer")
    workdir = tmp_path / "run"
    r = run_module("benchmarks.gpu_train", "--config=configs/tiny.py", "--steps=4", f"--workdir={workdir}",
                   f"--dump_hlo={tmp_path / 'hlo'}", "--config.log_every=2", "--config.eval_every=0",
                   "--config.checkpoint_every=0", f"--config.data.train_files={tmp_path / 'train.txt'}",
                   f"--config.data.eval_files={tmp_path / 'eval.txt'}", timeout=600, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["tokens_per_sec"] > 0 and result["mfu"] > 0
    assert result["attention_impl"] == "xla"  # tiny's "auto" on the CPU
    assert result["hlo_after_optimizations"]["files"] and result["hlo_after_optimizations"]["cudnn_custom_calls"] == {}
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
