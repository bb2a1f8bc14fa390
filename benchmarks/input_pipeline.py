"""Input-pipeline throughput: tokens/s of read + tokenize + pack + batch, over one full epoch.

    python -m benchmarks.input_pipeline                    # tiny_shakespeare + ~100 MB synthetic text
    python -m benchmarks.input_pipeline --size_mb=10       # quicker
    python -m benchmarks.input_pipeline --quick            # smoke run: a 2 MB synthetic corpus

Cases: tiny_shakespeare's train split (TFDS, built offline from ../shared/data/tinyshakespeare.txt into a
temporary dir unless --data_dir/--manual_dir say otherwise) and a synthetic corpus of random Zipf-distributed
pseudo-words written to a temporary .jsonl at run time (never kept), each with the byte tokenizer and a
SentencePiece BPE tokenizer trained on the training data first (training is not timed). Each case times
`TrainData` construction (reading and tokenizing every document, building rows) plus `batch_for_step` for
every step of one epoch, and reports stream tokens / seconds. The last line is JSON; its "tokens_per_sec" is
the slowest case.
"""

import json
import os
import pathlib
import shutil
import tempfile
import time

from absl import app, flags

from benchmarks.common import synthetic_corpus
from llama_jax import data
from llama_jax.data import ByteTokenizer, DataConfig, train_sentencepiece

_SIZE_MB = flags.DEFINE_float("size_mb", 100, "Size of the synthetic corpus in MB.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run, as every benchmark has: a 2 MB synthetic corpus.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "SentencePiece vocab size.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir holding tiny_shakespeare (default: a temp dir)."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "Dir with tiny-shakespeare's input.txt (default: from shared/)."
)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def run_case(name: str, docs: data.Documents, tokenizer, **options) -> dict:
    """Time tokenizing and packing, then one epoch of batches."""
    t0 = time.perf_counter()
    train = data.TrainData.from_documents(
        docs, tokenizer, DataConfig(**options), seq_len=_SEQ_LEN.value, batch_size=_BATCH_SIZE.value, seed=0
    )
    t1 = time.perf_counter()
    steps = 0
    while True:  # one epoch (the last step may reach into the next)
        train.batch_for_step(steps, 0, 1)
        steps += 1
        if steps * _BATCH_SIZE.value >= train.rows_per_epoch:
            break
    t2 = time.perf_counter()
    tokens = sum(s.num_tokens for src in train.sources.values() for s in src.shards)
    result = {
        "tokens": tokens,
        "tokenize_pack_s": round(t1 - t0, 3),
        "batch_s": round(t2 - t1, 3),
        "steps": steps,
        "tokens_per_sec": round(tokens / (t2 - t0)),
    }
    print(f"{name:40s} {json.dumps(result)}", flush=True)
    return result


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    size_mb = 2.0 if _QUICK.value else _SIZE_MB.value

    tfds.disable_progress_bar()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="input_pipeline_bench_"))
    results = {}
    try:
        manual = _MANUAL_DIR.value
        if not manual:
            manual = tmp / "manual"
            manual.mkdir()
            shutil.copy(SHARED, manual / "input.txt")
        shakespeare = data.tfds_documents(
            "tiny_shakespeare", "train", data_dir=_DATA_DIR.value or str(tmp / "tfds"), manual_dir=str(manual)
        )
        t = time.perf_counter()
        synthetic_path = tmp / "synthetic.jsonl"
        synthetic_corpus(synthetic_path, size_mb)
        print(
            f"generated {size_mb} MB of synthetic text in {time.perf_counter() - t:.1f}s", flush=True
        )
        synthetic = data.file_documents(str(synthetic_path))

        sp_shakespeare = train_sentencepiece(shakespeare, tmp / "sp_shakespeare", vocab_size=2048)
        sample = synthetic.read(0, min(len(synthetic), 200))  # a few MB is plenty to learn the pieces
        sp_synthetic = train_sentencepiece(sample, tmp / "sp_synthetic", vocab_size=_VOCAB.value)
        byte = ByteTokenizer()

        results["shakespeare/byte/concat"] = run_case("shakespeare/byte/concat", shakespeare, byte)
        results["shakespeare/bpe2048/concat"] = run_case(
            "shakespeare/bpe2048/concat", shakespeare, sp_shakespeare
        )
        results["shakespeare/bpe2048/packed"] = run_case(
            "shakespeare/bpe2048/packed", shakespeare, sp_shakespeare, packing="packed"
        )
        results["synthetic/byte/concat"] = run_case("synthetic/byte/concat", synthetic, byte)
        bpe = f"bpe{_VOCAB.value}"
        results[f"synthetic/{bpe}/packed"] = run_case(
            f"synthetic/{bpe}/packed", synthetic, sp_synthetic, packing="packed"
        )
        results[f"synthetic/{bpe}/packed/shard_docs=1000"] = run_case(
            f"synthetic/{bpe}/packed/shard_docs=1000",
            synthetic,
            sp_synthetic,
            packing="packed",
            shard_docs=1000,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "tokens_per_sec": min(r["tokens_per_sec"] for r in results.values()),
                "synthetic_mb": size_mb,
                "seq_len": _SEQ_LEN.value,
                "batch_size": _BATCH_SIZE.value,
                "cpus": os.cpu_count(),
                "cases": {k: r["tokens_per_sec"] for k, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
