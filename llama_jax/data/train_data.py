"""Training batches as a pure function of the step: a weighted mixture of sources (llama_jax/data/mixture.py),
each source's rows shuffled per epoch (its own epochs), sliced per process, prefetched in a thread.

Rule, per source (rows of its shards, llama_jax/data/packing.py): shards are grouped into windows of
`shuffle_shards` consecutive shards. Epoch e visits the windows in the order of a permutation seeded by
(seed, source, e), and each window's rows in the order of a permutation seeded by (seed, source, e, window).
So each epoch reads every row exactly once, only a window's shards are open at a time (their offsets
loaded, their tokens read by range), and the source's k-th sample is a pure function of (seed, k, data
config). The mixture gives global sample g = step * batch_size + i its (source, k). Nothing depends on the
number of processes: process p reads only its rows of the global batch.
See llama_jax/data/__init__ ("Epochs and exact resume").

Why not grain's MapDataset: its `shuffle` permutes all of a dataset's rows at once, so every batch would
touch rows of every shard (one open file, and one document-offset array in memory, per shard); windows keep
that to `shuffle_shards` shards while each epoch still reads each row once. Its `mix` is discussed in
mixture.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading
import zlib

import jax
import numpy as np

from llama_jax.data import cache as token_cache
from llama_jax.data import sft
from llama_jax.data.config import DataConfig
from llama_jax.data.mixture import Mixture
from llama_jax.data.packing import Rows, build_rows, empty_batch, gather, local_rows, pad_id_of, row_count
from llama_jax.data.sources import Documents, Source, check_no_leak, no_text, source_for_role
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream
from llama_jax.errors import DataError


class SourceRows:
    """One source's rows and their per-epoch order (module docstring); `locate(k)` is a pure function."""

    def __init__(self, name: str, shards: list[token_cache.ShardTokens], *, seq_len: int, packing: str,
                 seed: int, shuffle_shards: int, cache: token_cache.Cache | None = None):
        self.name, self.shards, self.seq_len, self.packing = name, shards, seq_len, packing
        self.seed = [int(seed), zlib.crc32(name.encode())]  # each source its own shuffles
        self._lock = threading.RLock()
        self._perms: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._loaded: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        # Shards kept loaded: from the cache, the current window, the next and one more; in memory, all.
        self._keep = 3 * shuffle_shards if cache is not None else len(shards)
        self.counts = np.asarray(self._row_counts(cache), np.int64)  # rows per shard
        k = shuffle_shards
        self.windows = [list(range(lo, min(lo + k, len(shards)))) for lo in range(0, len(shards), k)]
        self.window_rows = np.array([self.counts[w].sum() for w in self.windows], np.int64)
        self.rows_per_epoch = int(self.counts.sum())
        if self.rows_per_epoch == 0:
            raise no_text(f"source {name!r}")

    def _row_counts(self, cache) -> list[int]:
        """Rows per shard: from token counts (concat), or from each shard's document lengths (packed; kept in
        the cache after the first run, since next-fit packing walks every document)."""
        if self.packing == "concat":
            return [row_count(s.num_tokens, self.seq_len) for s in self.shards]
        name = f"rows-packed-{self.seq_len}.json"
        saved = cache.read_json(name) if cache is not None else None
        if saved is not None and len(saved) == len(self.shards):
            return saved
        layout = self.shard if cache is None else self._layout  # in memory: keep what was computed
        counts = [layout(i)[1].num_rows for i in range(len(self.shards))]
        if cache is not None and jax.process_index() == 0:
            cache.write_json(name, counts)
        return counts

    def _layout(self, i: int) -> tuple[TokenStream, Rows]:
        stream = self.shards[i].stream()
        return stream, build_rows(stream, self.seq_len, self.packing)

    def shard(self, i: int) -> tuple[TokenStream, Rows]:
        """Shard i's stream and rows; loaded once, by whichever thread asks first, and kept a while."""
        with self._lock:
            future = self._loaded.get(i)
            owner = future is None
            if owner:
                future = self._loaded[i] = concurrent.futures.Future()
            self._loaded.move_to_end(i)
            while len(self._loaded) > self._keep:
                self._loaded.popitem(last=False)
        if owner:
            try:
                future.set_result(self._layout(i))
            except BaseException as e:
                with self._lock:
                    self._loaded.pop(i, None)
                future.set_exception(e)
        return future.result()

    def _perm(self, *key: int) -> np.ndarray:
        """Window order of epoch e (key (e,)), or row order of window w in epoch e (key (e, w))."""
        with self._lock:
            if key not in self._perms:
                n = len(self.windows) if len(key) == 1 else int(self.window_rows[key[1]])
                self._perms[key] = np.random.default_rng([*self.seed, *key]).permutation(n)
                while len(self._perms) > 16:
                    self._perms.popitem(last=False)
            return self._perms[key]

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within the shard) of this source's samples k (any number of epochs)."""
        epoch, r = np.divmod(np.asarray(k, np.int64), self.rows_per_epoch)
        shard, row = np.empty_like(r), np.empty_like(r)
        for e in np.unique(epoch).tolist():
            m = epoch == e
            order = self._perm(e)
            cum = np.cumsum(self.window_rows[order])
            i = np.searchsorted(cum, r[m], side="right")
            window = order[i]
            within = r[m] - (cum[i] - self.window_rows[window])  # position in the window's shuffled order
            s, x = np.empty_like(within), np.empty_like(within)
            for w in np.unique(window).tolist():
                mw = window == w
                flat = self._perm(e, w)[within[mw]]  # the window's row, its shards' rows concatenated
                ends = np.cumsum(self.counts[self.windows[w]])
                j = np.searchsorted(ends, flat, side="right")
                s[mw] = np.asarray(self.windows[w])[j]
                x[mw] = flat - (ends[j] - self.counts[s[mw]])
            shard[m], row[m] = s, x
        return shard, row

    def gather(self, shard: np.ndarray, row: np.ndarray, into: dict, at: np.ndarray) -> None:
        """Write rows (shard[i], row[i]) into batch `into` at rows at[i]."""
        for i in np.unique(shard).tolist():
            m = shard == i
            stream, rows = self.shard(i)
            gather(stream.tokens, rows, row[m], 0, stream.trained, into=into, at=at[m])

    def next_window_shards(self, k: int) -> list[int]:
        """The shards of the window after the one holding sample k (to load ahead)."""
        epoch, r = divmod(int(k), self.rows_per_epoch)
        order = self._perm(epoch)
        pos = int(np.searchsorted(np.cumsum(self.window_rows[order]), r, side="right"))
        nxt = order[pos + 1] if pos + 1 < len(order) else self._perm(epoch + 1)[0]
        return self.windows[int(nxt)]


class TrainData:
    """Shuffled training batches; `batch_for_step(step)` is a pure function of (seed, step, data config).

    Build it with `from_config` (the sources config.data names; the token cache when data.cache_dir is set)
    or `from_documents` (one in-memory source). batch_size is global, across all hosts.
    """

    def __init__(self, sources: dict[str, SourceRows], tokenizer: Tokenizer, options: DataConfig | None = None,
                 *, seq_len: int, batch_size: int, seed: int, identity: str = ""):
        options = options or DataConfig()
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.sources, self.names = sources, sorted(sources)
        self.seq_len, self.batch_size, self.seed, self.prefetch = seq_len, batch_size, int(seed), options.prefetch
        self.pad_id = pad_id_of(tokenizer)
        stages = options.stage_weights() if options.sources else ((0, {self.names[0]: 1.0}),)
        self.mixture = Mixture(self.names, stages, batch_size=batch_size, block=options.mixture_block, seed=seed)
        # Not the files' paths: a moved data_dir or a re-copied file must not block resuming.
        ident = f"{identity}|{tokenizer.fingerprint()}|{options.add_bos}|{options.add_eos}|{options.packing}"
        ident += f"|{seq_len}|{batch_size}|{seed}|{options.shuffle_shards}|{options.shard_docs}"
        if options.sources:
            ident += f"|{stages}|{options.mixture_block}"
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self._background = concurrent.futures.ThreadPoolExecutor(1)
        self._ahead: dict[str, list[int]] = {}  # per source, the shards last opened ahead

    @classmethod
    def from_documents(cls, docs: Documents, tokenizer: Tokenizer, options: DataConfig | None = None, *,
                       seq_len: int, batch_size: int, seed: int) -> TrainData:
        """One source of in-memory documents (tests, benchmarks), cut into shards of options.shard_docs."""
        options = options or DataConfig()
        source = Source.from_documents(docs, "docs", options.shard_docs)
        shards = token_cache.tokenize_in_memory(source, tokenizer, add_bos=options.add_bos, add_eos=options.add_eos)
        if sum(s.num_bytes for s in shards) == 0:
            raise no_text(docs.name)
        rows = SourceRows("docs", shards, seq_len=seq_len, packing=options.packing, seed=seed,
                          shuffle_shards=options.shuffle_shards)
        return cls({"docs": rows}, tokenizer, options, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   identity=docs.name)

    @classmethod
    def from_config(cls, data: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                    worker: int | None = None, num_workers: int | None = None) -> TrainData:
        """The training text of every source `data` names (after checking none overlaps held-out data).
        With data.cache_dir, this process builds its share of missing cache shards (worker / num_workers:
        default jax's process index and count) and waits for the rest."""
        check_no_leak(data)
        worker = jax.process_index() if worker is None else worker
        num_workers = jax.process_count() if num_workers is None else num_workers
        sources, identity = {}, []
        for cfg in data.source_configs():
            source = source_for_role(cfg, data, "train")
            cache = None
            if data.format == "sft":
                stream = sft.tokenize_source(source, sft.Formatter.from_config(data, tokenizer), seq_len=seq_len)
                shards = [token_cache.in_memory(stream, source.shards[0].name)]
            else:
                cache, shards = token_cache.open_source(
                    source, tokenizer, cache_dir=data.cache_dir, role="train", add_bos=data.add_bos,
                    add_eos=data.add_eos, worker=worker, num_workers=num_workers)
            if sum(s.num_bytes for s in shards) == 0:
                raise no_text(source.description)
            sources[cfg.name] = SourceRows(cfg.name, shards, seq_len=seq_len, packing=data.packing, seed=seed,
                                           shuffle_shards=data.shuffle_shards, cache=cache)
            identity.append(f"{cfg.name}={source.description}")
        extra = f"|{sft.Formatter.from_config(data, tokenizer).fingerprint}" if data.format == "sft" else ""
        return cls(sources, tokenizer, data, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   identity=";".join(identity) + extra)

    # -- sizes ---------------------------------------------------------------------------------------

    @property
    def rows_per_epoch(self) -> int:
        """Rows (sequences) per epoch, summed over the sources."""
        return sum(s.rows_per_epoch for s in self.sources.values())

    @property
    def steps_per_epoch(self) -> float:
        return self.rows_per_epoch / self.batch_size

    def seen(self, step: int) -> dict[str, float]:
        """Per source, after `step` steps: epochs and tokens (row positions, padding included) seen."""
        consumed = self.mixture.consumed(step * self.batch_size)
        out = {}
        for name, n in zip(self.names, consumed.tolist()):
            out[f"data/{name}/epochs"] = n / self.sources[name].rows_per_epoch
            out[f"data/{name}/tokens"] = float(n * self.seq_len)
        return out

    # -- batches -------------------------------------------------------------------------------------

    def rows_for_step(self, step: int, process_index=None, process_count=None, *, rows: slice | None = None):
        """[local_batch, 3] int64: (source index in `names`, shard, row) of each row this process reads."""
        sl = local_rows(self.batch_size, process_index, process_count, rows)
        g = step * self.batch_size + np.arange(sl.start, sl.stop, dtype=np.int64)
        source, k = self.mixture.locate(g)
        shard, row = np.empty_like(k), np.empty_like(k)
        for s in np.unique(source).tolist():
            m = source == s
            rows_of = self.sources[self.names[s]]
            shard[m], row[m] = rows_of.locate(k[m])
            self._load_ahead(self.names[s], int(k[m].max()))
        return np.stack([source, shard, row], axis=1)

    def _load_ahead(self, name: str, k: int) -> None:
        """Open the next window's shards in the background once a source enters a window."""
        src = self.sources[name]
        if len(src.windows) == 1:
            return
        shards = src.next_window_shards(k)
        if self._ahead.get(name) != shards:
            self._ahead[name] = shards
            for i in shards:
                self._background.submit(src.shard, i)

    def batch_for_step(self, step: int, process_index=None, process_count=None, *, rows: slice | None = None):
        """This process's [local_batch, seq_len] slice of the global batch at `step`.

        process_index/process_count default to jax's; `rows` (a slice of the global batch) overrides both,
        e.g. sharding.process_batch_slice(mesh, batch_size) when the mesh orders processes differently.
        """
        triples = self.rows_for_step(step, process_index, process_count, rows=rows)
        out = empty_batch(len(triples), self.seq_len, self.pad_id)
        for s in np.unique(triples[:, 0]).tolist():
            at = np.flatnonzero(triples[:, 0] == s)
            self.sources[self.names[s]].gather(triples[at, 1], triples[at, 2], out, at)
        return out

    # -- iteration and state -------------------------------------------------------------------------

    def state(self, step: int) -> dict:
        """JSON-able data state for resuming at `step` (the checkpoint's "data_state" item)."""
        return {"step": int(step), "fingerprint": self.fingerprint}

    def restore(self, state: dict) -> int:
        """Check a saved `state` against this data; return its step."""
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                "the saved data state was written with a different data config (sources, weights, tokenizer, "
                "seq_len, batch_size, seed, packing or shuffling), so resuming would not replay the same "
                f"batches. Restore that config, or resume at the step anyway with start={state.get('step')} "
                "(an int)."
            )
        return int(state["step"])

    def iterator(self, start=0, *, process_index=None, process_count=None, rows=None, prefetch=None):
        """Batches from `start`: a step, or a `state()` dict (checked to match this data)."""
        if isinstance(start, dict):
            start = self.restore(start)
        prefetch = self.prefetch if prefetch is None else prefetch
        where = dict(process_index=process_index, process_count=process_count, rows=rows)
        return DataIterator(self, int(start), where, prefetch)


class DataIterator:
    """Iterates `TrainData` batches from a step, computing the next `prefetch` batches in a thread.

    `state()` is what `TrainData.iterator` resumes from: JSON, for the checkpoint's "data_state" item.
    Batches are pure functions of the step, so prefetching never changes what is seen.
    """

    def __init__(self, data: TrainData, step: int, where: dict, prefetch: int):
        self.data, self.step, self._where = data, step, where
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch > 0 else None
        self._prefetch = prefetch
        self._pending: collections.deque = collections.deque()

    def _compute(self, step: int) -> dict:
        w = self._where
        return self.data.batch_for_step(step, w["process_index"], w["process_count"], rows=w["rows"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pool is None:
            batch = self._compute(self.step)
        else:
            next_step = self.step + len(self._pending)
            while len(self._pending) < self._prefetch:
                self._pending.append(self._pool.submit(self._compute, next_step))
                next_step += 1
            batch = self._pending.popleft().result()
        self.step += 1
        return batch

    def state(self) -> dict:
        """The state to resume at the next batch this iterator would return."""
        return self.data.state(self.step)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
