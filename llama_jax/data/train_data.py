"""Training batches as a pure function of the step: windows of tokenized documents, rows shuffled per
epoch by permutations seeded by (seed, epoch, window), sliced per process, prefetched in a thread.
See llama_jax/data/__init__ ("Epochs and exact resume")."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading

import numpy as np

from llama_jax.data import sft
from llama_jax.data.config import DataConfig
from llama_jax.data.packing import Rows, build_rows, gather, local_rows, pad_id_of
from llama_jax.data.sources import Documents, check_no_leak, documents_for_role, no_text
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream, tokenize
from llama_jax.errors import DataError


class TrainData:
    """Shuffled training batches; `batch_for_step(step)` is a pure function of (seed, step, data config).

    `TrainData(docs, tokenizer, options, seq_len=..., batch_size=..., seed=...)` reads packing, add_bos,
    add_eos, window_docs, cache_dir and prefetch from `options` (a DataConfig), and with format="sft" its
    loss_on and chat_template (docs are then SFT records, llama_jax/data/sft.py); `from_config` also finds
    the documents the DataConfig names. batch_size is global, across all hosts.
    """

    def __init__(
        self,
        docs: Documents,
        tokenizer: Tokenizer,
        options: DataConfig | None = None,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
    ):
        options = options or DataConfig()
        packing, add_bos, add_eos = options.packing, options.add_bos, options.add_eos
        window_docs, cache_dir, prefetch = options.window_docs, options.cache_dir, options.prefetch
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if len(docs) == 0:
            raise no_text(docs)
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.batch_size, self.seed, self.packing = seq_len, batch_size, int(seed), packing
        self.add_bos, self.add_eos, self.cache_dir, self.prefetch = add_bos, add_eos, cache_dir, prefetch
        self.pad_id = pad_id_of(tokenizer)
        self.formatter = sft.Formatter.from_config(options, tokenizer) if options.format == "sft" else None
        n = len(docs)
        per = window_docs if 0 < window_docs < n else n
        self.windows = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
        # docs.name, not docs.key: a moved data_dir or a re-copied file must not block resuming.
        ident = f"{docs.name}|{tokenizer.fingerprint()}|{add_bos}|{add_eos}|{packing}|{seq_len}"
        ident += f"|{batch_size}|{seed}|{per}"
        if self.formatter is not None:  # only then, so text runs keep their fingerprint (and resume)
            ident += f"|{self.formatter.fingerprint}"
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self._lock = threading.RLock()
        self._loaded: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        self._counts: dict[int, int] = {}  # rows per window, once known
        self._prefix0: list[int] = []  # cumulative row counts along epoch 0's window order, as far as known
        # Permutations, and cumulative row counts per epoch (key ("cum", e)).
        self._perms: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._background = concurrent.futures.ThreadPoolExecutor(1) if len(self.windows) > 1 else None
        if len(self.windows) == 1:
            stream, rows = self.window(0)
            if int(stream.doc_bytes.sum()) == 0 or rows.num_rows == 0:
                raise no_text(docs)

    @classmethod
    def from_config(
        cls, data: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int
    ) -> TrainData:
        """The training split `data` names (after checking it does not overlap the held-out data)."""
        check_no_leak(data)
        docs = documents_for_role(data, "train")
        return cls(docs, tokenizer, data, seq_len=seq_len, batch_size=batch_size, seed=seed)

    # -- windows -------------------------------------------------------------------------------------

    def _build_window(self, w: int) -> tuple[TokenStream, Rows]:
        lo, hi = self.windows[w]
        if self.formatter is not None:
            stream, _ = sft.tokenize_records(self.docs, self.formatter, seq_len=self.seq_len, lo=lo, hi=hi)
        else:
            stream = tokenize(self.docs, self.tokenizer, add_bos=self.add_bos, add_eos=self.add_eos,
                              cache_dir=self.cache_dir, lo=lo, hi=hi)
        rows = build_rows(stream, self.seq_len, self.packing)
        with self._lock:
            self._counts[w] = rows.num_rows
        return stream, rows

    def window(self, w: int) -> tuple[TokenStream, Rows]:
        """Window w's token stream and rows; tokenized once, by whichever thread asks first."""
        with self._lock:
            future = self._loaded.get(w)
            owner = future is None
            if owner:
                future = self._loaded[w] = concurrent.futures.Future()
            self._loaded.move_to_end(w)
            while len(self._loaded) > 3:  # keep the last few windows (a pending one stays with its waiters)
                self._loaded.popitem(last=False)
        if owner:
            try:
                future.set_result(self._build_window(w))
            except BaseException as e:
                with self._lock:
                    self._loaded.pop(w, None)
                future.set_exception(e)
        return future.result()

    def window_row_count(self, w: int) -> int:
        with self._lock:
            if w in self._counts:
                return self._counts[w]
        return self.window(w)[1].num_rows

    def _perm(self, *key: int) -> np.ndarray:
        """Window order of epoch e (key (e,)), or row order of window w in epoch e (key (e, w))."""
        with self._lock:
            if key not in self._perms:
                n = len(self.windows) if len(key) == 1 else self._counts[key[1]]
                self._perms[key] = np.random.default_rng([self.seed, *key]).permutation(n)
                while len(self._perms) > 8:
                    self._perms.popitem(last=False)
            return self._perms[key]

    @property
    def known_row_counts(self) -> dict[int, int]:
        """Rows per window for the windows tokenized so far (all of them once an epoch is known)."""
        with self._lock:
            return dict(self._counts)

    @property
    def rows_per_epoch(self) -> int | None:
        """Rows (sequences) per epoch; None while windows not yet tokenized leave it unknown."""
        with self._lock:
            return sum(self._counts.values()) if len(self._counts) == len(self.windows) else None

    @property
    def steps_per_epoch(self) -> float | None:
        r = self.rows_per_epoch
        return None if r is None else r / self.batch_size

    # -- locating global samples ---------------------------------------------------------------------

    def _cumulative(self, epoch: int) -> np.ndarray:
        """End offsets of the windows' rows along `epoch`'s window order (only a prefix when unknown)."""
        if self.rows_per_epoch is None:
            return np.asarray(self._prefix0, np.int64)
        with self._lock:
            if ("cum", epoch) not in self._perms:
                order = self._perm(epoch).tolist()
                self._perms["cum", epoch] = np.cumsum([self._counts[w] for w in order], dtype=np.int64)
            return self._perms["cum", epoch]

    def _walk_epoch0(self, g_max: int) -> None:
        """Learn row counts along epoch 0's window order until sample g_max is placed (tokenizing windows
        whose counts are not yet known) or the epoch's total is known."""
        order = self._perm(0).tolist()
        while self.rows_per_epoch is None:
            with self._lock:
                i = len(self._prefix0)
                if i and self._prefix0[-1] > g_max:
                    return
            if i == len(order):
                break
            c = self.window_row_count(order[i])
            with self._lock:
                if len(self._prefix0) == i:
                    self._prefix0.append((self._prefix0[-1] if i else 0) + c)
        if self.rows_per_epoch == 0:
            raise no_text(self.docs)

    def _locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, window, row within the window's shuffled order) of global samples g."""
        self._walk_epoch0(int(g.max()))
        total = self.rows_per_epoch
        epoch, r = np.divmod(g, total) if total is not None else (np.zeros_like(g), g)
        window, k = np.empty_like(g), np.empty_like(g)
        for e in np.unique(epoch).tolist():
            m = epoch == e
            cum = self._cumulative(e)
            i = np.searchsorted(cum, r[m], side="right")
            window[m] = self._perm(e)[i]
            k[m] = r[m] - (cum[i] - np.asarray([self._counts[w] for w in window[m].tolist()], np.int64))
        return epoch, window, k

    def rows_for_step(self, step: int, process_index=None, process_count=None, *, rows: slice | None = None):
        """(window, row) pairs, shape [local_batch, 2], that this process reads at `step`."""
        sl = local_rows(self.batch_size, process_index, process_count, rows)
        g = step * self.batch_size + np.arange(sl.start, sl.stop, dtype=np.int64)
        epoch, window, k = self._locate(g)
        row = np.empty_like(k)
        for e, w in sorted({(int(a), int(b)) for a, b in zip(epoch, window)}):
            m = (epoch == e) & (window == w)
            row[m] = self._perm(e, w)[k[m]]
        if self._background is not None:
            self._prefetch_next_window(int(epoch[-1]), int(window[-1]))
        return np.stack([window, row], axis=1)

    def _prefetch_next_window(self, epoch: int, window: int) -> None:
        order = self._perm(epoch)
        pos = int(np.flatnonzero(order == window)[0])
        nxt = int(order[pos + 1]) if pos + 1 < len(order) else int(self._perm(epoch + 1)[0])
        with self._lock:
            if nxt in self._loaded:
                return
        self._background.submit(self.window, nxt)

    def batch_for_step(self, step: int, process_index=None, process_count=None, *, rows: slice | None = None):
        """This process's [local_batch, seq_len] slice of the global batch at `step`.

        process_index/process_count default to jax's; `rows` (a slice of the global batch) overrides both,
        e.g. sharding.process_batch_slice(mesh, batch_size) when the mesh orders processes differently.
        """
        pairs = self.rows_for_step(step, process_index, process_count, rows=rows)
        out = None
        for w in np.unique(pairs[:, 0]).tolist():
            m = pairs[:, 0] == w
            stream, window_rows = self.window(w)
            part = gather(stream.tokens, window_rows, pairs[m, 1], self.pad_id, stream.trained)
            if out is None:
                out = {k: np.empty((len(pairs),) + v.shape[1:], v.dtype) for k, v in part.items()}
            for key, v in part.items():
                out[key][m] = v
        return out

    # -- iteration and state -------------------------------------------------------------------------

    def state(self, step: int) -> dict:
        """JSON-able data state for resuming at `step` (the checkpoint's "data_state" item)."""
        with self._lock:
            counts = sorted(self._counts.items())
        return {"step": int(step), "fingerprint": self.fingerprint, "window_rows": [list(c) for c in counts]}

    def restore(self, state: dict) -> int:
        """Check a saved `state` against this data, reuse its window row counts, return its step."""
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                "the saved data state was written with a different data config (dataset, split, tokenizer, "
                "seq_len, batch_size, seed, packing or window_docs), so resuming would not replay the same "
                f"batches. Restore that config, or resume at the step anyway with start={state.get('step')} "
                "(an int)."
            )
        with self._lock:
            for w, c in state.get("window_rows", []):
                self._counts.setdefault(int(w), int(c))
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
