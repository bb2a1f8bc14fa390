"""Write documents as compressed shards, the form pretraining corpora ship in, with a held-out part.

    python -m experiments.make_shards --inputs='llama_jax/**/*.py,experiments/*.py' \
        --output_dir=/tmp/code_shards --docs_per_shard=40 --format=jsonl.zst

--inputs are comma-separated globs of files in any format the data pipeline reads (llama_jax/data/files.py:
.jsonl, .parquet, .array_record, optionally .gz/.zst; any other file is one document). Writes
OUTPUT_DIR/train-00000.FORMAT, ... of --docs_per_shard documents each ({"text": ...} records, or a "text"
column) and OUTPUT_DIR/heldout.FORMAT: the documents whose content hash falls in --heldout_fraction, so the
split does not depend on the order of the inputs. OUTPUT_DIR may be a bucket path (gs://). The last line is
JSON. Train on them with --config.data.train_files='OUTPUT_DIR/train-*.FORMAT' and
--config.data.eval_files=OUTPUT_DIR/heldout.FORMAT.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from absl import flags

from experiments import cli
from llama_jax.data import file_documents, files
from llama_jax.errors import ConfigError

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")
_INPUTS = flags.DEFINE_string("inputs", None, "Comma-separated globs of input files.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards go (local or gs://).", required=True)
_FORMAT = flags.DEFINE_enum("format", "jsonl.zst", FORMATS, "Shard format.")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 10_000, "Documents per training shard.")
_HELDOUT = flags.DEFINE_float("heldout_fraction", 0.05, "Share of documents held out (by content hash).")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "Field or column holding the text, in inputs and shards.")


def encode(texts: list[str], fmt: str, text_key: str) -> bytes:
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.table({text_key: texts}), buf)
        return buf.getvalue()
    lines = "".join(json.dumps({text_key: t}, ensure_ascii=False) + "\n" for t in texts).encode()
    if fmt == "jsonl.gz":
        return gzip.compress(lines, mtime=0)  # mtime 0: the same documents give the same bytes
    if fmt == "jsonl.zst":
        return zstandard.ZstdCompressor(level=10).compress(lines)
    return lines


def held_out(text: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") < fraction * 2**64


def main(argv):
    if not 0 <= _HELDOUT.value < 1 or _DOCS_PER_SHARD.value < 1:
        raise ConfigError("--heldout_fraction must be in [0, 1) and --docs_per_shard >= 1.")
    docs = file_documents(_INPUTS.value, text_key=_TEXT_KEY.value, what="--inputs")
    train, heldout = [], []
    for text in docs:
        (heldout if held_out(text, _HELDOUT.value) else train).append(text)
    out, fmt, n = _OUTPUT_DIR.value.rstrip("/"), _FORMAT.value, _DOCS_PER_SHARD.value
    shards = [train[i : i + n] for i in range(0, len(train), n)]
    for i, part in enumerate(shards):
        files.write_bytes(f"{out}/train-{i:05d}.{fmt}", encode(part, fmt, _TEXT_KEY.value))
    if heldout:
        files.write_bytes(f"{out}/heldout.{fmt}", encode(heldout, fmt, _TEXT_KEY.value))
    print(json.dumps({"output_dir": out, "train_docs": len(train), "train_shards": len(shards),
                      "heldout_docs": len(heldout), "format": fmt}), flush=True)


if __name__ == "__main__":
    cli.run(main)
