"""The lm_eval adapter against lm_eval's own Hugging Face backend (`hf`: transformers on the CPU, float32) on
the same tiny random Llama (conftest's hf_tiny_workdir and the HF dir it was imported from): the same
requests give the same log-likelihoods (within 1e-3 nats), is-greedy flags, accuracy and greedy text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llama_jax import inference

pytest.importorskip("torch", reason="lm_eval's hf backend runs PyTorch transformers: pip install -e '.[torch]'")
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

pytestmark = pytest.mark.slow  # loading both backends and lm_eval's task index takes > 10 s

TOL = 1e-3


@pytest.fixture(scope="module")
def hf_dir(hf_tiny_workdir, tmp_path_factory):
    """The HF checkpoint the workdir came from, with the special tokens transformers' tokenizer needs named."""
    d = tmp_path_factory.mktemp("hf") / "hf"
    shutil.copytree(hf_tiny_workdir.parent / "hf", d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.fixture(scope="module")
def ours(hf_tiny_workdir):
    return inference.HarnessLM.from_workdir(hf_tiny_workdir, batch_size=4)


@pytest.fixture(scope="module")
def theirs(hf_dir):
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4, max_length=128)


def samples(lm, task):
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=[harness_tasks()]),
                          log_samples=True)
    return out["results"][task], out["samples"][task]


def harness_tasks():
    from llama_jax.inference.harness import tasks_dir

    return tasks_dir()


def test_multiple_choice_matches_the_hf_backend(ours, theirs):
    (r1, s1), (r2, s2) = samples(ours, "llama_jax_tiny_mc"), samples(theirs, "llama_jax_tiny_mc")
    a = [resp[0] for s in s1 for resp in s["resps"]]  # (loglikelihood, is_greedy) per choice
    b = [resp[0] for s in s2 for resp in s["resps"]]
    assert len(a) == len(b) == 64
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=TOL, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert r1["acc,none"] == r2["acc,none"] and r1["acc_norm,none"] == r2["acc_norm,none"]


def test_loglikelihood_and_rolling_match_the_hf_backend(ours, theirs):
    """Requests with an empty context (the prefix token), a context longer than max_length (left-truncated),
    and rolling texts that fit one window."""
    long = "To be, or not to be, that is the question: " * 20
    pairs = [("", "Hello world"), ("The king", " is dead"), (long, " Whether"), ("Friends,", " Romans")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    a, b = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=TOL, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
    texts = ["Now is the winter of our discontent.", "A horse! a horse! my kingdom for a horse!"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling),
                               atol=TOL, rtol=0)


def test_greedy_generation_matches_the_hf_backend(ours, theirs):
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}), i)
            for i, p in enumerate(["The king", "Now is the winter"])]
    assert ours.generate_until(reqs) == theirs.generate_until(reqs)
