"""experiments.sample: output == prompt + the decoded `sampling.generate` continuation of [BOS] + prompt,
on a trained workdir and an HF-imported one (params sharded over a tensor-parallel mesh); clear errors."""

from __future__ import annotations

import shutil
import subprocess

import jax
import numpy as np
import pytest

from llama_jax import checkpoint, inference
from llama_jax.model import param_shapes
from tests.helpers import run_module


def run_sample(*args) -> subprocess.CompletedProcess:
    return run_module("experiments.sample", *args, timeout=300)


def expected_text(path, prompt: str, max_new_tokens: int, **sampling_args) -> tuple[str, list[int]]:
    """What the CLI should print, from generate() on params restored unsharded on one device."""
    model_config, params, tok, _ = inference.load_workdir(path)
    prompt_ids = [tok.bos_id, *tok.encode(prompt)]
    new = inference.generate(
        params, model_config, [prompt_ids], max_new_tokens=max_new_tokens, eos_id=tok.eos_id, **sampling_args
    )[0]
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    before = tok.decode(prompt_ids)
    return prompt + tok.decode(prompt_ids + new)[len(before) :] + "\n", new


@pytest.mark.slow
def test_greedy_on_trained_workdir_matches_generate(trained_tiny_workdir):
    prompt = "ROMEO:\nWhat say"
    r = run_sample(f"--workdir={trained_tiny_workdir}", f"--prompt={prompt}", "--max_new_tokens=24", "--temperature=0")
    assert r.returncode == 0, r.stderr
    want, new = expected_text(trained_tiny_workdir, prompt, 24)
    assert len(new) > 0
    assert r.stdout.startswith(prompt) and len(r.stdout) > len(prompt) + 1
    assert r.stdout == want


@pytest.mark.slow
def test_sampling_on_hf_workdir_with_tensor_parallel_params(hf_tiny_workdir):
    prompt = "SPEAKER ONE: a prompt of words"
    args = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    r = run_sample(
        f"--workdir={hf_tiny_workdir}", f"--prompt={prompt}", "--max_new_tokens=16", "--temperature=0.9",
        "--top_k=50", "--top_p=0.95", "--seed=7", "--mesh_tensor=2",
    )
    assert r.returncode == 0, r.stderr
    want, new = expected_text(hf_tiny_workdir, prompt, 16, **args)
    assert len(set(new)) > 3  # a random model: varied tokens, so matching them means something
    assert r.stdout == want


def test_missing_workdir_is_a_clear_error(tmp_path):
    r = run_sample(f"--workdir={tmp_path / 'nope'}", "--prompt=hi")
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "experiments.train" in r.stderr
    assert "Traceback" not in r.stderr



def test_a_damaged_checkpoint_is_one_line_without_event_loop_noise(trained_tiny_workdir, tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(trained_tiny_workdir, workdir)
    node = next((workdir / "checkpoints" / "20" / "params" / "d").iterdir())  # an OCDBT b-tree node
    node.write_bytes(b"garbage")
    r = run_sample(f"--workdir={workdir}", "--prompt=hi", "--max_new_tokens=4")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "(--traceback shows where it was raised)", r.stderr
    assert lines[0].startswith(f"sample: {workdir}/checkpoints/20 cannot be read, its files are damaged (")
    assert lines[0].endswith("It is the only checkpoint.")


def test_non_finite_params_are_refused_in_one_line(trained_tiny_workdir, tmp_path):
    """Before, the sampler decoded NaN logits to NUL bytes and exited 0."""
    workdir = tmp_path / "workdir"
    shutil.copytree(trained_tiny_workdir, workdir)
    params = checkpoint.restore_params(workdir, param_shapes(checkpoint.read_model_config(workdir)))
    checkpoint.save_params(workdir, jax.tree.map(lambda p: p * np.nan, params), step=21)
    r = run_sample(f"--workdir={workdir}", "--prompt=hi", "--max_new_tokens=4")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"sample: {workdir} step 21 holds non-finite params: ")
    assert "Sample an earlier checkpoint with --step=N (the steps are [20, 21])." in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr
