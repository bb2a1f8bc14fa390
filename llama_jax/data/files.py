"""Sharded files on a local path or a bucket, and the documents in each, streamed.

Paths go through fsspec (gcsfs for `gs://`; any fsspec protocol works, s3:// with s3fs installed), so a
glob names shards on a laptop and on a bucket alike. No shard is read whole into memory except a plain text
file, which is one document.

Formats, by file name (a `.gz` or `.zst` suffix decompresses first, as a stream):
  * `.jsonl` / `.json`: one JSON object a line; the document is its `text_key` string field.
  * `.parquet`: the `text_key` column (read a row group at a time).
  * `.array_record`: one record a document: UTF-8 text, or JSON objects holding `text_key` (decided by the
    first record).
  * anything else: the whole file is one UTF-8 document (universal newlines).
Every error names the file, and where it can, the line or byte offset, and the fix: bad UTF-8, a bad JSON
line, a missing field or column, a corrupt or truncated compressed file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterator

import fsspec
import zstandard

from llama_jax.errors import DataError

_CHUNK = 1 << 20  # bytes read at a time from a compressed stream
# What a damaged gzip / zstd stream raises while it is read.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A shard file: its URL as the user wrote it (with the protocol), size and version (mtime, or the
    bucket object's generation), so a cache can tell when it changed."""

    path: str
    size: int
    version: str


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) of a local path or URL; a missing driver names the package."""
    try:
        return fsspec.core.url_to_fs(os.path.expanduser(path))
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {path}: {e}. For gs:// paths: pip install gcsfs.") from e


def _version(info: dict) -> str:
    for key in ("generation", "mtime", "updated", "LastModified", "ETag"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def expand_files(patterns: str, what: str) -> list[FileInfo]:
    """The files comma-separated globs name, sorted per pattern; a pattern that matches nothing is an
    error naming it. One listing per pattern (a bucket glob is one request, not one per file)."""
    out: list[FileInfo] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        fs, root = filesystem(pattern)
        with remote_errors(pattern, what):
            if glob_chars(root):
                found = fs.glob(root, detail=True)
            else:  # info, not exists(): exists() answers False for a bucket it may not read
                try:
                    found = {root: fs.info(root)}
                except FileNotFoundError:
                    found = {}
        files = sorted((p, i) for p, i in found.items() if i.get("type") != "directory")
        if not files:
            raise DataError(f"{what}: no file matches {pattern!r}; check the path (relative to the cwd).")
        for p, info in files:
            url = p if not is_remote(pattern) else fs.unstrip_protocol(p)
            out.append(FileInfo(url, int(info.get("size") or 0), _version(info)))
    if not out:
        raise DataError(f"{what} names no files: give comma-separated files or globs.")
    return out


def glob_chars(path: str) -> bool:
    return any(c in path for c in "*?[")


@contextlib.contextmanager
def remote_errors(path: str, what: str):
    """Any error of a filesystem call (each filesystem raises its own types) as one line naming the path and,
    for a bucket without credentials, the fix; a DataError or a missing file passes through."""
    try:
        yield
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:
        raise access_error(path, e, what) from e


def access_error(path: str, e: Exception, what: str) -> DataError:
    """A one-line error for a path that cannot be listed or read, with the fix for missing credentials."""
    text = f"{type(e).__name__}: {e}".split("\n")[0][:300]
    if is_remote(path) and any(s in text.lower() for s in ("401", "403", "credential", "unauthorized",
                                                           "forbidden", "permission", "anonymous")):
        return DataError(
            f"{what}: no access to {path} ({text}). Give this machine credentials for the bucket: "
            "`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json (a service "
            "account that can read it); on a TPU VM, the VM's service account needs storage read access."
        )
    return DataError(f"{what}: cannot read {path} ({text}).")


def open_file(path: str, what: str, mode: str = "rb"):
    fs, p = filesystem(path)
    try:
        return fs.open(p, mode)
    except FileNotFoundError:
        raise DataError(f"{what}: {path} no longer exists (was it deleted or renamed?).") from None
    except Exception as e:
        raise access_error(path, e, what) from e


# ---------------------------------------------------------------------- formats


def format_of(path: str) -> tuple[str, str]:
    """(format extension, compression) of a file name: ("jsonl", "zst") for x.jsonl.zst."""
    name = path.rsplit("/", 1)[-1].lower()
    comp = ""
    for suffix, c in ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst")):
        if name.endswith(suffix):
            name, comp = name[: -len(suffix)], c
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    return ext, comp


def corrupt(path: str, e: BaseException, what: str) -> DataError:
    return DataError(
        f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}). Re-download or re-create "
        f"that shard, or leave it out of {what}; shards already tokenized into the cache are kept."
    )


def _zstd_chunks(raw) -> Iterator[bytes]:
    """Decompressed chunks of a zstd stream; a stream that ends inside a frame is an error (zstandard's
    reader would return the partial data silently)."""
    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    while True:
        chunk = raw.read(_CHUNK)
        if not chunk:
            break
        while chunk:
            out = obj.decompress(chunk)
            if out:
                yield out
            chunk = obj.unused_data if obj.eof else b""
            if obj.eof and chunk:  # concatenated frames
                obj = dctx.decompressobj()
    if not obj.eof:
        raise EOFError("the zstd stream ends inside a frame")


class _Chunks(io.RawIOBase):
    """A readable binary stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _decompressed(raw, comp: str):
    if comp == "gz":
        return gzip.GzipFile(fileobj=raw)
    if comp == "zst":
        return io.BufferedReader(_Chunks(_zstd_chunks(raw)), _CHUNK)
    return raw


def _decode(data: bytes, path: str, offset: int, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = "decompressed byte offset" if format_of(path)[1] else "byte offset"
        raise DataError(
            f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at {where} {offset + e.start} ({e.reason}). "
            f"Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it from {what}."
        ) from None


# JSON's names for the Python types json.loads returns, for messages about a field of the wrong type.
JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
              dict: "an object"}


def parse_json_line(line: str, where: str, expect: str) -> dict | None:
    """The object on one .jsonl line (None for a blank line); `where` is "path:line" for errors."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line of a .jsonl file must be one "
            "JSON object. Fix or delete that line."
        ) from e
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: is {JSON_TYPES[type(record)]}, not a JSON object; each line of a .jsonl file must be "
            f"one object with {expect}."
        )
    return record


def text_field(record: dict, text_key: str, where: str) -> str:
    if text_key not in record:
        raise DataError(f"{where} has no field {text_key!r}; its fields are {sorted(record)}. Set "
                        "--config.data.text_key.")
    text = record[text_key]
    if not isinstance(text, str):
        # A number or null would otherwise fail (or be silently str()-ed) deep in the tokenizer.
        raise DataError(f"{where}: field {text_key!r} is {JSON_TYPES[type(text)]}, not a string; fix that "
                        "record, or set --config.data.text_key to the field holding the text.")
    return text


def json_records(path: str, what: str, expect: str) -> Iterator[tuple[str, dict]]:
    """("path:line", object) of every non-blank line of a .jsonl(.gz/.zst) file."""
    comp = format_of(path)[1]
    with open_file(path, what) as raw:
        stream = _decompressed(raw, comp)
        offset, lineno = 0, 0
        try:
            for lineno, line in enumerate(stream, 1):
                record = parse_json_line(_decode(line, path, offset, what), f"{path}:{lineno}", expect)
                offset += len(line)
                if record is not None:
                    yield f"{path}:{lineno}", record
        except DataError:
            raise
        except _STREAM_ERRORS as e:
            raise corrupt(path, e, what) from e


def _parquet_texts(path: str, text_key: str, what: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    with open_file(path, what) as raw:
        try:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
            if text_key not in names:
                raise DataError(f"{path} has no column {text_key!r}; its columns are {names}. Set "
                                "--config.data.text_key (per source: text_key in data.sources).")
            for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
                for i, text in enumerate(batch.column(0).to_pylist()):
                    if not isinstance(text, str):
                        raise DataError(f"{path}: column {text_key!r} holds {JSON_TYPES.get(type(text), type(text).__name__)}"
                                        f" (row {i} of a batch), not a string; set --config.data.text_key.")
                    yield text
        except (pyarrow.ArrowException, OSError, EOFError) as e:
            raise corrupt(path, e, what) from e


def _array_record_texts(path: str, text_key: str, what: str) -> Iterator[str]:
    from array_record.python.array_record_module import ArrayRecordReader

    local, tmp = path, None
    if is_remote(path):  # the reader opens local files only: copy the shard down first
        tmp = tempfile.NamedTemporaryFile(suffix=".array_record", delete=False)
        with open_file(path, what) as raw, tmp:
            while chunk := raw.read(_CHUNK):
                tmp.write(chunk)
        local = tmp.name
    try:
        try:
            reader = ArrayRecordReader(local)
            n = reader.num_records()
        except Exception as e:
            raise corrupt(path, e, what) from e
        as_json = None
        for i in range(0, n, 256):
            for j, rec in enumerate(reader.read(list(range(i, min(i + 256, n))))):
                text = _decode(rec, f"{path} record {i + j}", 0, what)
                if as_json is None:
                    as_json = text.lstrip().startswith("{")
                if as_json:
                    where = f"{path} record {i + j}"
                    text = text_field(parse_json_line(text, where, f"a {text_key!r} field") or {}, text_key, where)
                yield text
        reader.close()
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


def read_text(path: str, what: str) -> str:
    """A whole file (decompressed) as one document, universal newlines; a bad byte is reported at its offset
    in the file (a text-mode read would report it relative to an internal chunk)."""
    with open_file(path, what) as raw:
        try:
            data = _decompressed(raw, format_of(path)[1]).read()
        except _STREAM_ERRORS as e:
            raise corrupt(path, e, what) from e
    return _decode(data, path, 0, what).replace("\r\n", "\n").replace("\r", "\n")


def file_texts(path: str, text_key: str, what: str) -> Iterator[str]:
    """The documents of one shard file, streamed (module docstring: formats)."""
    ext = format_of(path)[0]
    if ext in ("jsonl", "json"):
        expect = f"a {text_key!r} field"
        return (text_field(r, text_key, where) for where, r in json_records(path, what, expect))
    if ext == "parquet":
        return _parquet_texts(path, text_key, what)
    if ext == "array_record":
        return _array_record_texts(path, text_key, what)
    return iter([read_text(path, what)])


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file, locally via a temporary file and a rename (a reader never sees half a file; a
    bucket object appears whole on close anyway)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = filesystem(path)
    with remote_errors(path, "data.cache_dir"), fs.open(p, "wb") as f:
        f.write(data)


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, p = filesystem(path)
    with remote_errors(path, "data.cache_dir"):
        return fs.cat_file(p, start=start, end=end)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    with remote_errors(path, "data.cache_dir"):
        try:
            fs.info(p)
        except FileNotFoundError:
            return False
    return True
