"""init_from takes the model config and the tokenizer from the source workdir: a stock config of another
shape fine-tunes an imported HF model as is; explicit overrides that change the params' shapes are refused in
one line before the new workdir exists; run-time fields and shape-free explicit overrides are the run's."""

import logging

import jax
import numpy as np
import pytest

from llama_jax import checkpoint, errors
from llama_jax.experiment import Experiment
from llama_jax.model import ModelConfig, param_shapes
from llama_jax.train import init_from, train
from tests.helpers import load_config, run_module


def _stock(source, shakespeare_path, tmp_path, **loop):
    """configs/shakespeare.py as shipped (d=128, 4 layers, vocab 1024, data.tokenizer=train:bpe:1024), on
    local files, with init_from=source."""
    (tmp_path / "train.txt").write_text(shakespeare_path.read_text(encoding="utf-8")[:60000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(shakespeare_path.read_text(encoding="utf-8")[-5000:], encoding="utf-8")
    c = load_config("shakespeare")
    c.data.train_files, c.data.eval_files = str(tmp_path / "train.txt"), str(tmp_path / "eval.txt")
    c.init_from = str(source)
    c.mesh.data = -1  # the tests' 8 emulated devices (the config is for one)
    c.update(loop)
    return c


@pytest.mark.slow
def test_stock_config_fine_tunes_an_imported_model(hf_tiny_workdir, shakespeare_path, tmp_path, caplog):
    c = _stock(hf_tiny_workdir, shakespeare_path, tmp_path, num_steps=1, eval_every=1, checkpoint_every=0)
    c.optimizer.lr = 0.0  # the one update is zero: the saved params are the source's, bit for bit
    assert c.model.dim == 128 and c.data.tokenizer == "train:bpe:1024"
    with caplog.at_level(logging.INFO, logger="llama_jax.train"):
        metrics = train(Experiment.from_config(c), tmp_path / "ft")
    assert np.isfinite(metrics["eval/loss"])
    source = checkpoint.read_config(hf_tiny_workdir)["model"]
    written = checkpoint.read_config(tmp_path / "ft")
    assert written["model"] == source  # the stock config's run-time fields equal the import's here
    assert written["data"]["tokenizer"] == str(hf_tiny_workdir / "tokenizer")
    shapes = param_shapes(ModelConfig.from_dict(source))
    want = checkpoint.restore_params(hf_tiny_workdir, shapes)
    got = checkpoint.restore_params(tmp_path / "ft", shapes)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("init_from")]
    assert f"init_from {hf_tiny_workdir}: model config from its config.json" in line
    assert "replaced this config's vocab_size 1024->384, dim 128->64, num_layers 4->2" in line
    assert f"tokenizer {hf_tiny_workdir}/tokenizer;" in line


def test_conflicting_explicit_override_is_refused_before_anything_is_written(hf_tiny_workdir, shakespeare_path,
                                                                             tmp_path):
    c = _stock(hf_tiny_workdir, shakespeare_path, tmp_path)
    c.model.num_layers = 2
    with pytest.raises(errors.ConfigError) as e:
        train(Experiment.from_config(c), tmp_path / "ft", explicit={"model.num_layers", "model.dim"})
    assert str(e.value) == (
        f"--config.init_from={hf_tiny_workdir} fine-tunes its model, but --config.model.dim=128 (its dim is 64) "
        "would change the params' shapes; drop those flags (the model config comes from the source), or start "
        "from scratch without --config.init_from."
    )  # num_layers=2 is the source's: no conflict
    assert not (tmp_path / "ft").exists()
    # The command line: one line, exit 1, the workdir not created.
    r = run_module("experiments.train", "--config=configs/shakespeare.py", f"--workdir={tmp_path / 'cli'}",
                   f"--config.init_from={hf_tiny_workdir}", "--config.model.vocab_size=512",
                   f"--config.data.train_files={tmp_path / 'train.txt'}",
                   f"--config.data.eval_files={tmp_path / 'eval.txt'}", timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"train: --config.init_from={hf_tiny_workdir} fine-tunes its model, but --config.model.vocab_size=512 " \
           "(its vocab_size is 384) would change the params' shapes" in r.stderr
    assert not (tmp_path / "cli").exists()


def test_run_time_fields_and_shape_free_overrides_are_the_runs(hf_tiny_workdir, shakespeare_path, tmp_path):
    c = _stock(hf_tiny_workdir, shakespeare_path, tmp_path)
    c.model.update(dtype="bfloat16", remat_policy="full", scan_layers=True, loss_chunk=32, rope_theta=5e5,
                   max_seq_len=512)
    c.data.tokenizer = "byte"
    exp = init_from.resolve(Experiment.from_config(c), explicit={"model.rope_theta", "data.tokenizer"})
    source = ModelConfig.from_dict(checkpoint.read_config(hf_tiny_workdir)["model"])
    assert exp.model == source.replace(dtype="bfloat16", remat_policy="full", scan_layers=True, loss_chunk=32,
                                       rope_theta=5e5)  # max_seq_len=512 was not explicit: the source's
    assert exp.data.tokenizer == "byte"  # explicit
    # Without init_from nothing changes; a missing source is named.
    c.init_from = ""
    assert init_from.resolve(Experiment.from_config(c), ()) == Experiment.from_config(c)
    c.init_from = str(tmp_path / "nowhere")
    with pytest.raises(errors.CheckpointError, match=r"--config.init_from=.*nowhere: .*config.json does not exist"):
        init_from.resolve(Experiment.from_config(c))
