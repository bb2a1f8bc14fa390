"""Weighted mixtures: exact proportions per block, every source's samples consumed in order, stages, the
same batches for any number of processes, per-source epochs, and a weight too small to give a row."""

import logging

import numpy as np
import pytest

from llama_jax import data, errors
from tests.data.test_data import IntTokenizer, int_docs

NAMES = ["a", "b", "c"]


def mixture(stages, batch_size=6, block=10, seed=0):
    return data.Mixture(NAMES, stages, batch_size=batch_size, block=block, seed=seed)


def test_each_block_has_exact_proportions_and_each_source_is_read_in_order():
    m = mixture([(0, {"a": 0.5, "b": 0.3, "c": 0.2})])
    source, k = m.locate(np.arange(1000))
    for b in range(100):
        assert np.bincount(source[b * 10 : (b + 1) * 10], minlength=3).tolist() == [5, 3, 2]
    for i in range(3):
        assert np.array_equal(k[source == i], np.arange((source == i).sum()))  # no gap, no repeat
    assert m.consumed(1000).tolist() == [500, 300, 200] and m.consumed(7).tolist() == np.bincount(
        source[:7], minlength=3).tolist()
    assert not np.array_equal(source[:10], source[10:20])  # positions are shuffled per block
    again, k2 = mixture([(0, {"a": 0.5, "b": 0.3, "c": 0.2})]).locate(np.arange(1000)[::-1])
    assert np.array_equal(again[::-1], source) and np.array_equal(k2[::-1], k)  # a pure function of g


def test_stages_change_the_weights_and_keep_each_source_in_order():
    # Stage 1 starts at step 7 = sample 42, inside a block of 10: its partial block is accounted exactly.
    m = mixture([(0, {"a": 0.5, "b": 0.5, "c": 0.0}), (7, {"a": 0.1, "b": 0.1, "c": 0.8})])
    source, k = m.locate(np.arange(200))
    assert not (source[:42] == 2).any() and (source[42:52] == 2).sum() == 8
    for i in range(3):
        assert np.array_equal(k[source == i], np.arange((source == i).sum()))
    assert m.consumed(200).tolist() == np.bincount(source, minlength=3).tolist()


def test_a_weight_that_gives_no_rows_is_an_error_and_weights_are_normalized(caplog):
    with pytest.raises(errors.ConfigError, match=r"source 'c' has weight 0.0002 \(normalized\), which gives it no "
                                                r"rows in a mixture block of 1024 rows: raise its weight to at "
                                                r"least 0.000977 or raise data.mixture_block"):
        mixture([(0, {"a": 0.6, "b": 0.3998, "c": 0.0002})], block=1024)
    with caplog.at_level(logging.INFO, logger="llama_jax"):
        m = mixture([(0, {"a": 2, "b": 1, "c": 1})], block=8)
    assert "sum to 4: normalized to a=0.5, b=0.25, c=0.25" in caplog.text
    assert m.counts[0].tolist() == [4, 2, 2]
    with pytest.raises(errors.ConfigError, match="all 0"):
        mixture([(0, {"a": 0, "b": 0, "c": 0})])


def test_stages_config_is_checked():
    c = data.DataConfig(sources={"a": {"train_files": "x"}, "b": {"train_files": "y"}}, stages="100:a=1,b=3")
    assert c.stage_weights() == ((0, {"a": 1.0, "b": 1.0}), (100, {"a": 1.0, "b": 3.0}))
    for bad, match in (("100:a=1", "must give a weight to each source"), ("a=1,b=2", "cannot read"),
                       ("0:a=1,b=1", "must increase")):
        with pytest.raises(errors.ConfigError, match=match):
            data.DataConfig(sources={"a": {"train_files": "x"}, "b": {"train_files": "y"}}, stages=bad)
    with pytest.raises(errors.ConfigError, match=r"unknown field\(s\) \['wieght'\] in data.sources.a"):
        data.DataConfig(sources={"a": {"train_files": "x", "wieght": 2}})


def two_sources(tmp_path, **options):
    """A big source (300 documents) and a small one (5), weighted 1:1, as local .jsonl shards."""
    for name, n, shards in (("big", 300, 3), ("small", 5, 1)):
        for s in range(shards):
            lines = [f'{{"text": "{name} {s} {j} ' + "w " * (j % 13) + '"}' for j in range(n // shards)]
            (tmp_path / f"{name}-{s}.jsonl").write_text("\n".join(lines) + "\n")
        (tmp_path / f"{name}-eval.jsonl").write_text(f'{{"text": "held out {name}"}}\n')
    sources = {n: {"train_files": str(tmp_path / f"{n}-[0-9].jsonl"), "eval_files": str(tmp_path / f"{n}-eval.jsonl"),
                   "weight": 0.5} for n in ("big", "small")}
    return data.DataConfig(sources=sources, mixture_block=8, shuffle_shards=2, **options)


def test_a_small_source_repeats_while_a_big_one_streams(tmp_path):
    cfg = two_sources(tmp_path)
    td = data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=32, batch_size=8, seed=1)
    small, big = td.sources["small"], td.sources["big"]
    assert small.rows_per_epoch < 20 < big.rows_per_epoch
    steps = 2 * small.rows_per_epoch // 4 + 1  # 4 small rows a step: past two small epochs
    seen = td.seen(steps)
    assert seen["data/small/epochs"] > 2 > 1 > seen["data/big/epochs"]
    assert seen["data/small/tokens"] == seen["data/big/tokens"] == steps * 4 * 32
    triples = np.concatenate([td.rows_for_step(s, 0, 1) for s in range(steps)])
    s_rows = [tuple(t[1:]) for t in triples if td.names[t[0]] == "small"]
    R = small.rows_per_epoch
    for e in range(2):  # each small epoch reads each of its rows once
        assert len(set(s_rows[e * R : (e + 1) * R])) == R


@pytest.mark.parametrize("processes", [2, 4])
def test_the_global_batch_is_the_same_for_any_number_of_processes(tmp_path, processes):
    td = data.TrainData.from_config(two_sources(tmp_path, packing="packed"), data.ByteTokenizer(), seq_len=32,
                                    batch_size=8, seed=1)
    for step in (0, 3, 40):
        whole = td.batch_for_step(step, 0, 1)
        parts = [td.batch_for_step(step, p, processes) for p in range(processes)]
        for k in whole:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    # A state saved by one process count resumes the same batches on another (the state is the step).
    with td.iterator(0, process_index=1, process_count=2) as it:
        for _ in range(5):
            next(it)
        state = it.state()
    with td.iterator(state, process_index=0, process_count=1, prefetch=0) as it:
        assert all(np.array_equal(next(it)[k], td.batch_for_step(5 + i, 0, 1)[k]) for i in range(3)
                   for k in ("inputs",))


def test_one_source_config_equals_from_documents():
    """A mixture of one source is that source: sample g is its sample g."""
    docs = int_docs([30, 12, 50, 7])
    td = data.TrainData.from_documents(docs, IntTokenizer(), seq_len=8, batch_size=3, seed=2)
    source, k = td.mixture.locate(np.arange(50))
    assert not source.any() and np.array_equal(k, np.arange(50))
