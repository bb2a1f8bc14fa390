"""Checkpoints: shape checks that name every param, restoring across scan_layers layouts, older layouts."""

import asyncio
import gc
import logging
import re
import shutil

import jax
import numpy as np
import pytest

from llama_jax import checkpoint, errors, sharding
from llama_jax.experiment import Experiment, base_config
from llama_jax.model import init_params, param_shapes, preset, stack_layers, to_layout

CFG = preset("tiny", num_heads=8, num_kv_heads=4, dim=128)


def _sharded_abstract(cfg, mesh):
    rules = sharding.resolve_rules(sharding.ShardingConfig(rule_set="fsdp_tp"))
    shapes = param_shapes(cfg)
    specs = sharding.param_specs(shapes, rules.params, mesh)
    shardings = sharding.named_shardings(mesh, specs)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


@pytest.mark.slow
@pytest.mark.parametrize("saved_scanned", [False, True])
def test_restore_into_the_other_layer_layout_sharded(tmp_path, saved_scanned):
    params = init_params(CFG, jax.random.key(0))
    saved_cfg = CFG.replace(scan_layers=saved_scanned)
    checkpoint.save_params(tmp_path, to_layout(params, saved_cfg))
    want_cfg = CFG.replace(scan_layers=not saved_scanned)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    abstract = _sharded_abstract(want_cfg, mesh)
    restored = checkpoint.restore_params(tmp_path, abstract)
    expected = to_layout(params, want_cfg)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want, a in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == a.sharding


def test_shape_mismatch_names_every_param(tmp_path):
    checkpoint.save_params(tmp_path, stack_layers(init_params(CFG, jax.random.key(0))))
    with pytest.raises(errors.CheckpointError, match=r"(?s)differ.*mlp.*down_proj.*model \(2, 96, 128\)"):
        checkpoint.restore_params(tmp_path, param_shapes(CFG.replace(scan_layers=True, ffn_dim=96)))


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(errors.CheckpointError, match="train first"):
        checkpoint.restore_params(tmp_path, param_shapes(CFG))
    with pytest.raises(errors.CheckpointError, match="not a llama_jax workdir"):
        checkpoint.read_config(tmp_path)


def test_a_train_state_from_the_older_layout_is_refused_with_the_fix(tmp_path):
    """Workdirs written before the dropout rng was deleted hold an "rng" leaf in their train state: resuming
    them is refused with what to do, and their params still restore (evaluation and sampling work)."""
    params = init_params(CFG, jax.random.key(0))
    mngr = checkpoint.manager(tmp_path)
    old_rest = {"opt_state": {}, "step": np.int32(4), "rng": np.zeros(2, np.uint32), "consecutive_skips": np.int32(0)}
    checkpoint.save_train_state(mngr, 4, params, old_rest, {"step": 4})
    mngr.wait_until_finished()
    rest = {"opt_state": {}, "step": jax.ShapeDtypeStruct((), np.int32),
            "consecutive_skips": jax.ShapeDtypeStruct((), np.int32)}
    with pytest.raises(errors.CheckpointError, match=r"older llama_jax.*--config.init_from="):
        checkpoint.restore_train_state(mngr, 4, param_shapes(CFG), rest)
    mngr.close()
    got = checkpoint.restore_params(tmp_path, param_shapes(CFG))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def _flip_bits(path, offsets):
    data = bytearray(path.read_bytes())
    for o in offsets:
        data[o % len(data)] ^= 1 << (o % 8)
    path.write_bytes(bytes(data))


def _params_files(workdir, step):
    root = workdir / "checkpoints" / str(step) / "params"
    return sorted((p for p in root.rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: -p.stat().st_size)


def test_flipped_bits_in_a_params_file_are_caught_naming_the_array(tmp_path):
    """Orbax stores zstd chunks with no checksum of the data: a flipped bit either breaks decoding or, before
    checksums, restored as a wrong value, silently. Every flip must now be a CheckpointError that names the
    checkpoint and the older one to use; flips the decoder misses name the damaged array."""
    params = init_params(CFG, jax.random.key(0))
    for step in (1, 2):
        checkpoint.save_params(tmp_path, params, step=step)
    assert checkpoint.restore_params(tmp_path, param_shapes(CFG)) is not None  # intact: verifies and loads
    biggest = _params_files(tmp_path, 2)[0]
    pristine = biggest.read_bytes()
    outcomes = []
    for i in range(24):  # single bits spread over the whole file
        biggest.write_bytes(pristine)
        _flip_bits(biggest, [(i * len(pristine) // 24 + 7) * 8 + i % 8])
        with pytest.raises(errors.CheckpointError, match=r"--step=1") as e:
            checkpoint.restore_params(tmp_path, param_shapes(CFG))
        outcomes.append("damaged" if "is damaged" in str(e.value) else "unreadable")
        if outcomes[-1] == "damaged":  # names the array: "... differ from the checksums written with it (['embed']..."
            assert re.search(r"checkpoints/2 is damaged: 1 array\(s\) differ from the checksums written with it "
                             r"\(\['\w+'\]", str(e.value)), str(e.value)
    assert outcomes.count("damaged") >= 3, outcomes  # flips that decode fine are common; checksums catch them


def test_a_workdir_written_before_a_field_existed_still_resumes(tmp_path):
    """config.json from an older version lacks fields added since (model.loss_chunk, mesh.num_slices,
    data.format): they equal their defaults, so resuming is not refused; changing one still is."""
    new = Experiment.from_config(base_config("tiny")).to_dict()
    old = {**new, "model": dict(new["model"]), "mesh": dict(new["mesh"]), "data": dict(new["data"])}
    del old["model"]["loss_chunk"], old["mesh"]["num_slices"], old["data"]["format"]
    checkpoint.write_config(tmp_path, old)
    checkpoint.check_resume_config(tmp_path, new)
    changed = {**new, "model": {**new["model"], "loss_chunk": 64}}
    with pytest.raises(errors.ConfigMismatchError, match="model.loss_chunk: 0 -> 64"):
        checkpoint.check_resume_config(tmp_path, changed)


def test_logging_to_wandb_on_resume_is_not_a_config_change(tmp_path):
    """wandb_project says where a run logs, not what it computes: a workdir written before the field existed,
    or without W&B, resumes with it turned on."""
    new = Experiment.from_config(base_config("tiny")).to_dict()
    old = {k: v for k, v in new.items() if k != "wandb_project"}
    checkpoint.write_config(tmp_path, old)
    checkpoint.check_resume_config(tmp_path, {**new, "wandb_project": "ablations"})


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_checkpoint_without_a_readable_checksum_record_restores_only_with_a_loud_warning(tmp_path, caplog, damage):
    """Without its record a flipped bit would restore silently: the restore must say so, name the checkpoint
    and the older one to use."""
    params = init_params(CFG, jax.random.key(0))
    for step in (1, 2):
        checkpoint.save_params(tmp_path, params, step=step)
    record = tmp_path / "checkpoints" / "2" / "checksums"
    if damage == "missing":
        shutil.rmtree(record)
    else:
        for f in record.rglob("*"):
            if f.is_file():
                f.write_text("{not json")
    with caplog.at_level("WARNING", logger="llama_jax"):
        got = checkpoint.restore_params(tmp_path, param_shapes(CFG))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert re.search(r"checkpoints/2 has no readable checksum record .* UNVERIFIED.* --step=1", caplog.text), caplog.text


@pytest.mark.parametrize("damaged", ["_METADATA", "manifest.ocdbt", "d"])
def test_a_damaged_orbax_metadata_or_btree_file_is_one_line_naming_the_older_step(tmp_path, damaged):
    """What eval_ppl, sample and load_workdir read: a damaged metadata, manifest or b-tree node file is the
    same one-line CheckpointError as damaged data, without Orbax's traceback or TensorStore's spec dump."""
    params = init_params(CFG, jax.random.key(0))
    for step in (1, 2):
        checkpoint.save_params(tmp_path, params, step=step)
    root = tmp_path / "checkpoints" / "2" / "params"
    target = next((root / "d").iterdir()) if damaged == "d" else root / damaged  # d/: the b-tree nodes
    target.write_bytes(b"\0garbage" * 4)
    with pytest.raises(errors.CheckpointError) as e:
        checkpoint.restore_params(tmp_path, param_shapes(CFG))
    message = str(e.value)
    assert re.fullmatch(r".*/checkpoints/2 cannot be read, its files are damaged \(.+\)\. Use an older checkpoint with --step=1\.",
                        message), message
    assert "tensorstore_spec" not in message and len(message) < 600


def test_after_a_damaged_restore_only_orbax_leftover_reports_are_dropped_from_the_asyncio_log(tmp_path, caplog):
    """Orbax's abandoned reads report through asyncio's logger as "Task exception ..." or "Future exception
    was never retrieved", whichever the timing hits (CI once hit the Future wording); both are dropped,
    asyncio's other records still show."""
    params = init_params(CFG, jax.random.key(0))
    checkpoint.save_params(tmp_path, params, step=1)
    next((tmp_path / "checkpoints" / "1" / "params" / "d").iterdir()).write_bytes(b"garbage")
    with pytest.raises(errors.CheckpointError):
        checkpoint.restore_params(tmp_path, param_shapes(CFG))

    async def fail():
        raise ValueError("an abandoned read")

    loop = asyncio.new_event_loop()
    with caplog.at_level("ERROR", logger="asyncio"):
        future = loop.create_future()
        future.set_exception(ValueError("an abandoned read"))
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0))
        del future, task
        gc.collect()
        logging.getLogger("asyncio").error("some other asyncio error")
    loop.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["some other asyncio error"]


def test_moving_the_data_is_not_a_config_change(tmp_path):
    """data_dir, manual_dir and cache_dir (of the section or of a source) say where the text is found: a run
    trained online resumes offline from a manual dir, or on machines with other paths. Which text is read is
    checked by the data state's fingerprint."""
    cfg = base_config("tiny")
    cfg.data.sources = {"web": {"tfds_name": "tiny_shakespeare"}}
    new = Experiment.from_config(cfg).to_dict()
    checkpoint.write_config(tmp_path, new)
    moved = {**new, "data": {**new["data"], "data_dir": "/elsewhere", "manual_dir": "/manual",
                             "cache_dir": "/cache",
                             "sources": {"web": {**new["data"]["sources"]["web"], "data_dir": "gs://b/tfds"}}}}
    checkpoint.check_resume_config(tmp_path, moved)
    other = {**new, "data": {**new["data"], "sources": {"web": {**new["data"]["sources"]["web"],
                                                                "tfds_name": "other"}}}}
    with pytest.raises(errors.ConfigMismatchError, match="data.sources.web.tfds_name"):
        checkpoint.check_resume_config(tmp_path, other)


def test_moving_a_held_out_set_is_not_a_config_change(tmp_path):
    """data.eval_sets entries follow the same rule: their data_dir / manual_dir say where, their split or
    files say which text is scored."""
    cfg = base_config("tiny")
    cfg.data.eval_sets = {"test": {"split": "test"}}
    new = Experiment.from_config(cfg).to_dict()
    checkpoint.write_config(tmp_path, new)
    moved = {**new, "data": {**new["data"], "eval_sets": {"test": {"split": "test", "manual_dir": "/m",
                                                                   "data_dir": "gs://b/tfds"}}}}
    checkpoint.check_resume_config(tmp_path, moved)
    other = {**new, "data": {**new["data"], "eval_sets": {"test": {"split": "validation"}}}}
    with pytest.raises(errors.ConfigMismatchError, match="data.eval_sets.test.split: 'test' -> 'validation'"):
        checkpoint.check_resume_config(tmp_path, other)
