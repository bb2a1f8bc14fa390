"""The pretraining data path, in one run: cache build vs on-the-fly tokenization, input throughput from the
cache, a 3-source mixture vs one source, and a training process's memory at 1x and 8x the corpus.

    python -m benchmarks.data_pipeline                   # 64 MB synthetic corpus (8x: 512 MB for the RSS case)
    python -m benchmarks.data_pipeline --quick           # smoke run: 2 MB

The corpus: random Zipf-distributed pseudo-words (benchmarks/input_pipeline.py's generator) written at run
time as .jsonl.zst shards of --shard_mb (never kept). Cases:
  1. tokens/s per core: a SentencePiece BPE tokenizer (trained on the corpus first, not timed, one thread)
     tokenizing the documents in memory (on the fly, as a run without data.cache_dir does) vs Cache.build
     (read and decompress the shards, tokenize, write the cache). CPU seconds, so the ratio is per core.
  2. training input from the cache: TrainData.batch_for_step, one thread, seq 2048 x batch 64, concat and
     packed: tokens/s (one TPU host needs ~200k tokens/s: 4 chips at ~50k each for an 8B model).
  3. the same corpus as one source vs split into 3 sources mixed 0.5/0.3/0.2: tokens/s ratio (medians of five
     alternated rounds).
  4. peak RSS of `experiments.train` (tiny model, byte tokenizer, 20 steps from the cache) on the corpus and
     on 8 copies of it; also without the cache (tokenized in memory), which grows with the corpus.
The last line is JSON.
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import zstandard
from absl import app, flags

from benchmarks.common import synthetic_corpus
from llama_jax import data
from llama_jax.data import ByteTokenizer, DataConfig, SentencePieceTokenizer, train_sentencepiece

_SIZE_MB = flags.DEFINE_float("size_mb", 64, "Synthetic corpus size in MB (the RSS case also uses 8x).")
_SHARD_MB = flags.DEFINE_float("shard_mb", 4, "Shard size in MB.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: a 2 MB corpus, few steps.")
_STEPS = flags.DEFINE_integer("steps", 50, "Batches timed per throughput case.")
REPO = pathlib.Path(__file__).resolve().parents[1]


def write_shards(jsonl: pathlib.Path, out: pathlib.Path, shard_mb: float, copies: int = 1) -> None:
    """The .jsonl corpus as .jsonl.zst shards of ~shard_mb (uncompressed), `copies` times over."""
    out.mkdir(parents=True)
    lines = jsonl.read_bytes().splitlines(keepends=True)
    cctx = zstandard.ZstdCompressor(level=3)
    n, buf = 0, []
    for _c in range(copies):
        for line in lines:
            buf.append(line)
            if sum(map(len, buf)) >= shard_mb * 1e6:
                (out / f"part-{n:05d}.jsonl.zst").write_bytes(cctx.compress(b"".join(buf)))
                n, buf = n + 1, []
    if buf:
        (out / f"part-{n:05d}.jsonl.zst").write_bytes(cctx.compress(b"".join(buf)))


def source_of(cfg: DataConfig) -> data.Source:
    return data.source_for_role(cfg.source_configs()[0], cfg, "train")


def throughput(td, steps: int) -> float:
    td.batch_for_step(0, 0, 1)  # windows open: measure the steady state
    t = time.perf_counter()
    for s in range(1, steps + 1):
        td.batch_for_step(s, 0, 1)
    return steps * td.batch_size * td.seq_len / (time.perf_counter() - t)


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `python -m experiments.train ARGS`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        raise RuntimeError(f"experiments.train failed: {p.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main(argv):
    del argv
    size = 2.0 if _QUICK.value else _SIZE_MB.value
    shard_mb = 0.25 if _QUICK.value else _SHARD_MB.value
    steps = 5 if _QUICK.value else _STEPS.value
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="data_pipeline_bench_"))
    out = {"corpus_mb": size, "shard_mb": shard_mb, "cpus": os.cpu_count()}
    try:
        synthetic_corpus(tmp / "corpus.jsonl", size)
        write_shards(tmp / "corpus.jsonl", tmp / "x1", shard_mb)
        files = DataConfig(train_files=str(tmp / "x1" / "*.jsonl.zst"), eval_files=str(tmp / "corpus.jsonl"))
        texts = list(data.file_documents(files.train_files))
        sp = SentencePieceTokenizer(
            train_sentencepiece(texts[:200], tmp / "sp", vocab_size=8000)._proto, num_threads=1)

        # 1. per core: on the fly vs building the cache
        c = time.process_time()
        stream = data.tokenize_texts(texts, sp)
        fly = len(stream.tokens) / (time.process_time() - c)
        cache = data.Cache(str(tmp / "cache_sp" / "files" / "train"), source_of(files), sp, add_bos=True,
                           add_eos=True)
        c = time.process_time()
        cache.build()
        build = len(stream.tokens) / (time.process_time() - c)
        out.update(tokens=len(stream.tokens), on_the_fly_tokens_per_cpu_s=round(fly),
                   cache_build_tokens_per_cpu_s=round(build), build_vs_on_the_fly=round(build / fly, 3))
        print(f"1. tokens/s per core: on the fly {fly:,.0f}, cache build {build:,.0f} ({build / fly:.2f}x)",
              flush=True)

        # 2. input throughput from the cache (byte tokens: more tokens per MB, the harder case)
        cached = files.replace(cache_dir=str(tmp / "cache"))
        for packing in ("concat", "packed"):
            td = data.TrainData.from_config(cached.replace(packing=packing), ByteTokenizer(), seq_len=2048,
                                            batch_size=64, seed=0)
            tps = throughput(td, steps)
            out[f"cache_{packing}_tokens_per_s"] = round(tps)
            print(f"2. from the cache, {packing}: {tps:,.0f} tokens/s ({tps / 200e3:.1f}x one TPU host's 200k)",
                  flush=True)

        # 3. one source vs three
        parts = sorted((tmp / "x1").glob("*.jsonl.zst"))
        third = max(1, len(parts) // 3)
        groups = {"a": parts[:third], "b": parts[third:2 * third], "c": parts[2 * third:]}
        sources = {n: {"train_files": ",".join(map(str, g)), "eval_files": str(tmp / "corpus.jsonl"), "weight": w}
                   for (n, g), w in zip(groups.items(), (0.5, 0.3, 0.2), strict=True) if g}
        mix = DataConfig(sources=sources, cache_dir=str(tmp / "cache3"))
        one = data.TrainData.from_config(cached, ByteTokenizer(), seq_len=2048, batch_size=64, seed=0)
        three = data.TrainData.from_config(mix, ByteTokenizer(), seq_len=2048, batch_size=64, seed=0)
        # Alternated, five rounds, medians: the two cases see the same machine load.
        rounds = [(throughput(one, steps), throughput(three, steps)) for _ in range(5)]
        a, b = (sorted(x)[2] for x in zip(*rounds))
        out.update(one_source_tokens_per_s=round(a), three_sources_tokens_per_s=round(b), mixture_vs_one=round(b / a, 3))
        print(f"3. one source {a:,.0f} tokens/s, {len(sources)} sources mixed {b:,.0f} ({b / a:.2f}x)", flush=True)

        # 4. a training process's peak memory at 1x and 8x the corpus
        write_shards(tmp / "corpus.jsonl", tmp / "x8", shard_mb, copies=8)
        run_steps = "5" if _QUICK.value else "20"
        for scale in ("x1", "x8"):
            for cache_dir in (str(tmp / f"cache_rss_{scale}"), ""):
                args = ["--config=configs/tiny.py", f"--workdir={tmp / ('run_' + scale + str(bool(cache_dir)))}",
                        f"--config.data.train_files={tmp / scale / '*.jsonl.zst'}",
                        f"--config.data.eval_files={tmp / 'corpus.jsonl'}", f"--config.data.cache_dir={cache_dir}",
                        "--config.model.vocab_size=384", f"--config.num_steps={run_steps}", "--config.eval_every=0",
                        "--config.checkpoint_every=0"]
                if cache_dir:  # built beforehand: the run measures reading (building holds one shard at a time)
                    cfg = DataConfig(train_files=str(tmp / scale / "*.jsonl.zst"), eval_files=str(tmp / "corpus.jsonl"))
                    data.Cache(f"{cache_dir}/files/train", source_of(cfg), ByteTokenizer(), add_bos=True,
                               add_eos=True).build()
                rss, secs = peak_rss_mb(args)
                key = f"rss_mb_{scale}_{'cache' if cache_dir else 'in_memory'}"
                out[key] = round(rss)
                print(f"4. experiments.train, corpus {scale}, {'cache' if cache_dir else 'in memory'}: peak RSS "
                      f"{rss:,.0f} MB ({secs:.0f} s)", flush=True)
        out["rss_x8_vs_x1_cache"] = round(out["rss_mb_x8_cache"] / out["rss_mb_x1_cache"], 3)
        out["rss_x8_vs_x1_in_memory"] = round(out["rss_mb_x8_in_memory"] / out["rss_mb_x1_in_memory"], 3)
        print(f"   8x / 1x: cache {out['rss_x8_vs_x1_cache']:.3f}, in memory {out['rss_x8_vs_x1_in_memory']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["self_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
