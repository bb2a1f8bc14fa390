"""The planner and what the TPU compiler says of our programs: compiled by libtpu for TPU slices on this CPU.

Skipped, with the reason, only where libtpu is not installed (`pip install -e ".[tpu]"`; CI installs it).
"""

import dataclasses
import importlib.util
import json
import re

import jax
import numpy as np
import pytest

from llama_jax import sharding
from llama_jax.errors import ShardingError
from llama_jax.experiment import Experiment, base_config
from llama_jax.model import param_shapes
from llama_jax.tools import hlo, plan_search, planner, tpu
from tests.helpers import REPO, load_config, run_module

pytest.importorskip("libtpu", reason="needs libtpu, the TPU compiler: pip install -e '.[tpu]'")


def _exp(preset="tiny", *, batch=8, seq=128, mesh=(-1, 1, 1), **model) -> Experiment:
    c = base_config(preset, **{"max_seq_len": max(seq, 128), **model})
    c.batch_size, c.seq_len = batch, seq
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return Experiment.from_config(c)


def _hlo_shapes(exp, topology):
    """The compiled train step's HLO text, for reading buffer shapes."""
    _, lowered, _ = planner._lower(exp, tpu.abstract_devices(topology), "train", (0, 0))
    return lowered.compile().as_text()


@pytest.mark.parametrize("topology", ["v4-8", "v5litepod-8"])
def test_a_tiny_config_compiles_and_fits(topology):
    report = planner.plan(_exp(), topology, estimate=False)
    assert report.fits and 0 < report.memory["peak"] < report.slice.hbm_bytes
    m = report.memory
    assert m["total"] == m["argument"] + m["output"] + m["temp"] - m["alias"] and m["peak"] <= m["total"]
    # The train step donates its state: the outputs alias the arguments.
    assert report.memory["alias"] > 0.9 * report.memory["output"]
    # The compiled matmuls are at least the model's (forward + backward), and the batch-replicated
    # gradients are all-reduced over the data axis.
    assert 1.0 <= report.matmul_flops / report.model_flops < 1.6
    assert "all-reduce" in report.collectives
    # Data parallel: every chip holds all f32 params.
    assert report.ledger["params"] == sum(np.prod(a.shape) * 4 for a in jax.tree.leaves(param_shapes(_exp().model)))


@pytest.mark.slow
def test_a_lora_train_step_compiles_fewer_matmul_flops_than_the_full_fine_tune():
    full = planner.plan(_exp(), "v5litepod-8", estimate=False)
    lora = {"rank": 4, "targets": (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")}
    exp = Experiment.from_config({**_exp().to_dict(), "init_from": "/base", "lora": lora})  # the plan reads no base
    report = planner.plan(exp, "v5litepod-8", estimate=False)
    assert report.fits and report.full_flops == full.model_flops
    # Every projection adapted, yet no base weight gradient: the compiled matmuls drop by about N of 6N.
    assert report.matmul_flops < 0.85 * full.matmul_flops
    # The model's count includes the first layer's input gradient, which nothing needs and XLA drops (3.5%
    # of this 2-layer model; a rounding error at 32 layers).
    assert 0.93 <= report.matmul_flops / report.model_flops < 1.6
    assert report.model_flops / report.full_flops < 0.75
    assert "LoRA: the model's 4N + 6 x adapter params is" in "\n".join(report.lines())


def test_an_oversized_config_is_reported_as_not_fitting_with_the_compilers_numbers():
    # f32 logits alone: 2048 rows x 128 tokens x 32768 vocab x 4 B = 32 GiB per chip of a 16 GiB v5e.
    exp = _exp(batch=8 * 2048, seq=128, vocab_size=32768)
    report = planner.plan(exp, "v5litepod-8", estimate=False)
    assert not report.fits
    assert report.required_bytes > report.slice.hbm_bytes
    text = "\n".join(report.lines())
    assert "does not fit" in text and "to fit:" in text and "remat policy" in text
    assert "RESOURCE_EXHAUSTED" in report.oom


def test_splash_attention_lowers_through_mosaic_in_the_sharded_train_step():
    """GQA (4 heads over 2 kv heads of 128), packed segment ids, fsdp x tensor: the Mosaic kernel is in the
    compiled program (not Pallas interpret mode, whose grid would be XLA while loops)."""
    exp = _exp(batch=8, seq=512, mesh=(1, 4, 2), dim=512, num_heads=4, num_kv_heads=2, attention_impl="auto",
               dtype="bfloat16")
    text = _hlo_shapes(exp, "v5p-16")
    summary = hlo.analyze(text)
    assert summary.custom_calls.get("tpu_custom_call", 0) >= 2  # forward and backward kernels
    assert not any((loop.trip_count or 0) > 64 for loop in summary.loops)  # no interpreted grid


def _f32_logit_buffers(text: str, rows: int, seq: int, vocab: int) -> list[str]:
    """f32 arrays holding a [rows, seq, vocab] (or flattened) block of logits, in the HLO text."""
    pattern = rf"f32\[(?:{rows},{seq},{vocab}|{rows * seq},{vocab})[,\]]"
    return re.findall(pattern, text)


@pytest.mark.slow
def test_the_chunked_loss_has_no_f32_tokens_by_vocab_buffer():
    """Per chip: 2 rows x 512 tokens; the vocab (1024) split over tensor 2."""
    args = dict(batch=8, seq=512, mesh=(1, 4, 2), vocab_size=1024, dtype="bfloat16")
    plain = _hlo_shapes(_exp(**args), "v5p-16")
    chunked = _hlo_shapes(_exp(**args, loss_chunk=128), "v5p-16")
    assert _f32_logit_buffers(plain, 2, 512, 512)  # the check finds them where they are
    assert not _f32_logit_buffers(chunked, 2, 512, 512)
    assert re.search(r"f32\[2,128,512\]", chunked)  # one chunk's logits instead


def test_the_saved_residual_stream_is_sharded_over_tensor():
    """Layers 3, 4 rows x 256 tokens per chip (batch 16 over fsdp 4), dim 128: the sequence split over
    tensor 2 (sequence parallelism) -> each layer's saved input is [4, 128, 128], not [4, 256, 128]."""
    exp = _exp(batch=16, seq=256, mesh=(1, 4, 2), dim=128, num_layers=3, scan_layers=True, remat_policy="full",
               dtype="bfloat16")
    text = _hlo_shapes(exp, "v5p-16")
    assert re.search(r"bf16\[3,4,128,128\]", text)
    assert not re.search(r"bf16\[3,4,256,128\]", text)


def test_a_config_whose_mesh_is_fixed_for_one_device_is_planned_with_data_over_the_slice():
    """configs/shakespeare.py sets mesh.data=1 (one CPU): planned for v5litepod-8, its data axis takes the 8
    chips, and the report says so and names the flag that trains it there (the README's --step=eval example)."""
    report = planner.plan(Experiment.from_config(load_config("shakespeare")), "v5litepod-8", step="eval",
                          estimate=False)
    assert report.fits and report.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert "--config.mesh.data=-1" in report.mesh_note and report.mesh_note in report.lines()
    # A mesh with a -1 axis, or one that cannot fit the slice by data alone, is the config's own.
    assert planner.fit_mesh(sharding.MeshConfig(data=2, fsdp=-1), 8) == (sharding.MeshConfig(data=2, fsdp=-1), "")
    assert planner.fit_mesh(sharding.MeshConfig(data=1, fsdp=3), 8) == (sharding.MeshConfig(data=1, fsdp=3), "")


@pytest.mark.slow
def test_multi_slice_mesh_puts_data_across_slices():
    devices = tpu.abstract_devices("v5p-16", num_slices=2)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=8, num_slices=2), devices)
    grid = mesh.devices  # [data, fsdp, tensor]
    assert {d.slice_index for d in grid[0].flat} == {0} and {d.slice_index for d in grid[1].flat} == {1}
    with pytest.raises(ShardingError, match="num_slices=1 but the 16 devices are in 2 slice"):
        sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=8), devices)
    with pytest.raises(ShardingError, match="does not split over mesh.num_slices=2"):
        sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, num_slices=2), devices)
    report = planner.plan(_exp(batch=16, mesh=(2, 8, 1)), "v5p-16", num_slices=2, estimate=False)
    assert report.fits and report.mesh == {"data": 2, "fsdp": 8, "tensor": 1}


@pytest.mark.slow
def test_search_finds_the_largest_fitting_batch():
    # The mesh the search compiles (fsdp 8), so that the check of batch + 8 below compiles the same program.
    exp = _exp(batch=8, seq=512, vocab_size=32768, remat_policy="full", dtype="bfloat16", mesh=(1, 8, 1))
    found = plan_search.search(exp, "v5litepod-8", meshes=[(8, 1)], policies=("full",))
    batch, exact = found.largest[(8, 1), "full"]
    assert exact and batch > 8 and batch % 8 == 0
    # Ranked: fitting compiles only, at the config's batch and the largest, most tokens/s/chip first.
    assert {r.batch_size for r in found.ranked} == {8, batch} and all(r.fits for r in found.ranked)
    speeds = [r.tokens_per_s_per_chip for r in found.ranked]
    assert speeds == sorted(speeds, reverse=True)
    bigger = dataclasses.replace(exp, loop=exp.loop.replace(batch_size=batch + 8))
    assert not planner.plan(bigger, "v5litepod-8", estimate=False).fits


def test_eval_and_decode_steps_compile():
    for step in ("eval", "decode"):
        report = planner.plan(_exp(), "v5litepod-8", step=step, estimate=False, decode_lengths=(32, 32))
        assert report.fits and report.step == step


@pytest.mark.slow
def test_the_time_estimate_extrapolates_unrolled_compiles():
    report = planner.plan(_exp(batch=8, seq=256, dtype="bfloat16"), "v5litepod-8")
    assert report.compiler_s and report.estimate_s == report.compiler_s and "per layer" in report.estimate_note
    assert 0 < report.mfu < 1
    # Where both exist the HLO model, collectives not overlapped, is printed beside it with their ratio. On
    # this toy program (dim 64, 0.1 ms) it is 0.11 (libtpu 0.0.42.1): the compiler's figure is mostly fixed
    # per-op cost, which a roofline leaves out.
    ratio = report.cost.exposed_s / report.compiler_s
    assert 0 < ratio < 1 and f"compiler = {ratio:.2f}" in "\n".join(report.lines())


@pytest.mark.slow
def test_a_tensor_parallel_plan_gets_a_time_from_the_hlo_model():
    """fsdp x tensor: the step the compiler's cost model cannot time (XLA's windowed matmul loops), timed
    by the roofline model of the compiled HLO, with its parts and what it implies."""
    report = planner.plan(_exp(batch=8, seq=512, mesh=(1, 4, 2), dim=512, num_heads=4, num_kv_heads=2,
                               dtype="bfloat16"), "v5p-16", estimate=False)
    c = report.cost
    assert report.estimate_s == c.exposed_s > c.overlapped_s > 0 and c.ici_s > 0 and c.dcn_s == 0
    assert "the HLO model" in report.estimate_note and 0 < report.mfu <= 1
    chips = 8
    assert report.tokens_per_s_per_chip == pytest.approx(8 * 512 / (report.estimate_s * chips))
    text = "\n".join(report.lines())
    assert "an estimate, not a measurement" in text and "tokens/s/chip" in text and "ICI" in text
    out = report.to_json()
    assert out["estimate_s"] == report.estimate_s and out["hlo_model_s"]["exposed_s"] == c.exposed_s


@pytest.mark.slow
def test_a_multi_slice_plan_prints_a_positive_time_with_the_dcn_part():
    """The issue's case: across slices the compiler's 2-layer estimate came out below its 1-layer one, and
    the extrapolation printed a negative time and MFU. Now either estimate is positive or not printed."""
    report = planner.plan(_exp(batch=16, mesh=(2, 8, 1), dtype="bfloat16"), "v5p-16", num_slices=2)
    assert report.fits and report.estimate_s > 0 and 0 < report.mfu <= 1
    # The gradient all-reduce over data crosses the slices, and it is all that does: DCN time is its traffic
    # (2 (n - 1) / n of it for 2 slices), nothing of the permutes within a slice.
    count, nbytes = report.collectives["all-reduce across slices"]
    assert count > 0 and report.cost.dcn_s == pytest.approx(nbytes / tpu.parse_slice("v5p-16").dcn_bytes_per_s, rel=0.05)
    assert report.compiler_s is None or report.compiler_s > 0
    assert not re.search(r"-\d", "\n".join(_time_lines_only(report)))


def _time_lines_only(report):
    return [line for line in report.lines() if "time" in line or "model" in line or "compiler" in line]


def test_an_estimate_that_implies_over_100_percent_mfu_is_not_printed():
    report = planner.plan(_exp(), "v4-8", estimate=False)
    report.compiler_s, report.compiler_note = report.cost.exposed_s / 1e6, "a made-up estimate"
    seconds, note = planner._choose_estimate(report)
    assert seconds == report.cost.exposed_s and "the HLO model" in note  # the impossible one is passed over
    report.cost = None
    assert planner._choose_estimate(report)[0] is None


def _documented_topology(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOPOLOGY


TPU_CONFIGS = sorted(p for p in (REPO / "configs").glob("*_tpu.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TPU_CONFIGS, ids=lambda p: p.stem)
def test_every_tpu_config_fits_its_documented_topology(path):
    """The full-depth scanned step, exactly as configured, with at least 10% of HBM to spare."""
    report = planner.plan(Experiment.from_config(load_config(path.stem)), _documented_topology(path), estimate=False)
    assert report.fits, "\n".join(report.lines())
    assert report.memory["peak"] < 0.9 * report.slice.hbm_bytes, "\n".join(report.lines())


@pytest.mark.slow
def test_plan_cli_prints_the_report_and_exits_by_the_fit():
    ok = run_module("experiments.plan", "--config=configs/tiny.py", "--topology=v4-8", "--noestimate")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits: peak" in ok.stdout and json.loads(ok.stdout.strip().splitlines()[-1])["fits"] is True
    big = run_module("experiments.plan", "--config=configs/tiny.py", "--topology=v5litepod-8", "--noestimate",
                     "--config.batch_size=16384", "--config.model.vocab_size=32768")
    assert big.returncode == 1 and "does not fit" in big.stdout
    bad = run_module("experiments.plan", "--config=configs/tiny.py", "--topology=v5p-100")
    assert bad.returncode == 1 and "v5p-N (TensorCores" in bad.stderr


@pytest.mark.slow
def test_the_readme_eval_plan_runs_and_twice_stores_nothing_in_the_compilation_cache(tmp_path):
    """The README's `plan --config=configs/shakespeare.py --topology=v5litepod-8 --step=eval`, twice with one
    persistent compilation cache: a program compiled for absent TPU chips cannot be loaded back (jax warned
    "Error reading persistent compilation cache entry" on the second run), so the planner stores none."""
    args = ("experiments.plan", "--config=configs/shakespeare.py", "--topology=v5litepod-8", "--step=eval")
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for _ in range(2):
        r = run_module(*args, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
        assert "compilation cache" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
