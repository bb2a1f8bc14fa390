"""The lm_eval adapter (llama_jax/inference/harness.py) on its own: packing, compile count, rolling = eval_ppl,
generation stops, the eval_tasks CLI on the shipped offline tasks, the in-loop hook. Parity with lm_eval's
`hf` backend: test_harness_hf.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_jax import inference
from llama_jax.errors import DataError
from llama_jax.inference import harness
from llama_jax.inference.sampling import continuation_text
from llama_jax.train import read_metrics
from tests.helpers import SHAKESPEARE, load_config, run_module, train_config

TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:600]  # several of the tiny model's windows


@pytest.fixture(scope="module")
def lm(hf_tiny_workdir):
    return inference.HarnessLM.from_workdir(hf_tiny_workdir, batch_size=4)


def requests_of(lm, pairs):
    return [((c, x), *lm._encode_pair(c, x)) for c, x in pairs]


PAIRS = [("The king", " is dead"), ("To be or not to be,", " that is the question"), ("Hello", " world"),
         ("A horse! a horse!", " my kingdom for a horse"), ("Now is the winter", " of our discontent"),
         ("Friends, Romans,", " countrymen")] * 3


def test_pack_fills_rows_without_overlap():
    lengths = [5, 9, 3, 7, 7, 2, 10, 1]
    where = harness.pack(lengths, 10)
    used = {}
    for n, (r, c) in zip(lengths, where):
        assert c + n <= 10
        for col in range(c, c + n):
            assert (r, col) not in used
            used[(r, col)] = True
    assert max(r for r, _ in where) + 1 == 5  # 44 tokens in rows of 10


def test_packed_scores_equal_scores_alone_and_compile_once(hf_tiny_workdir):
    """Requests packed together score exactly as each alone (segment ids keep them apart, padding is never
    scored), and every call, whatever its requests' lengths, runs the one compiled step."""
    lm = inference.HarnessLM.from_workdir(hf_tiny_workdir, batch_size=4)
    reqs = requests_of(lm, PAIRS)
    packed = lm._loglikelihood_tokens(reqs)
    alone = [lm._loglikelihood_tokens([r])[0] for r in reqs[:6]]
    np.testing.assert_allclose([p[0] for p in packed[:6]], [a[0] for a in alone], atol=1e-4)
    assert [p[1] for p in packed[:6]] == [a[1] for a in alone]
    assert all(p[0] < 0 for p in packed)
    assert lm.traces == 1
    # A direct forward of the first request alone gives the same sum.
    (_, ctx, cont) = reqs[0]
    inp, tgt = harness.request_tokens(ctx, cont, lm.max_length)
    rows = harness.empty_rows(1, lm.max_length)
    rows["inputs"][0, :len(inp)], rows["targets"][0, :len(inp)] = inp, tgt
    rows["positions"][0, :len(inp)], rows["segment_ids"][0, :len(inp)] = np.arange(len(inp)), 1
    logprob, _ = lm._score_rows(rows)
    assert abs(logprob[0, len(inp) - len(cont):len(inp)].sum() - packed[0][0]) < 1e-4


def test_long_contexts_are_left_truncated_to_max_length():
    inp, tgt = harness.request_tokens(list(range(100)), [100, 101], 16)
    assert inp == list(range(85, 101)) and tgt == list(range(86, 102))  # the last 17 tokens, as hf keeps


def test_rolling_equals_eval_ppl_on_the_same_text(lm, hf_tiny_workdir, tmp_path):
    """loglikelihood_rolling scores eval_ppl's windows: over a text of several windows its sum is eval_ppl's
    total NLL (with the EOS lm_eval does not score left out)."""
    from lm_eval.api.instance import Instance

    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)])[0]
    ref = inference.evaluate_workdir(hf_tiny_workdir, text_file=str(f), seq_len=lm.max_length,
                                     data_overrides={"add_eos": False})
    assert ref["tokens"] > 2 * lm.max_length  # several windows
    assert got == pytest.approx(-ref["loss"] * ref["tokens"], rel=1e-5)


@pytest.mark.slow  # > 10 s: lm_eval's task index, a subprocess, or the sampler's compile
def test_generate_until_stops_at_until_and_max_gen_toks(lm):
    from lm_eval.api.instance import Instance

    def gen(**kw):
        return lm.generate_until([Instance("generate_until", {}, ("The king", kw), 0)])[0]

    prompt = lm.tok_encode("The king")
    ids = inference.generate(lm.params, lm.model_config, [prompt], max_new_tokens=24, eos_id=lm.stops)[0]
    free = gen(until=[], max_gen_toks=24)
    assert free == continuation_text(lm.tokenizer, prompt, ids) and free  # the sampler's greedy text
    assert gen(until=[], max_gen_toks=3) == continuation_text(lm.tokenizer, prompt, ids[:3])
    stop = next(ch for ch in free[1:] if ch.strip())  # a character the free generation produces
    cut = gen(until=[stop], max_gen_toks=24)
    assert cut == free[:free.index(stop)]


@pytest.mark.slow
def test_eval_tasks_cli_on_the_shipped_offline_tasks(hf_tiny_workdir, tmp_path):
    out = tmp_path / "results.json"
    r = run_module("experiments.eval_tasks", f"--workdir={hf_tiny_workdir}",
                   "--tasks=llama_jax_tiny_mc,llama_jax_tiny_ppl,llama_jax_tiny_gen", "--limit=8",
                   f"--output={out}", check=True)
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= line["lm_eval/llama_jax_tiny_mc/acc"] <= 1 and line["lm_eval/llama_jax_tiny_ppl/bits_per_byte"] > 0
    assert "exact_match" in " ".join(line) and "|llama_jax_tiny_mc|" in r.stdout.replace(" ", "")
    assert json.loads(out.read_text())["results"]["llama_jax_tiny_mc"]["acc,none"] == line["lm_eval/llama_jax_tiny_mc/acc"]


@pytest.mark.slow  # > 10 s: lm_eval's task index, a subprocess, or the sampler's compile
def test_eval_tasks_cli_names_the_fix_for_an_unknown_task(hf_tiny_workdir):
    r = run_module("experiments.eval_tasks", f"--workdir={hf_tiny_workdir}", "--tasks=no_such_task")
    assert r.returncode != 0 and "unknown lm_eval task(s) ['no_such_task']" in r.stderr


@pytest.mark.slow  # > 10 s: lm_eval's task index, a subprocess, or the sampler's compile
def test_a_task_that_cannot_download_names_the_local_variant(hf_tiny_workdir, tmp_path):
    """Offline (an empty HF cache, the Hub's offline mode), lm_eval's arc_easy fails with one line naming the fix."""
    r = run_module("experiments.eval_tasks", f"--workdir={hf_tiny_workdir}", "--tasks=arc_easy", "--limit=2",
                   env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("eval_tasks: ")]
    assert r.returncode == 1 and len(line) == 1, r.stderr[-3000:]
    assert "could not download their data" in line[0] and "arc_easy_local" in line[0] and "--task_data_dir" in line[0]


@pytest.mark.slow  # > 10 s: lm_eval's task index, a subprocess, or the sampler's compile
def test_a_local_task_without_its_files_names_where_to_put_them(lm, tmp_path):
    with pytest.raises(DataError, match="do not exist: download them there"):
        harness.run_tasks(lm, ["arc_easy_local"], data_dir=str(tmp_path), limit=2)


@pytest.mark.slow
def test_the_training_loop_logs_lm_eval_metrics(tmp_path, shakespeare_path):
    """config.eval_tasks runs the adapter on the live params every N steps: lm_eval/<task>/<metric> rows in
    metrics.jsonl, as a sweep ranks them."""
    config = load_config("tiny")
    config.data.train_files = str(shakespeare_path)
    config.num_steps, config.eval_every, config.checkpoint_every = 4, 0, 0
    config.eval_tasks.tasks, config.eval_tasks.every, config.eval_tasks.limit = "llama_jax_tiny_mc", 2, 4
    train_config(config, tmp_path / "w")
    rows = [r for r in read_metrics(str(tmp_path / "w")) if "lm_eval/llama_jax_tiny_mc/acc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["lm_eval/llama_jax_tiny_mc/acc"] in (0, 0.25, 0.5, 0.75, 1) for r in rows)
