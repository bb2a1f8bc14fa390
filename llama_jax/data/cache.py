"""The tokenized cache: each source's shards tokenized once, on local disk or a bucket, read by range.

Layout, per source and role (CACHE = data.cache_dir, local or gs://):
    CACHE/NAME/ROLE/manifest.json          what built it: source, tokenizer fingerprint, BOS/EOS, dtype, and
                                           every shard's name and version (file size and mtime/generation)
    CACHE/NAME/ROLE/shard-00042.tokens     the shard's token stream, raw little-endian uint16 or int32
    CACHE/NAME/ROLE/shard-00042.docs.npz   doc_starts (D+1,) and doc_bytes (D,), int64
    CACHE/NAME/ROLE/shard-00042.done.json  written last: the shard is complete ({"tokens", "docs", "bytes"})
    CACHE/NAME/ROLE/rows-packed-L.json     rows per shard for packed rows of length L (computed once)

Rules:
  * A shard is built by exactly one worker: worker w of n builds shards i with i % n == w that have no
    done file. Workers are the processes of a pod (jax.process_index / process_count, when training builds
    what is missing) or any launcher's (`experiments.build_cache --worker=w --num_workers=n`, e.g. one
    process per core or one per VM). A killed build reruns only the shards without a done file.
  * Nothing is read whole: training reads each row's tokens by byte range (os.pread locally, concurrent
    range requests on a bucket) and a shard's document offsets when its window is reached.
  * A cache that does not match is refused, never rebuilt over: another tokenizer or BOS/EOS setting, other
    source text, a shard file changed or deleted after the build. The message names the cache and the fix.

Why raw token arrays and not ArrayRecord: a training row is a token range that crosses documents (concat) or
a few document pieces (packed), so what is read is a byte range of a shard's token array, one request each.
ArrayRecord addresses whole records in compressed chunks: a row would read and decompress every chunk it
touches. ArrayRecord is read as a source format (files.py) and TFDS datasets are built as ArrayRecord.
Why no Beam or Ray: the shards are independent, so the engine is any set of processes with an index (a
pod's hosts, a job array, one process per core); a Beam pipeline would add a runner and a dependency for no
parallelism these workers lack.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from llama_jax.data import files
from llama_jax.data.sources import Source
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream, check_specials, stream_dtype, tokenize_texts
from llama_jax.errors import DataError

log = logging.getLogger(__name__)

VERSION = 1
_WAIT_LOG_SECONDS = 60


def cache_root(cache_dir: str, source: str, role: str) -> str:
    return f"{cache_dir.rstrip('/')}/{source}/{role}"


class TokenFile:
    """A cached shard's tokens, read by range; never loaded whole."""

    def __init__(self, path: str, dtype, length: int):
        self.path, self.dtype, self.length = path, np.dtype(dtype), int(length)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.length

    def ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """tokens[starts[i]:stops[i]] for each i."""
        size = self.dtype.itemsize
        if files.is_remote(self.path):
            fs, p = files.filesystem(self.path)
            with files.remote_errors(self.path, "data.cache_dir"):
                blobs = fs.cat_ranges([p] * len(starts), [int(a) * size for a in starts],
                                      [int(b) * size for b in stops])
        else:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
            blobs = [os.pread(self._fd, (int(b) - int(a)) * size, int(a) * size) for a, b in zip(starts, stops)]
        return [np.frombuffer(b, self.dtype) for b in blobs]

    def __getstate__(self):  # picklable for worker processes: the descriptor is reopened there
        return {**self.__dict__, "_fd": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


@dataclasses.dataclass
class ShardTokens:
    """One tokenized shard: its counts now, its TokenStream (tokens, document offsets) when asked."""

    name: str
    num_tokens: int
    num_docs: int
    num_bytes: int  # UTF-8 bytes of its documents' text
    load: object  # () -> TokenStream

    def stream(self) -> TokenStream:
        return self.load()


def in_memory(stream: TokenStream, name: str) -> ShardTokens:
    return ShardTokens(name, len(stream.tokens), stream.num_docs, int(stream.doc_bytes.sum()), lambda: stream)


def tokenize_in_memory(source: Source, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool) -> list[ShardTokens]:
    """Every shard of a source tokenized at start, in memory (no cache_dir: small data)."""
    return [in_memory(tokenize_texts(s.read(), tokenizer, add_bos=add_bos, add_eos=add_eos), s.name)
            for s in source.shards]


class Cache:
    """The cache of one source's text for one tokenizer (module docstring)."""

    def __init__(self, root: str, source: Source, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool):
        check_specials(tokenizer, add_bos, add_eos)
        self.root, self.source, self.tokenizer = root.rstrip("/"), source, tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.dtype = np.dtype(stream_dtype(tokenizer))
        self.manifest = {
            "version": VERSION,
            "source": source.key,
            "description": source.description,
            "tokenizer": tokenizer.fingerprint(),
            "add_bos": add_bos,
            "add_eos": add_eos,
            "dtype": self.dtype.name,
            "shards": [[s.name, s.version] for s in source.shards],
        }

    def _path(self, i: int, suffix: str) -> str:
        return f"{self.root}/shard-{i:05d}.{suffix}"

    # -- identity ------------------------------------------------------------------------------------

    def check_or_create(self) -> None:
        """Refuse a cache built from other text or another tokenizer; write the manifest of a new one."""
        path = f"{self.root}/manifest.json"
        if not files.exists(path):
            files.write_bytes(path, json.dumps(self.manifest, indent=1).encode())
            return
        try:
            old = json.loads(files.read_bytes(path))
        except (ValueError, OSError) as e:
            raise DataError(f"{path} is unreadable ({e}): delete {self.root} to rebuild that cache.") from e
        fix = (f"Delete {self.root} to rebuild it (nothing else is touched), or point --config.data.cache_dir "
               "at another directory.")
        for field, what in (("version", "cache format version"), ("tokenizer", "tokenizer"),
                            ("add_bos", "data.add_bos"), ("add_eos", "data.add_eos"), ("source", "source text")):
            if old.get(field) != self.manifest[field]:
                raise DataError(f"the token cache {self.root} was built with another {what} ({old.get(field)!r}; "
                                f"this run has {self.manifest[field]!r}). {fix}")
        self._check_shards([tuple(s) for s in old["shards"]], fix)

    def _check_shards(self, old: list[tuple[str, str]], fix: str) -> None:
        now = {s.name: s.version for s in self.source.shards}
        before = dict(old)
        for name, version in old:
            if name not in now:
                raise DataError(f"shard {name} of the token cache {self.root} no longer exists (deleted or "
                                f"renamed after the cache was built). Restore it, or: {fix}")
            if now[name] != version:
                raise DataError(f"shard {name} changed after the token cache {self.root} was built (size:version "
                                f"{version} then, {now[name]} now), so the cache no longer holds its text. {fix}")
        new = [n for n in now if n not in before]
        if new:
            raise DataError(f"{len(new)} shard(s) are not in the token cache {self.root} (e.g. {new[0]}): the "
                            f"source's files changed after the cache was built. {fix}")

    # -- building ------------------------------------------------------------------------------------

    def done(self) -> list[dict | None]:
        """Each shard's done record, or None where it is not built yet (one listing of the directory)."""
        fs, root = files.filesystem(self.root)
        fs.invalidate_cache(root)  # a bucket listing is cached: other workers' new shards must show
        with files.remote_errors(self.root, "data.cache_dir"):
            try:
                names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
            except FileNotFoundError:
                names = set()
            todo = [i for i in range(len(self.source.shards)) if f"shard-{i:05d}.done.json" in names]
            blobs = fs.cat([f"{root}/shard-{i:05d}.done.json" for i in todo]) if todo else {}
        out: list[dict | None] = [None] * len(self.source.shards)
        for i in todo:
            out[i] = json.loads(blobs[f"{root}/shard-{i:05d}.done.json"])
        return out

    def build(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Tokenize this worker's missing shards (rules in the module docstring); return their indices."""
        self.check_or_create()
        done = self.done()
        mine = [i for i in range(len(done)) if i % num_workers == worker and done[i] is None]
        if not mine:
            return []
        log.info("token cache %s: worker %d of %d builds %d of %d shards (%d already built)", self.root, worker,
                 num_workers, len(mine), len(done), sum(d is not None for d in done))
        bar = tqdm(total=len(mine), unit="shard", desc=f"tokenizing {self.source.name}", mininterval=5,
                   disable=None)
        t0, totals = time.perf_counter(), [0, 0]

        def progress(docs: int, tokens: int) -> None:
            totals[0] += docs
            totals[1] += tokens
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{totals[0] / dt:,.0f} docs/s, {totals[1] / dt:,.0f} tokens/s", refresh=False)

        try:
            for i in mine:
                self._build_shard(i, progress)
                bar.update(1)
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        log.info("token cache %s: built %d shards, %d docs, %d tokens in %.1f s (%.0f tokens/s)", self.root,
                 len(mine), totals[0], totals[1], dt, totals[1] / max(dt, 1e-9))
        return mine

    def _build_shard(self, i: int, progress) -> None:
        shard = self.source.shards[i]
        stream = tokenize_texts(shard.read(), self.tokenizer, add_bos=self.add_bos, add_eos=self.add_eos,
                                progress=progress)
        files.write_bytes(self._path(i, "tokens"), np.ascontiguousarray(stream.tokens, self.dtype.newbyteorder("<")).tobytes())
        buf = io.BytesIO()
        np.savez(buf, doc_starts=stream.doc_starts, doc_bytes=stream.doc_bytes)
        files.write_bytes(self._path(i, "docs.npz"), buf.getvalue())
        record = {"tokens": len(stream.tokens), "docs": stream.num_docs, "bytes": int(stream.doc_bytes.sum())}
        files.write_bytes(self._path(i, "done.json"), json.dumps(record).encode())  # last: the shard is complete

    # -- reading -------------------------------------------------------------------------------------

    def wait(self, poll_seconds: float = 2.0) -> list[dict]:
        """The done records of every shard, waiting for shards other workers are still building."""
        last_log = time.monotonic()
        while True:
            done = self.done()
            missing = [self.source.shards[i].name for i, d in enumerate(done) if d is None]
            if not missing:
                return done
            if time.monotonic() - last_log > _WAIT_LOG_SECONDS:
                log.warning("token cache %s: waiting for %d of %d shards other workers are building (e.g. %s)",
                            self.root, len(missing), len(done), missing[0])
                last_log = time.monotonic()
            time.sleep(poll_seconds)

    def shards(self) -> list[ShardTokens]:
        """Every shard, read lazily (the cache must be complete: see wait)."""
        out = []
        for i, rec in enumerate(self.wait()):
            out.append(ShardTokens(self.source.shards[i].name, rec["tokens"], rec["docs"], rec["bytes"],
                                   _Loader(self._path(i, "tokens"), self._path(i, "docs.npz"), self.dtype,
                                           rec["tokens"], self.add_bos, self.add_eos)))
        return out

    def read_json(self, name: str) -> dict | None:
        path = f"{self.root}/{name}"
        return json.loads(files.read_bytes(path)) if files.exists(path) else None

    def write_json(self, name: str, value) -> None:
        files.write_bytes(f"{self.root}/{name}", json.dumps(value).encode())


@dataclasses.dataclass(frozen=True)
class _Loader:
    tokens: str
    docs: str
    dtype: np.dtype
    length: int
    add_bos: bool
    add_eos: bool

    def __call__(self) -> TokenStream:
        try:
            arrays = np.load(io.BytesIO(files.read_bytes(self.docs)))
            starts, nbytes = arrays["doc_starts"], arrays["doc_bytes"]
        except FileNotFoundError:
            raise DataError(f"{self.docs} is missing: the token cache was changed while in use; rebuild it.") from None
        return TokenStream(TokenFile(self.tokens, self.dtype, self.length), starts, nbytes, self.add_bos,
                           self.add_eos)


def open_source(source: Source, tokenizer: Tokenizer, *, cache_dir: str, role: str, add_bos: bool,
                add_eos: bool, worker: int = 0, num_workers: int = 1) -> tuple[Cache | None, list[ShardTokens]]:
    """A source's tokenized shards: from the cache (building this worker's missing shards first, then
    waiting for the others'), or tokenized in memory when cache_dir is ""."""
    if not cache_dir:
        return None, tokenize_in_memory(source, tokenizer, add_bos=add_bos, add_eos=add_eos)
    cache = Cache(cache_root(cache_dir, source.name, role), source, tokenizer, add_bos=add_bos, add_eos=add_eos)
    cache.build(worker, num_workers)
    return cache, cache.shards()
