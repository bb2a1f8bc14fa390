"""The training loop in-process (fast tier): hooks run on their cadence, extra hooks plug in, a rerun resumes;
a bad config, a workdir in use and a failed resume change nothing in the workdir; each step is logged once."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from llama_jax import checkpoint, errors, inference, lock
from llama_jax.experiment import Experiment
from llama_jax.train import Hook, peak_flops, read_metrics, summarize, train
from tests.helpers import load_config


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


@pytest.mark.slow
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


# ---------------------------------------------------------------------- the workdir lock
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(local_data, tmp_path):
    c = tiny(local_data, num_steps=2, eval_every=0)
    workdir = tmp_path / "run"
    workdir.mkdir()
    live = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
            "token": "another-run"}
    (workdir / lock.LOCK_FILE).write_text(json.dumps(live))
    with pytest.raises(errors.CheckpointError, match=rf"is in use by a training run \(pid {os.getpid()} on "):
        train(Experiment.from_config(c), workdir)
    assert sorted(os.listdir(workdir)) == [lock.LOCK_FILE]  # nothing written, the holder's lock kept

    stale = {**live, "pid": _dead_pid()}  # a run killed with SIGKILL leaves this behind
    (workdir / lock.LOCK_FILE).write_text(json.dumps(stale))
    assert train(Experiment.from_config(c), workdir)["step"] == 2
    assert not (workdir / lock.LOCK_FILE).exists()  # released at the end


def test_a_failed_resume_leaves_the_workdir_as_it_was(local_data, tmp_path):
    c = tiny(local_data, num_steps=3, eval_every=0, log_every=1)
    train(Experiment.from_config(c), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    c.model.num_layers, c.allow_config_change, c.num_steps = 3, True, 6
    with pytest.raises(errors.CheckpointError, match="checkpoints/3 cannot be resumed with this config"):
        train(Experiment.from_config(c), tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not (tmp_path / lock.LOCK_FILE).exists()


@pytest.mark.slow
def test_allow_config_change_advice_can_be_acted_on_from_the_command_line(local_data, tmp_path, caplog):
    """A change allow_config_change cannot carry over is named as such, with the flags that fix it: never
    Orbax's partial_restore, never moving a healthy checkpoint aside. A data change resumes on the new data."""
    c = tiny(local_data, num_steps=3, eval_every=0, log_every=1)
    train(Experiment.from_config(c), tmp_path)
    c.allow_config_change, c.num_steps = True, 6
    c.model.num_layers = 3
    with pytest.raises(errors.ConfigMismatchError) as e:
        train(Experiment.from_config(c), tmp_path)
    assert re.search(r"\(\d+ arrays differ: params/layers_2/.*: checkpoint absent, config \(.*Undo that change \(the "
                     r"run's config is .*config.json\), or train the new model in a new --workdir\.$", str(e.value))
    c.model.num_layers, c.optimizer.name = 2, "lion"
    with pytest.raises(errors.ConfigMismatchError, match=rf"train_state/opt_state/.*--config.init_from={tmp_path} "
                       r"\(fresh optimizer state\)\.$") as e:
        train(Experiment.from_config(c), tmp_path)
    for message in (str(e.value),):
        assert "partial_restore" not in message and "aside" not in message and "\n" not in message
    c.optimizer.name, c.seq_len = "adamw", 16  # other batches: resumed at the step, on the new data
    with caplog.at_level("WARNING", logger="llama_jax"):
        assert train(Experiment.from_config(c), tmp_path)["step"] == 6
    assert "resuming at step 3 on the new data" in caplog.text


def test_a_fresh_start_logs_each_step_once(local_data, tmp_path):
    """A run killed during its first save leaves no checkpoint but a metrics.jsonl; the rerun starts from
    scratch and must not append its rows to the dead run's."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 9.0}) + "\n"
                                                    for s in range(1, 5)))
    train(Experiment.from_config(tiny(local_data, num_steps=4, eval_every=0, log_every=1)), tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 4] and all(r["train/loss"] != 9.0 for r in read_metrics(tmp_path))


# ---------------------------------------------------------------------- divergence
@pytest.mark.slow
def test_divergence_halts_before_saving_and_a_fixed_lr_resumes(local_data, tmp_path):
    """lr=1e3 from step 20 blows the loss up while it stays finite; the guard halts before any diverged state
    is saved, names the newest (healthy) checkpoint, and the original lr resumes from it to the end."""
    c = tiny(local_data, num_steps=20, eval_every=0, checkpoint_every=5, log_every=1, keep_checkpoints=0)
    train(Experiment.from_config(c), tmp_path)
    healthy = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path)}
    lr = c.optimizer.lr
    c.num_steps, c.optimizer.lr, c.allow_config_change = 40, 1e3, True
    with pytest.raises(errors.TrainingHalted, match=r"newest checkpoint, step 20 .*allow_config_change") as e:
        train(Experiment.from_config(c), tmp_path)
    assert "diverged at step" in str(e.value) or "non-finite" in str(e.value)
    assert checkpoint.all_steps(tmp_path) == [5, 10, 15, 20]  # nothing saved after the blow-up

    c.optimizer.lr = lr  # the fix: the original lr, resumed from step 20
    assert train(Experiment.from_config(c), tmp_path)["step"] == 40
    rows = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path)}
    assert sorted(rows) == list(range(1, 41))  # each step once: the diverged run's rows were dropped
    assert all(rows[s] == healthy[s] for s in range(1, 21)) and max(rows.values()) < 2 * max(healthy.values())


@pytest.mark.slow
def test_resume_step_picks_an_older_checkpoint_and_keeps_the_newer_ones_aside(local_data, tmp_path):
    c = tiny(local_data, num_steps=12, eval_every=0, checkpoint_every=4, log_every=1, keep_checkpoints=0)
    train(Experiment.from_config(c), tmp_path)
    c.resume_step = 5
    with pytest.raises(errors.CheckpointError, match=r"no checkpoint at that step; its checkpoints are at steps \[4, 8, 12\]"):
        train(Experiment.from_config(c), tmp_path)
    c.resume_step, c.num_steps = 4, 10
    assert train(Experiment.from_config(c), tmp_path)["step"] == 10
    assert checkpoint.all_steps(tmp_path) == [4, 8, 10]
    assert sorted(p.split("-")[0] for p in os.listdir(tmp_path / "discarded")) == ["12", "8"]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))


@pytest.mark.slow
def test_resume_step_is_applied_once_and_a_rerun_resumes_from_the_newest(local_data, tmp_path, caplog):
    """The same command again (after it finished, or after a Ctrl-C) must not move the checkpoints it trained
    aside a second time, nor fail once step N has rotated out (keep_checkpoints=3)."""
    c = tiny(local_data, num_steps=12, eval_every=0, checkpoint_every=4, log_every=1, keep_checkpoints=3)
    train(Experiment.from_config(c), tmp_path)
    c.resume_step, c.num_steps = 4, 16
    assert train(Experiment.from_config(c), tmp_path)["step"] == 16
    assert checkpoint.all_steps(tmp_path) == [8, 12, 16]  # 4 rotated out
    c.num_steps = 20  # the same command, with more steps
    with caplog.at_level("WARNING", logger="llama_jax"):
        assert train(Experiment.from_config(c), tmp_path)["step"] == 20
    assert "resume_step=4 was applied by an earlier run" in caplog.text
    assert checkpoint.all_steps(tmp_path) == [12, 16, 20]
    assert sorted(p.split("-")[0] for p in os.listdir(tmp_path / "discarded")) == ["12", "8"]  # moved once
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 21))


def test_rerunning_a_finished_run_reports_it_and_changes_nothing(local_data, tmp_path, caplog):
    c = tiny(local_data, num_steps=4, eval_every=4, log_every=2)
    first = train(Experiment.from_config(c), tmp_path)
    before = sorted((p, p.stat().st_mtime) for p in tmp_path.rglob("*") if p.is_file())
    with caplog.at_level("WARNING", logger="llama_jax"):
        again = train(Experiment.from_config(c), tmp_path)
    assert "nothing to train" in caplog.text and "raise --config.num_steps" in caplog.text
    assert again["step"] == 4 and again["train/loss"] == first["train/loss"]
    assert again["eval/bits_per_byte"] == first["eval/bits_per_byte"]
    assert summarize(again).startswith("step 4: train/loss=")
    assert sorted((p, p.stat().st_mtime) for p in tmp_path.rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_extending_num_steps_on_resume_warns_about_the_schedule(local_data, tmp_path, caplog):
    c = tiny(local_data, num_steps=8, eval_every=0)
    train(Experiment.from_config(c), tmp_path)
    c.num_steps = 20
    with caplog.at_level("WARNING", logger="llama_jax"):
        train(Experiment.from_config(c), tmp_path)
    assert "num_steps 8 -> 20 rescales the cosine schedule: the next update (step 9) uses lr" in caplog.text


def test_summary_names_the_step_its_train_metrics_come_from():
    assert summarize({"step": 37, "train/loss": 2.5, "train/logged_step": 30}) == (
        "step 37: train/loss=2.5 (train/* as logged at step 30)"
    )


def test_a_workdir_that_is_a_file_or_unwritable_is_one_clear_error(local_data, tmp_path):
    c = tiny(local_data, num_steps=2, eval_every=0)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(errors.CheckpointError, match=r"workdir=.*file is a file, not a directory"):
        train(Experiment.from_config(c), tmp_path / "file")
    with pytest.raises(errors.CheckpointError, match=r"cannot write to --workdir=.*file/sub"):
        train(Experiment.from_config(c), tmp_path / "file" / "sub")  # its parent is a file


def test_mfu_on_a_busy_cpu_says_it_reads_high(monkeypatch, caplog):
    """The CPU's matmul peak is measured at start-up; measured under load it is low and MFU reads high."""
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * (os.cpu_count() or 1), 0.0, 0.0))
    with caplog.at_level("WARNING"):
        _, source = peak_flops()
    assert "under load" in source and "train/mfu will read high" in caplog.text
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert "under load" not in peak_flops()[1]


@pytest.mark.slow
def test_named_held_out_sets_are_logged_each_as_if_scored_alone(local_data, tmp_path):
    """data.eval_sets: every evaluation logs eval/<set>/* for the source's held-out file and each named set,
    their token-weighted total as eval/* and their unweighted mean as eval/mean/*, in metrics.jsonl and
    TensorBoard; a set's numbers are those of scoring it alone (eval_ppl --sets=NAME)."""
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "code.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 20, encoding="utf-8")
    with open(sets / "prose.jsonl", "w", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"Paragraph {i}: the held-out prose of a named set, ünïcödé. " * 3}) + "\n")
    c = tiny(local_data, num_steps=4, log_every=2, eval_every=2, checkpoint_every=0)
    c.data.eval_sets = {"code": {"files": str(sets / "*.py")}, "prose": {"files": str(sets / "prose.jsonl")}}
    run = tmp_path / "run"
    train(Experiment.from_config(c), run)
    evals = [r for r in read_metrics(run) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    last, names = evals[-1], ("files", "code", "prose")
    for key in ("loss", "bits_per_byte"):
        per_set = [last[f"eval/{n}/{key}"] for n in names]
        assert last[f"eval/mean/{key}"] == pytest.approx(sum(per_set) / 3, rel=1e-12)
    nll = sum(last[f"eval/{n}/loss"] * last[f"eval/{n}/tokens"] for n in names)
    assert last["eval/loss"] == pytest.approx(nll / sum(last[f"eval/{n}/tokens"] for n in names), rel=1e-9)
    prose_bytes = sum(len(json.loads(line)["text"].encode()) for line in open(sets / "prose.jsonl", encoding="utf-8"))
    assert last["eval/prose/bytes"] == prose_bytes
    alone = inference.evaluate_workdir(run, sets=["prose"])  # the set scored by itself, as eval_ppl does
    assert (alone["tokens"], alone["bytes"], alone["documents"]) == (last["eval/prose/tokens"], prose_bytes, 5)
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert alone[key] == pytest.approx(last[f"eval/prose/{key}"], rel=1e-5), key
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").rglob("*tfevents*"))
    for tag in ("eval/code/loss", "eval/prose/bits_per_byte", "eval/mean/loss", "eval/mean/bits_per_byte"):
        assert tag.encode() in events, tag
