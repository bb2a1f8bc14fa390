"""The training loop in-process (fast tier): hooks run on their cadence, extra hooks plug in, a rerun resumes,
and a bad config is refused before anything is written."""

import json
import os

import pytest

from llama_jax import checkpoint, errors
from llama_jax.experiment import Experiment
from llama_jax.train import Hook, read_metrics, train
from tests.helpers import load_config


@pytest.fixture(scope="module")
def local_data(tmp_path_factory, shakespeare_path):
    root = tmp_path_factory.mktemp("loop_data")
    text = shakespeare_path.read_text(encoding="utf-8")
    (root / "train.txt").write_text(text[:200_000], encoding="utf-8")
    (root / "eval.txt").write_text(text[-5_000:], encoding="utf-8")
    return root


def tiny(local_data, **top):
    c = load_config("tiny")
    c.data.train_files, c.data.eval_files = str(local_data / "train.txt"), str(local_data / "eval.txt")
    c.data.eval_batch_size = 8
    c.batch_size, c.seq_len = 8, 32
    for k, v in top.items():
        c[k] = v
    return c


class Count(Hook):
    """A user's periodic hook: records the steps it ran at."""

    def __init__(self, every):
        self.every, self.steps, self.started, self.closed = every, [], None, False

    def on_start(self, run):
        self.started = run.start

    def __call__(self, run):
        self.steps.append(run.done)

    def close(self, run):
        self.closed = True


def test_hooks_run_on_their_cadence_and_a_rerun_resumes(local_data, tmp_path):
    c = tiny(local_data, num_steps=6, log_every=2, eval_every=3, checkpoint_every=3, keep_checkpoints=0)
    count = Count(every=4)
    last = train(Experiment.from_config(c), tmp_path, extra_hooks=[count])
    assert last["step"] == 6 and "eval/bits_per_byte" in last and "train/loss" in last
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints")) == [3, 6]
    assert (count.started, count.steps, count.closed) == (0, [4, 6], True)  # every 4, and the last step
    assert json.loads((tmp_path / "config.json").read_text())["model"]["head_dim"] == 0  # derived: not stored

    c.num_steps = 8  # a rerun of the same command with more steps resumes at 6
    count = Count(every=1)
    assert train(Experiment.from_config(c), tmp_path, extra_hooks=[count])["step"] == 8
    assert (count.started, count.steps) == (6, [7, 8])
    assert checkpoint.latest_step(tmp_path) == 8
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [2, 4, 6, 8]


def test_bad_config_is_refused_before_anything_is_written(local_data, tmp_path):
    c = tiny(local_data)
    c.optimizer.lr = -1.0
    with pytest.raises(errors.ConfigError, match=r"optimizer.lr=-1.0 must be >= 0"):
        train(Experiment.from_config(c), tmp_path / "run")
    c = tiny(local_data)
    c.mesh.fsdp = 3  # does not divide the 8 devices
    with pytest.raises(errors.ShardingError, match="does not divide the 8 devices"):
        train(Experiment.from_config(c), tmp_path / "run")
    assert not (tmp_path / "run").exists()
