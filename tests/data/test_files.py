"""Shard files: every format gives the same documents, streamed; damaged shards name the file and the fix."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter

from llama_jax import data, errors

DOCS = ["first document\nwith two lines", "", "héllo wörld 日本語", "x" * 5000, "last"]


def write_shard(path, docs=DOCS, text_key="text"):
    """`docs` as a shard in the format its name says."""
    path = str(path)
    lines = "".join(json.dumps({text_key: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    if path.endswith(".jsonl"):
        open(path, "wb").write(lines)
    elif path.endswith(".jsonl.gz"):
        open(path, "wb").write(gzip.compress(lines))
    elif path.endswith(".jsonl.zst"):
        open(path, "wb").write(zstandard.ZstdCompressor().compress(lines))
    elif path.endswith(".parquet"):
        pq.write_table(pa.table({text_key: docs, "id": list(range(len(docs)))}), path, row_group_size=2)
    elif path.endswith(".array_record"):
        w = ArrayRecordWriter(path, "group_size:1")
        for d in docs:
            w.write(d.encode())
        w.close()
    return path


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.jsonl.zst", "s.parquet", "s.array_record"])
def test_every_format_gives_the_same_documents(tmp_path, name):
    path = write_shard(tmp_path / name)
    assert list(data.file_documents(path)) == DOCS
    (info,) = data.expand_files(path, "test")
    assert info.size == (tmp_path / name).stat().st_size and info.version


def test_array_record_of_json_objects_and_plain_text_files(tmp_path):
    w = ArrayRecordWriter(str(tmp_path / "j.array_record"), "group_size:1")
    for d in DOCS:
        w.write(json.dumps({"body": d}).encode())
    w.close()
    assert list(data.file_documents(str(tmp_path / "j.array_record"), text_key="body")) == DOCS
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("compressed text".encode()))
    assert list(data.file_documents(f"{tmp_path}/a.txt,{tmp_path}/b.txt.gz")) == [
        "line one\nline two\n", "compressed text"]


def test_a_source_streams_one_shard_per_file(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"part-{i}.jsonl.zst", [f"doc {i}.{j}" for j in range(4)])
    c = data.DataConfig(train_files=str(tmp_path / "part-*.jsonl.zst"), eval_files=write_shard(tmp_path / "e.jsonl"))
    (cfg,) = c.source_configs()
    source = data.source_for_role(cfg, c, "train")
    assert [s.name for s in source.shards] == [str(tmp_path / f"part-{i}.jsonl.zst") for i in range(3)]
    assert list(source.shards[1].read()) == [f"doc 1.{j}" for j in range(4)]


@pytest.mark.parametrize("name", ["s.jsonl.gz", "s.jsonl.zst", "s.parquet"])
def test_a_truncated_shard_names_the_file_and_the_fix(tmp_path, name):
    path = write_shard(tmp_path / name, [f"document number {i} " * 50 for i in range(200)])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) * 2 // 3])
    with pytest.raises(errors.DataError, match=rf"{name} is corrupt or truncated \(.*\)\. Re-download or "
                                                r"re-create that shard, or leave it out of"):
        data.file_documents(path)


def test_a_corrupt_compressed_shard_is_named(tmp_path):
    """A flipped bit fails gzip's CRC check at the end of the stream (earlier, it may surface as a bad line)."""
    path = write_shard(tmp_path / "s.jsonl.gz", [f"doc {i}" for i in range(100)])
    raw = bytearray(open(path, "rb").read())
    raw[-8] ^= 0xFF  # the CRC32 of the trailer
    open(path, "wb").write(bytes(raw))
    with pytest.raises(errors.DataError, match=r"s\.jsonl\.gz is corrupt or truncated"):
        data.file_documents(path)


def test_missing_column_or_field_lists_what_there_is(tmp_path):
    path = write_shard(tmp_path / "s.parquet", text_key="content")
    with pytest.raises(errors.DataError, match=r"s\.parquet has no column 'text'; its columns are \['content', 'id'\]"):
        data.file_documents(path)
    path = write_shard(tmp_path / "s.jsonl.zst", text_key="content")
    with pytest.raises(errors.DataError, match=r"s\.jsonl\.zst:1 has no field 'text'; its fields are \['content', 'id'\]"):
        data.file_documents(path)


def test_bad_utf8_in_a_compressed_shard_gives_the_decompressed_offset(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(errors.DataError, match=r"d\.jsonl\.gz is not valid UTF-8: byte 0xe9 at decompressed byte "
                                                r"offset 28"):
        data.file_documents(str(tmp_path / "d.jsonl.gz"))


def test_token_file_reads_ranges(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    (tmp_path / "t.tokens").write_bytes(tokens.tobytes())
    f = data.TokenFile(str(tmp_path / "t.tokens"), np.uint16, 1000)
    got = f.ranges(np.array([0, 17, 990]), np.array([5, 20, 1000]))
    assert [g.tolist() for g in got] == [list(range(5)), [17, 18, 19], list(range(990, 1000))]
