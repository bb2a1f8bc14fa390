"""The README's offline mixture recipe, end to end with the real commands (few steps): make_shards, train
configs/shakespeare_code_mix.py through a token cache, eval_ppl per source, inspect_data --as_trained, and
build_cache finding nothing left to build."""

import json

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_offline_mixture_recipe(tmp_path, tfds_manual_dir, tfds_data_dir):
    shards = tmp_path / "code_shards"
    r = run_module("experiments.make_shards", "--inputs=llama_jax/**/*.py,experiments/*.py,README.md",
                   f"--output_dir={shards}", "--docs_per_shard=20", check=True, timeout=120)
    made = json.loads(r.stdout.splitlines()[-1])
    assert made["train_shards"] >= 3 and made["heldout_docs"] >= 1
    data_flags = [
        "--config=configs/shakespeare_code_mix.py", f"--config.data.manual_dir={tfds_manual_dir}",
        f"--config.data.data_dir={tfds_data_dir}", f"--config.data.cache_dir={tmp_path / 'tokcache'}",
        f"--config.data.sources.code.train_files={shards}/train-*.jsonl.zst",
        f"--config.data.sources.code.eval_files={shards}/heldout.jsonl.zst",
    ]
    one_device = {"XLA_FLAGS": ""}  # as a user runs it: the config's mesh is one CPU device
    run_module("experiments.train", *data_flags, f"--workdir={tmp_path / 'mix'}", "--config.num_steps=4",
               "--config.eval_every=2", "--config.log_every=2", check=True, timeout=600, env=one_device)
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    assert {"eval/code/bits_per_byte", "eval/shakespeare/bits_per_byte"} <= set(last_eval)
    assert [r for r in rows if "data/code/epochs" in r][-1]["data/code/epochs"] > 0

    r = run_module("experiments.eval_ppl", f"--workdir={tmp_path / 'mix'}", check=True, timeout=300, env=one_device)
    result = json.loads(r.stdout.splitlines()[-1])
    assert sorted(result["sets"]) == ["code", "shakespeare"]
    assert result["loss"] == pytest.approx(last_eval["eval/loss"], rel=1e-5)
    assert "total" in r.stderr and "code" in r.stderr  # the table

    r = run_module("experiments.inspect_data", *data_flags, f"--workdir={tmp_path / 'mix'}", "--as_trained",
                   "--num_rows=20", check=True, timeout=300)
    shown = json.loads(r.stdout.splitlines()[-1])
    assert shown["rows"] == 20 and shown["by_source"]["code"] + shown["by_source"]["shakespeare"] == 20
    assert "source 'code', shard " in r.stdout and "source 'shakespeare', shard " in r.stdout

    r = run_module("experiments.build_cache", *data_flags, f"--workdir={tmp_path / 'mix'}", check=True, timeout=300)
    built = json.loads(r.stdout.splitlines()[-1])["caches"]
    assert all(c["built"] == 0 and c["complete"] == c["shards"] for c in built.values())  # all reused
    assert set(built) == {"code/train", "code/eval", "shakespeare/train", "shakespeare/eval"}
