"""Optional Weights & Biases logging (loop.wandb_project): the scalars of metrics.jsonl, read back from
wandb's offline run files; a resumed run continues the same W&B run; without wandb installed, one line
naming the extra, before the workdir is touched."""

import json
import struct
import sys

import pytest

from llama_jax import errors
from llama_jax.experiment import Experiment
from llama_jax.train import read_metrics, train
from tests.train.test_loop import tiny


def offline_history(run_dir) -> dict[int, dict]:
    """{step: scalars} of an offline run's run-ID.wandb: a LevelDB-format log (wandb's 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type) of protobuf Records; wandb 0.31
    reads it only in its Go core, so it is parsed here."""
    from wandb.proto import wandb_internal_pb2

    block, full, first, last = 32768, 1, 2, 4
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, record, rows = 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        record = chunk if kind in (full, first) else record + chunk
        if kind in (full, last):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                rows[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_jsonl_scalars_and_a_resume_continues_it(
        local_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='needs wandb (pip install -e ".[wandb]")')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    workdir = tmp_path / "run"
    c = tiny(local_data, num_steps=4, log_every=2, eval_every=2, checkpoint_every=4, wandb_project="llama_jax_test")
    train(Experiment.from_config(c), workdir)
    (first,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    expected: dict[int, dict] = {}
    for row in read_metrics(workdir):
        expected.setdefault(row.pop("step"), {}).update(row)
    assert sorted(expected) == [2, 4] and "eval/bits_per_byte" in expected[4] and "train/loss" in expected[4]
    logged = offline_history(first)
    assert sorted(logged) == [2, 4]
    for step, row in expected.items():
        assert logged[step] == pytest.approx(row), step

    c.num_steps = 6  # the rerun resumes from step 4 and logs step 6 to the same W&B run
    train(Experiment.from_config(c), workdir)
    (second,) = set((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")) - {first}
    run_id = (workdir / "wandb_run_id").read_text()
    assert first.name.endswith(run_id) and second.name.endswith(run_id)
    (loss,) = [r["train/loss"] for r in read_metrics(workdir) if r["step"] == 6 and "train/loss" in r]
    assert offline_history(second)[6]["train/loss"] == pytest.approx(loss)


def test_wandb_asked_for_but_not_installed_is_one_line_before_the_workdir_is_touched(local_data, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as without the extra
    with pytest.raises(errors.ConfigError, match=r'wandb is not installed: pip install -e "\.\[wandb\]"'):
        train(Experiment.from_config(tiny(local_data, num_steps=2, wandb_project="p")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
