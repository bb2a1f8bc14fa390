"""The token cache: built once (resumably, split between workers), read by range, refused when it does not
match the run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llama_jax import data, errors
from llama_jax.data import tokenizer as tk
from tests.data.test_files import write_shard
from tests.helpers import REPO


def corpus(tmp_path, shards=5, docs=20):
    """`shards` .jsonl.zst shards of `docs` distinct documents each, and a held-out file."""
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(shards):
        write_shard(d / f"part-{i:02d}.jsonl.zst", [f"shard {i} doc {j} " + "word " * (j % 7 * 9) for j in range(docs)])
    write_shard(d / "heldout.jsonl", ["held-out text number one", "and two"])
    return str(d / "part-*.jsonl.zst"), str(d / "heldout.jsonl")


def train_of(cfg: data.DataConfig, tokenizer=None, **kw):
    return data.TrainData.from_config(cfg, tokenizer or data.ByteTokenizer(), seq_len=16, batch_size=6, seed=3,
                                      **kw)


def batches(td, steps=12):
    return [td.batch_for_step(s, 0, 1) for s in range(steps)]


def same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_training_from_the_cache_equals_training_in_memory(tmp_path, packing):
    train, held = corpus(tmp_path)
    opts = dict(train_files=train, eval_files=held, packing=packing, shuffle_shards=2)
    memory = train_of(data.DataConfig(**opts))
    cached_cfg = data.DataConfig(**opts, cache_dir=str(tmp_path / "cache"))
    built = train_of(cached_cfg)
    again = train_of(cached_cfg)
    assert same(batches(memory), batches(built)) and same(batches(built), batches(again))
    root = tmp_path / "cache" / "files" / "train"
    assert sorted(p.name for p in root.glob("*.done.json")) == [f"shard-{i:05d}.done.json" for i in range(5)]
    if packing == "packed":  # next-fit row counts are computed once and kept
        assert (root / "rows-packed-16.json").exists()
    shard = built.sources["files"].shard(0)[0]
    assert isinstance(shard.tokens, data.TokenFile)  # read by range, never loaded
    ev = data.eval_sets(cached_cfg, data.ByteTokenizer(), seq_len=16, batch_size=4)["files"]
    assert ev.num_bytes == len("held-out text number one") + len("and two")
    assert (tmp_path / "cache" / "files" / "eval" / "shard-00000.done.json").exists()


def test_workers_split_the_shards_and_a_rerun_builds_nothing(tmp_path):
    train, held = corpus(tmp_path)
    cfg = data.DataConfig(train_files=train, eval_files=held)
    (src_cfg,) = cfg.source_configs()
    source = data.source_for_role(src_cfg, cfg, "train")

    def cache():
        return data.Cache(str(tmp_path / "c"), source, data.ByteTokenizer(), add_bos=True, add_eos=True)

    assert cache().build(0, 2) == [0, 2, 4]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    assert cache().build(1, 2) == [1, 3]
    assert cache().build(0, 1) == []  # everything is built: nothing is redone
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished shards were not touched


def test_a_corrupt_shard_stops_the_build_and_keeps_finished_shards(tmp_path):
    train, held = corpus(tmp_path)
    bad = tmp_path / "corpus" / "part-03.jsonl.zst"
    bad.write_bytes(bad.read_bytes()[:-20])
    cfg = data.DataConfig(train_files=train, eval_files=held, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(errors.DataError, match=r"part-03\.jsonl\.zst is corrupt or truncated"):
        train_of(cfg)
    done = sorted(p.name for p in (tmp_path / "cache" / "files" / "train").glob("*.done.json"))
    assert done == [f"shard-{i:05d}.done.json" for i in range(3)]


def test_a_cache_that_does_not_match_is_refused_by_name(tmp_path, shakespeare_path):
    train, held = corpus(tmp_path)
    cfg = data.DataConfig(train_files=train, eval_files=held, cache_dir=str(tmp_path / "cache"))
    train_of(cfg)
    root = tmp_path / "cache" / "files" / "train"
    sp = tk.train_sentencepiece([shakespeare_path.read_text()[:20000]], tmp_path / "sp", vocab_size=400)
    with pytest.raises(errors.DataError, match=rf"the token cache {root} was built with another tokenizer "
                                                r"\('byte-v1'; this run has 'sp-.*'\)\. Delete .* to rebuild it"):
        train_of(cfg, sp)
    with pytest.raises(errors.DataError, match="built with another data.add_eos"):
        train_of(cfg.replace(add_eos=False))
    part = tmp_path / "corpus" / "part-01.jsonl.zst"
    saved, mtime = part.read_bytes(), part.stat().st_mtime_ns
    write_shard(part, ["a different text"])
    with pytest.raises(errors.DataError, match=r"shard .*part-01\.jsonl\.zst changed after the token cache .* was "
                                                r"built \(size:version"):
        train_of(cfg)
    part.unlink()
    with pytest.raises(errors.DataError, match=r"shard .*part-01\.jsonl\.zst of the token cache .* no longer exists"):
        train_of(cfg)
    part.write_bytes(saved)
    os.utime(part, ns=(mtime, mtime))
    train_of(cfg)  # restored as it was: the cache is good again
    write_shard(tmp_path / "corpus" / "part-09.jsonl.zst", ["new"])
    with pytest.raises(errors.DataError, match=r"1 shard\(s\) are not in the token cache .* \(e\.g\. .*part-09"):
        train_of(cfg)
    assert len(list(root.glob("*.done.json"))) == 5  # nothing already cached was lost


@pytest.mark.slow
def test_a_killed_build_continues_where_it_stopped(tmp_path, shakespeare_path):
    """SIGKILL experiments.build_cache once its first shards are done; the rerun builds only the rest, and
    the cache is byte for byte what an uninterrupted build writes."""
    text = shakespeare_path.read_text()
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(24):
        write_shard(d / f"p{i:02d}.jsonl.gz", [text[(i * 40_000 + j * 2000) % 1_000_000:][:2000] for j in range(40)])
    write_shard(d / "e.jsonl", ["held out"])
    tk.train_sentencepiece([text[:50000]], tmp_path / "sp", vocab_size=1000)

    def command(cache):
        return [sys.executable, "-m", "experiments.build_cache", "--config=configs/tiny.py",
                f"--config.data.train_files={d}/p*.jsonl.gz", f"--config.data.eval_files={d}/e.jsonl",
                f"--config.data.tokenizer={tmp_path / 'sp'}", f"--config.data.cache_dir={cache}"]

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = tmp_path / "c" / "files" / "train"
    proc = subprocess.Popen(command(tmp_path / "c"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(root.glob("*.done.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in root.glob("*.done.json"))
    assert 2 <= len(done_before) < 24, f"kill came too late ({len(done_before)} of 24 done)"
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir() if p.name.split(".")[0] + ".done.json" in done_before}
    r = subprocess.run(command(tmp_path / "c"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["caches"]["files/train"]["built"] == 24 - len(done_before)
    assert result["caches"]["files/train"]["complete"] == 24
    assert all((root / n).stat().st_mtime_ns == t for n, t in stamps.items())  # finished shards untouched
    clean = subprocess.run(command(tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    for p in (tmp_path / "clean" / "files" / "train").iterdir():
        assert (root / p.name).read_bytes() == p.read_bytes(), p.name
