"""The entry scripts end to end, as a user runs them: the main job and a local sweep (tiny config)."""

import json
import os

import pytest

from tests.helpers import run_module

pytestmark = pytest.mark.slow



def _run(args, timeout=600):
    return run_module(*args, timeout=timeout, check=True).stdout


def test_main_job_trains_evaluates_and_samples(tmp_path, tfds_manual_dir, tfds_data_dir):
    out = _run(["experiments.main_job", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                f"--config.data.manual_dir={tfds_manual_dir}", f"--config.data.data_dir={tfds_data_dir}",
                "--config.data.tokenizer=train:bpe:384", "--config.num_steps=6", "--config.eval_every=3",
                "--prompt=ROMEO:", "--max_new_tokens=20"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["train_steps"] == 6
    assert result["bytes"] == 55770  # the whole validation split, exactly once
    assert 0 < result["nats_per_byte"] < 10 and result["perplexity"] > 1
    assert "--- sample ---\nROMEO:" in out
    # The separate evaluation agrees with the training loop's own final evaluation.
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final_eval = [r for r in rows if "eval/loss" in r][-1]
    assert final_eval["step"] == 6
    assert final_eval["eval/loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    assert os.path.exists(tmp_path / "run" / "tokenizer" / "tokenizer.model")


def test_local_sweep_writes_table_and_plot(tmp_path, tfds_manual_dir, tfds_data_dir):
    out = _run(["experiments.sweep", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                "--sweep=model.qk_norm=False,True", "--seeds=1", "--set=num_steps=4", "--set=eval_every=2",
                f"--set=data.manual_dir={tfds_manual_dir}", f"--set=data.data_dir={tfds_data_dir}"])
    table = open(tmp_path / "sweep.md").read()
    assert "| model.qk_norm | step | seeds |" in table and "| False | 4 | 1 |" in table and "| True | 4 | 1 |" in table
    assert open(tmp_path / "sweep.png", "rb").read(4) == b"\x89PNG"
    assert "wrote" in out
