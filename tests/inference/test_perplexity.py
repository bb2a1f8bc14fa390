"""Perplexity evaluation: exact losses against direct forwards, sliding windows, counts, workdirs, CLI.

Token counting convention (llama_jax/data/__init__.py, "Held-out eval"): a document is tokenized [BOS] ids [EOS] and
BOS is never scored, so a text of n tokens scores n + 1 (the byte tokenizer: len(text.encode()) + 1), and
bits/byte divides by exactly len(text.encode()).
"""

from __future__ import annotations

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from llama_jax import checkpoint, data, inference
from llama_jax.data import ByteTokenizer, DataConfig, load_tokenizer
from llama_jax.errors import CheckpointError, ConfigError, DataError, TokenizerError
from llama_jax.model import Llama, init_params, param_shapes, preset
from llama_jax.train import MetricWriter, read_metrics
from tests.helpers import run_module

CFG = preset("tiny")  # max_seq_len 128, vocab 384
TEXT = "Héllo, wörld! Ünïcödé bytes — and a few more words to make it longer.\n"


@pytest.fixture(scope="module")
def mesh():
    return inference.inference_mesh(data=-1)  # all 8 emulated devices, data parallel


@pytest.fixture(scope="module")
def rules():
    return inference.workdir_rules({})


@pytest.fixture(scope="module")
def params():
    # Larger-than-init weights: peaked, context-dependent predictions (init gives ~uniform ones).
    return jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, init_params(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def sharded_params(params, mesh, rules):
    return jax.device_put(params, inference.param_shardings(CFG, mesh, rules))


def token_nlls(params, cfg, contexts: list[list[int]], targets: list[int]) -> np.ndarray:
    """NLL of targets[i] after exactly contexts[i], each a full forward from position 0 (right-padded)."""
    width = max(len(c) for c in contexts)
    arr = np.zeros((len(contexts), width), np.int32)
    for i, c in enumerate(contexts):
        arr[i, : len(c)] = c
    logits = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t))(params, jnp.asarray(arr))
    logp = log_softmax(np.asarray(logits, np.float64), axis=-1)  # float64 numpy: an exact reference
    last = np.array([len(c) - 1 for c in contexts])
    return -np.asarray(logp)[np.arange(len(contexts)), last, np.asarray(targets)]


def stream_of(text: str, tokenizer=None) -> list[int]:
    tok = tokenizer or ByteTokenizer()
    return [tok.bos_id, *tok.encode(text), tok.eos_id]


# ---------------------------------------------------------------------- window layout
@pytest.mark.parametrize("stride", [None, 1, 3, 7, 8])
@pytest.mark.parametrize("spans", [[(0, 30)], [(0, 9)], [(0, 2), (2, 13), (13, 14), (14, 40)]])
def test_windows_score_every_target_once_with_the_promised_context(stride, spans):
    L = 8
    w = data.window_layout([a for a, _ in spans], [b for _, b in spans], L, stride)
    scored = {}  # stream position -> tokens of context it was predicted from
    for s, n, f in zip(w.start, w.length, w.first):
        assert 1 <= n <= L and 0 <= f < n
        for col in range(f, n):
            t = s + col + 1
            assert t not in scored
            scored[t] = col + 1
    targets = [t for a, b in spans for t in range(a + 1, b)]
    assert sorted(scored) == targets
    for a, b in spans:
        for t in range(a + 1, b):
            if stride is None:  # non-overlapping windows of L targets from the span start
                assert scored[t] == (t - a - 1) % L + 1
            elif t - a <= L:  # first window: everything before it in the span
                assert scored[t] == t - a
            else:
                assert scored[t] >= L - stride + 1
                if stride == 1:
                    assert scored[t] == L


def test_no_stride_windows_are_the_concat_rows():
    docs = data.Documents.from_texts(["first document, fairly long " * 3, "two", "", "x"])
    ev = data.eval_windows(docs, ByteTokenizer(), seq_len=16, batch_size=4)
    n = len(ev.stream.tokens)
    windowed = data.EvalData(ev.stream, data.window_layout([0], [n], 16), ByteTokenizer(), batch_size=4)
    assert (windowed.num_tokens, windowed.num_bytes) == (ev.num_tokens, ev.num_bytes)
    pairs = list(zip(ev.batches(process_index=0, process_count=1), windowed.batches(process_index=0, process_count=1)))
    assert len(pairs) == ev.num_batches == windowed.num_batches
    for a, b in pairs:
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_stride_keeps_token_and_byte_counts(packing):
    texts = ["A long document that spans several windows of sixteen tokens. " * 4, "ünï", "short one"]
    docs = data.Documents.from_texts(texts)
    counts = set()
    for stride in (0, 1, 5, 16):
        ev = data.eval_windows(docs, ByteTokenizer(), DataConfig(packing=packing), seq_len=16, batch_size=8, stride=stride)
        masks = [b["loss_mask"].sum() for b in ev.batches(process_index=0, process_count=1)]
        byts = [b["target_bytes"].sum() for b in ev.batches(process_index=0, process_count=1)]
        assert sum(masks) == ev.num_tokens and sum(byts) == ev.num_bytes
        counts.add((ev.num_tokens, ev.num_bytes))
    nbytes = sum(len(t.encode()) for t in texts)
    assert counts == {(nbytes + len(texts), nbytes)}  # bytes + one EOS per document; BOS never scored


def test_bad_stride_and_empty_text_are_clear_errors():
    docs = data.Documents.from_texts([TEXT])
    with pytest.raises(DataError, match="stride"):
        data.eval_windows(docs, ByteTokenizer(), seq_len=16, batch_size=8, stride=17)
    with pytest.raises(DataError, match="no text"):
        data.eval_windows(data.Documents.from_texts([""]), ByteTokenizer(), seq_len=16, batch_size=8)


# ---------------------------------------------------------------------- exact losses
def test_loss_equals_a_direct_full_forward(params, sharded_params, mesh, rules):
    ids = stream_of(TEXT)
    assert len(ids) <= 128  # one window
    ev = data.eval_windows(data.Documents.from_texts([TEXT]), ByteTokenizer(), seq_len=128, batch_size=8)
    got = inference.perplexity(sharded_params, CFG, ev, mesh=mesh, rules=rules)

    logits = Llama(CFG).apply({"params": params}, jnp.asarray([ids[:-1]]))
    logp = log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    n_bytes = len(TEXT.encode("utf-8"))
    assert got["tokens"] == len(ids) - 1 == n_bytes + 1  # every byte and the EOS
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll.sum() / (n_bytes * math.log(2)), rel=1e-5)


@pytest.mark.parametrize("stride", [None, 1])
def test_each_token_is_scored_with_exactly_its_window_context(params, sharded_params, mesh, rules, stride):
    """stride=1: every token after the first window is predicted from exactly its L preceding tokens;
    no stride: from the tokens since the start of its (non-overlapping) window."""
    L = 16
    text = TEXT[:45]
    ids = stream_of(text)
    ev = data.eval_windows(data.Documents.from_texts([text]), ByteTokenizer(), seq_len=L, batch_size=8, stride=stride)
    got = inference.perplexity(sharded_params, CFG, ev, mesh=mesh, rules=rules)
    ts = range(1, len(ids))
    starts = [max(0, t - L) if stride == 1 else (t - 1) // L * L for t in ts]
    nll = token_nlls(params, CFG, [ids[s:t] for s, t in zip(starts, ts)], [ids[t] for t in ts])
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5)


def test_several_sets_keep_each_sets_numbers_with_their_total_and_mean(sharded_params, mesh, rules):
    """combine: each set's keys are its own result, the total is weighted by tokens (bytes for bits/byte),
    the mean counts each set once; a single set keeps today's keys (no eval/mean/*)."""
    texts = {"short": [TEXT], "long": ["The quick brown fox jumps over the lazy dog. " * 6, "ünï"]}
    results = {}
    for name, docs in texts.items():
        ev = data.eval_windows(data.Documents.from_texts(docs), ByteTokenizer(), seq_len=32, batch_size=8)
        r = inference.perplexity(sharded_params, CFG, ev, mesh=mesh, rules=rules)
        results[name] = {f"eval/{k}": v for k, v in r.items()}
    assert results["short"]["eval/loss"] != pytest.approx(results["long"]["eval/loss"], rel=1e-2)
    got = inference.combine(results)
    for name, r in results.items():
        for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
            assert got[f"eval/{name}/{k}"] == r[f"eval/{k}"]
    short, long = results["short"], results["long"]
    nll = short["eval/loss"] * short["eval/tokens"] + long["eval/loss"] * long["eval/tokens"]
    assert got["eval/loss"] == pytest.approx(nll / (short["eval/tokens"] + long["eval/tokens"]), rel=1e-12)
    assert got["eval/bits_per_byte"] == pytest.approx(nll / (short["eval/bytes"] + long["eval/bytes"]) / math.log(2),
                                                      rel=1e-12)
    assert got["eval/mean/loss"] == pytest.approx((short["eval/loss"] + long["eval/loss"]) / 2, rel=1e-12)
    assert got["eval/mean/bits_per_byte"] == pytest.approx(
        (short["eval/bits_per_byte"] + long["eval/bits_per_byte"]) / 2, rel=1e-12)
    assert got["eval/mean/loss"] != pytest.approx(got["eval/loss"], rel=1e-3)  # sizes differ: mean != total
    totals = (got["eval/tokens"], got["eval/bytes"])
    assert totals == (short["eval/tokens"] + long["eval/tokens"], short["eval/bytes"] + long["eval/bytes"])
    assert all(isinstance(n, int) for n in totals)  # counts, exact: eval_ppl prints them as such
    assert inference.combine({"short": short}) == short  # one set: its keys, unchanged


# ---------------------------------------------------------------------- workdirs
def test_hf_imported_workdir(hf_tiny_workdir, tmp_path):
    hf_workdir = hf_tiny_workdir  # conftest: the tiny preset, random weights, a 300-id BPE tokenizer.json
    cfg = checkpoint.read_model_config(hf_workdir)
    params = checkpoint.restore_params(hf_workdir, param_shapes(cfg))
    tok = load_tokenizer(checkpoint.tokenizer_dir(hf_workdir))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    got = inference.evaluate_workdir(hf_workdir, text_file=str(f))
    ids = stream_of(TEXT, tok)
    nll = token_nlls(params, cfg, [ids[:t] for t in range(1, len(ids))], ids[1:])
    assert got["tokens"] == len(tok.encode(TEXT)) + 1 and got["bytes"] == len(TEXT.encode())
    assert got["seq_len"] == cfg.max_seq_len and got["step"] == 0
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll.sum() / (len(TEXT.encode()) * math.log(2)), rel=1e-5)


@pytest.mark.slow  # 13 s: two eval_ppl subprocesses
def test_an_imported_workdir_says_which_seq_len_and_batch_it_scored(hf_tiny_workdir, trained_tiny_workdir, tmp_path,
                                                                    caplog):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    with caplog.at_level("WARNING", logger="llama_jax"):
        got = inference.evaluate_workdir(hf_tiny_workdir, text_file=str(f))
    assert (f"{hf_tiny_workdir} records no training seq_len (an imported checkpoint): scoring windows of "
            f"seq_len={got['seq_len']} (min(max_seq_len, 2048)) in batches of {got['batch_size']}; pass --seq_len=N") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llama_jax"):
        inference.evaluate_workdir(hf_tiny_workdir, text_file=str(f), seq_len=32)  # asked for: nothing to say
        inference.evaluate_workdir(trained_tiny_workdir, text_file=str(f))  # its training seq_len
    assert "records no training seq_len" not in caplog.text


def test_trained_workdir_held_out_split_and_stride(trained_tiny_workdir):
    eval_text = (trained_tiny_workdir.parent / "data" / "eval.txt").read_text(encoding="utf-8")
    plain = inference.evaluate_workdir(trained_tiny_workdir)  # the workdir's own data.eval_files
    assert plain["tokens"] == len(eval_text.encode()) + 1 and plain["bytes"] == len(eval_text.encode())
    assert (plain["seq_len"], plain["step"], plain["batch_size"]) == (64, 20, 8)
    strided = inference.evaluate_workdir(trained_tiny_workdir, stride=32)
    assert (strided["tokens"], strided["bytes"]) == (plain["tokens"], plain["bytes"])
    assert plain["loss"] < math.log(CFG.vocab_size)  # it learned something
    assert abs(strided["loss"] - plain["loss"]) < 0.1


def test_eval_ppl_cli(trained_tiny_workdir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 3, encoding="utf-8")
    r = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", f"--text_file={f}", "--stride=16",
                   timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    n_bytes = len((TEXT * 3).encode())
    assert (result["tokens"], result["bytes"], result["stride"]) == (n_bytes + 1, n_bytes, 16)
    expected = inference.evaluate_workdir(trained_tiny_workdir, text_file=str(f), stride=16)
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key


@pytest.mark.slow
def test_eval_ppl_scores_several_sets_in_one_table(trained_tiny_workdir, tmp_path):
    """--set_files adds held-out sets to the workdir's own, --sets picks some; stderr has one table (a row per
    set, their mean and total) and a bar per set, stdout the JSON line; each row is that set scored alone."""
    (tmp_path / "a.txt").write_text(TEXT * 3, encoding="utf-8")
    (tmp_path / "b.txt").write_text("Some other held-out text.\n" * 5, encoding="utf-8")
    (tmp_path / "c.txt").write_text("ROMEO: a third file.\n", encoding="utf-8")
    r = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", f"--set_files=text={tmp_path}/a.txt",
                   f"--set_files=more={tmp_path}/b.txt,{tmp_path}/c.txt", timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(result["sets"]) == ["files", "more", "text"]  # the workdir's own held-out file, then the sets
    assert result["sets"]["more"]["documents"] == 2 and result["documents"] == 4
    alone = inference.evaluate_workdir(trained_tiny_workdir, text_file=str(tmp_path / "a.txt"))
    for key in ("loss", "bits_per_byte", "tokens", "bytes"):
        assert result["sets"]["text"][key] == pytest.approx(alone[key], rel=1e-5), key
    losses = [s["loss"] for s in result["sets"].values()]
    assert result["mean/loss"] == pytest.approx(sum(losses) / 3, rel=1e-9)
    lines = r.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("set "))
    table = [line.split() for line in lines[start:start + 6]]
    assert table[0] == ["set", "documents", "tokens", "bytes", "nats/token", "perplexity", "bits/byte"]
    assert [row[0] for row in table[1:]] == ["files", "more", "text", "mean", "total"]
    more = result["sets"]["more"]
    assert table[2][1:] == ["2", str(more["tokens"]), str(more["bytes"]), f"{more['loss']:.4f}",
                            f"{more['perplexity']:.3f}", f"{more['bits_per_byte']:.4f}"]
    assert table[4][1:] == [f"{result['mean/loss']:.4f}", f"{result['mean/bits_per_byte']:.4f}"]
    assert re.search(r"eval more: 100%", r.stderr) and re.search(r"eval text: 100%", r.stderr)

    only = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", "--sets=text",
                      f"--set_files=text={tmp_path}/a.txt", timeout=300)
    assert only.returncode == 0, only.stderr
    one = json.loads(only.stdout.strip().splitlines()[-1])
    assert "sets" not in one and one["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    picked = inference.evaluate_workdir(trained_tiny_workdir, sets=["files"], set_files={"more": f"{tmp_path}/c.txt"})
    assert list(picked["sets"]) == ["files", "more"]  # --sets picks among the workdir's; --set_files ones join
    bad = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", "--sets=wiki", timeout=300)
    assert bad.returncode != 0 and "no held-out set named ['wiki']; this config has ['files']" in bad.stderr


@pytest.mark.slow
def test_bad_set_files_is_one_clear_error(trained_tiny_workdir, tmp_path):
    r = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", f"--set_files={tmp_path}/a.txt",
                   timeout=300)
    assert r.returncode != 0 and "is not NAME=GLOBS; write e.g. --set_files='wiki=" in r.stderr
    with pytest.raises(ConfigError, match="'files' is already a source's name"):
        inference.evaluate_workdir(trained_tiny_workdir, set_files={"files": str(tmp_path / "a.txt")})


# ---------------------------------------------------------------------- errors
def test_missing_workdir_checkpoint_and_text_file_are_clear_errors(trained_tiny_workdir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*experiments.train"):
        inference.evaluate_workdir(tmp_path / "nope")
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(trained_tiny_workdir / "config.json", empty / "config.json")
    shutil.copytree(trained_tiny_workdir / "tokenizer", empty / "tokenizer")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        inference.evaluate_workdir(empty)
    with pytest.raises(DataError, match="missing.txt does not exist"):
        inference.evaluate_workdir(trained_tiny_workdir, text_file=str(tmp_path / "missing.txt"))


def test_a_text_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path):
    """The same one-line DataError training gives; raised before the workdir is read."""
    f = tmp_path / "latin1.txt"
    f.write_bytes("ROMEO:\nCaf\u00e9 ou th\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8: byte 0xe9 at byte offset 10 .*Re-encode"):
        inference.evaluate_workdir(tmp_path / "never_read", text_file=str(f))


def test_tokenizer_larger_than_model_vocab_is_a_clear_error(trained_tiny_workdir, tmp_path):
    small = tmp_path / "small_vocab"
    small.mkdir()
    cfg = json.loads((trained_tiny_workdir / "config.json").read_text())
    cfg["model"]["vocab_size"] = 256  # the byte tokenizer needs 259
    (small / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(trained_tiny_workdir / "tokenizer", small / "tokenizer")
    with pytest.raises(TokenizerError, match="vocab_size=259"):
        inference.evaluate_workdir(small)


def test_step_without_a_checkpoint_lists_the_steps_that_exist(trained_tiny_workdir):
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7; .* at steps \[20\]"):
        inference.load_workdir(trained_tiny_workdir, step=7)


def test_workdir_that_is_a_file_is_a_clear_error(trained_tiny_workdir, tmp_path):
    file = tmp_path / "config.json"
    shutil.copy(trained_tiny_workdir / "config.json", file)  # an easy slip: naming the workdir's config
    with pytest.raises(CheckpointError, match="config.json is a file, not a directory"):
        inference.load_workdir(file)


# ---------------------------------------------------------------------- non-finite results
def _strict(line: str) -> dict:
    """json.loads that rejects NaN / Infinity, as strict JSON readers do."""
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))


def test_an_overflowing_eval_loss_gives_inf_perplexity_in_strict_json(tmp_path):
    """A diverged model's eval loss above ~710 nats once crashed training in math.exp, before its checkpoint."""
    eval_step = lambda params, batch: {"nll_sum": np.float32(1e6), "tokens": np.float32(100.0)}  # 10,000/token
    result = inference.evaluate(eval_step, lambda b: b, None, [{}], num_bytes=50)
    assert result["eval/loss"] == 1e4 and result["eval/perplexity"] == math.inf
    writer = MetricWriter(str(tmp_path))
    writer.write(7, {**result, "train/loss": float("nan")})
    writer.close()
    row = _strict((tmp_path / "metrics.jsonl").read_text().strip())
    assert row["eval/perplexity"] is None and row["train/loss"] is None and row["eval/loss"] == 1e4
    assert row["nonfinite"] == ["eval/perplexity", "train/loss"]
    assert read_metrics(str(tmp_path))[0]["step"] == 7


def test_eval_ppl_on_damaged_params_exits_nonzero_with_strict_json(trained_tiny_workdir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_tiny_workdir, damaged)
    cfg = checkpoint.read_model_config(damaged)
    params = checkpoint.restore_params(damaged, param_shapes(cfg))
    checkpoint.save_params(damaged, jax.tree.map(lambda p: p * np.nan, params), step=21)
    r = run_module("experiments.eval_ppl", f"--workdir={damaged}", timeout=300)
    assert r.returncode == 1, r.stderr
    result = _strict(r.stdout.strip().splitlines()[-1])
    assert result["loss"] is None and "loss" in result["nonfinite"] and result["step"] == 21
    assert f"eval_ppl: the loss of {damaged} on " in r.stderr and "--step=N" in r.stderr


def test_eval_ppl_shows_a_progress_bar_on_stderr(trained_tiny_workdir, tmp_path):
    """A long eval is not silent: a tqdm bar over the eval batches (rate, count) goes to stderr, not stdout."""
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 3, encoding="utf-8")
    r = run_module("experiments.eval_ppl", f"--workdir={trained_tiny_workdir}", f"--text_file={f}", timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"eval: 100%.*\| (\d+)/\1 \[.*(it/s|s/it)\]", r.stderr), r.stderr
    json.loads(r.stdout.strip().splitlines()[-1])  # stdout is still just the JSON line


def test_evaluate_shows_a_bar_only_when_asked(sharded_params, mesh, rules, capsys):
    """Off by default: the train loop's eval hook calls evaluate() without `progress` (it has its own bar)."""
    ev = data.eval_windows(data.Documents.from_texts([TEXT * 4]), ByteTokenizer(), seq_len=32, batch_size=8)
    quiet = inference.perplexity(sharded_params, CFG, ev, mesh=mesh, rules=rules)
    assert "eval:" not in capsys.readouterr().err
    shown = inference.perplexity(sharded_params, CFG, ev, mesh=mesh, rules=rules, progress=True)
    assert re.search(rf"eval: 100%.*\| {ev.num_batches}/{ev.num_batches} \[", capsys.readouterr().err)
    assert shown == quiet
