"""Input pipeline: text documents -> token streams -> fixed-length rows -> batches that are a pure function
of the step.

Sources (section `config.data`, see llama_jax/defaults.py)
  * TFDS: any dataset with a text feature (`tfds_name`, `text_key`, `data_dir` (may be gs://), `manual_dir`
    for offline builds). Splits use TFDS syntax, slicing included ("train[:95%]"); slices count *examples*,
    so tiny_shakespeare (one example per split) is used with its own train/validation/test splits. Datasets
    are built as array_record, read with `tfds.data_source` (random access).
  * Local files (`train_files` / `eval_files`, comma-separated globs; when `train_files` is set, TFDS is not
    used): `.jsonl` = one document per line (field `text_key`); any other file = one UTF-8 document per
    file; read into memory. Held-out data for local files is whatever `eval_files` names; the same file in
    both is an error.

Token stream and windows
  Documents are tokenized into one array per *window*: `[BOS] ids [EOS]` per document (`add_bos` /
  `add_eos`), documents in split order. By default (`window_docs=0`) the whole split is one window,
  tokenized once up front and kept in memory (or, with `cache_dir`, a local dir, as .npy files,
  memory-mapped on later runs). For datasets too big for that (C4), `window_docs=N` cuts the split into
  windows of N consecutive documents, each tokenized only when training reaches it (the next one in a
  background thread; the last few are kept). Eval splits are always one window.

Rows (`packing`), L = seq_len, built per window
  * "concat": row r is stream[r*L : r*L + L + 1] (inputs = [:-1], targets = [1:]). Consecutive rows share one
    token, so every stream token except the window's very first (a BOS with add_bos) is a target exactly
    once; the last row is shorter and padded. Nothing else is dropped. Attention crosses documents
    (segment_ids all 1, positions 0..L-1).
  * "packed": each document is cut into pieces of at most L+1 tokens (again sharing one token, so every
    document token except its first is a target exactly once) and pieces are packed into rows of L positions
    next-fit, in split order (computed once per window, not per epoch). segment_ids number the pieces
    1, 2, ... within a row and positions restart at 0 for each, so attention stays inside a document;
    padding has segment_id 0 and loss_mask 0. Nothing is dropped.

Batches: dict of int32 [batch, seq_len] arrays `inputs`, `targets`, `segment_ids`, `positions` and float32
`loss_mask` (0 on padding). Eval batches add int32 `target_bytes` (see below).

Epochs and exact resume
  Epoch e visits the windows in the order of a permutation seeded by (seed, e), and each window's rows in
  the order of a permutation seeded by (seed, e, window). Global sample g = step * batch_size + i
  (i < batch_size) is the g-th row of that sequence. So each epoch reads every row exactly once, batches
  may straddle an epoch boundary (nothing is dropped at an epoch's end), and the batch of a step depends
  only on (seed, step, data config): with one window, row perm_e[g mod R] for R rows. The iterator state is
  the step, plus the row counts of the windows seen so far (so a resume need not re-tokenize the windows
  before it to find its place).

Multi-host: the global batch is split into process_count equal slices; process p reads only rows
  [p*b, (p+1)*b) of it (b = batch_size / process_count), or the `rows` slice it is given (the rows its
  devices own in the mesh). `llama_jax.sharding.shard_batch` assembles the jax.Arrays. With windows, every process
  tokenizes every window (they all need the row counts); it reads only its own rows.

Held-out eval (`EvalData.batches`): the eval split's rows in order, once, no shuffling; the last batch
  is padded with empty rows (loss_mask 0). Scored targets are every target except BOS tokens (a BOS follows
  an EOS by construction, so it carries no information). Bytes for bits-per-byte: each document's UTF-8 byte
  count is put on its last token (its EOS with add_eos) and `target_bytes` is that weight at scored targets,
  so summing `target_bytes` over the split gives the exact number of bytes of text the scored tokens encode.
  One thing is not scored: a document's first content token when nothing precedes it (with add_bos=False:
  the first token of the split in concat mode, of every document in packed mode); its bytes are left out
  (len(decode([token]).encode()); exact for the byte tokenizer). So with add_bos=True and the byte
  tokenizer, eval bytes == the split's UTF-8 size exactly.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import difflib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator

import numpy as np

from llama_jax.tokenizer import Tokenizer, check_vocab, load_tokenizer

PACKING_MODES = ("concat", "packed")
_CACHE_VERSION = "v1"
_CHUNK_DOCS = 1024  # documents tokenized per encode_arrays call
_CHUNK_CHARS = 8 << 20  # ... or fewer when they are long, to bound memory


class DataError(ValueError):
    """Bad data configuration or input; the message says what to do."""


# --------------------------------------------------------------------------------------------------------
# Documents


@dataclasses.dataclass(frozen=True)
class Documents:
    """The documents of one split: `read(lo, hi)` yields texts lo..hi-1; a name for messages; a cache key."""

    name: str
    key: str
    num_docs: int
    read: Callable[[int, int], Iterator[str]]

    def __len__(self) -> int:
        return self.num_docs

    def __iter__(self) -> Iterator[str]:
        return self.read(0, self.num_docs)

    @classmethod
    def from_texts(cls, texts: list[str], name: str = "texts") -> Documents:
        key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
        return cls(name, f"texts:{key}", len(texts), lambda lo, hi: iter(texts[lo:hi]))


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _tfds_builder(name: str, data_dir: str, manual_dir: str):
    """The prepared array_record builder for `name`, building it first if needed (offline with manual_dir)."""
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See tfds.list_builders() for names."
        raise DataError(f"unknown TFDS dataset {name!r} (--config.data.tfds_name).{hint}") from e
    except ValueError as e:
        if "File format is already set" in str(e):
            raise DataError(
                f"TFDS dataset {name!r} in data_dir {data_dir or '(default)'} was built as tfrecord, but the "
                "pipeline needs random access (array_record). Point --config.data.data_dir at another "
                "directory (it is rebuilt there), or delete the old build."
            ) from e
        raise
    if builder.is_prepared():
        return builder
    download_config = None
    if manual_dir:
        if not os.path.isdir(manual_dir):
            raise DataError(f"manual_dir {manual_dir} does not exist (--config.data.manual_dir).")
        if builder.name == "tiny_shakespeare" and not os.path.exists(os.path.join(manual_dir, "input.txt")):
            raise DataError(
                f"manual_dir {manual_dir} has no input.txt: copy karpathy's tiny-shakespeare input.txt "
                f"there to build tiny_shakespeare offline (from the repo root: `cp "
                f"../shared/data/tinyshakespeare.txt {manual_dir}/input.txt`)."
            )
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as e:  # TFDS raises many types; all get the fix named
        raise DataError(
            f"could not build TFDS dataset {name!r} into {builder.data_dir}: {type(e).__name__}: {e}\n"
            "If the machine is offline or the dataset needs manual files, put the downloaded files in a "
            "directory and pass it as --config.data.manual_dir (tiny_shakespeare: input.txt); or point "
            "--config.data.data_dir at a directory where the dataset is already built."
        ) from e
    return builder


def _split_ranges(builder, split: str) -> list[tuple[str, int, int]]:
    """(split name, from, to) example ranges a TFDS split string selects, validated."""
    tfds = _tfds()
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError) as e:
        raise DataError(
            f"bad split {split!r} for TFDS dataset {builder.name}: {e}. Available splits: "
            f"{sorted(builder.info.splits)}; slices look like 'train[:95%]' or 'train[1000:]'."
        ) from e
    out = []
    for ins in instructions:
        n = builder.info.splits[ins.splitname].num_examples
        out.append((ins.splitname, ins.from_ or 0, n if ins.to is None else ins.to))
    return out


def tfds_documents(
    name: str, split: str, *, text_key: str = "text", data_dir: str = "", manual_dir: str = ""
) -> Documents:
    """The `text_key` texts of a TFDS split (built first if needed), read by random access."""
    builder = _tfds_builder(name, data_dir, manual_dir)
    if sum(b - a for _, a, b in _split_ranges(builder, split)) <= 0:
        raise DataError(f"split {split!r} of TFDS dataset {builder.name} is empty; choose another split.")
    source = builder.as_data_source(split=split)
    keys = list(builder.info.features.keys())
    if text_key not in keys:
        raise DataError(
            f"TFDS dataset {builder.name} has no feature {text_key!r}; its features are {keys}. Set "
            "--config.data.text_key to the one holding the text."
        )

    def read(lo: int, hi: int) -> Iterator[str]:
        for a in range(lo, hi, 256):
            for record in source.__getitems__(list(range(a, min(a + 256, hi)))):
                text = record[text_key]
                yield text.decode("utf-8") if isinstance(text, bytes) else str(text)

    key = f"tfds:{builder.info.full_name}:{split}:{text_key}"
    return Documents(f"TFDS {builder.info.full_name} split {split!r}", key, len(source), read)


def _expand_files(patterns: str, what: str) -> list[str]:
    paths: list[str] = []
    for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise DataError(f"{what}: no file matches {pattern!r}; check the path (relative to the cwd).")
        paths += [p for p in found if os.path.isfile(p)]
    if not paths:
        raise DataError(f"{what} names no files: give comma-separated files or globs.")
    return paths


def file_documents(patterns: str, *, text_key: str = "text", what: str = "data files") -> Documents:
    """Documents of local files (read into memory): `.jsonl` = one per line (field `text_key`), other files =
    one per file."""
    paths = _expand_files(patterns, what)
    texts: list[str] = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_key not in record:
                        raise DataError(
                            f"{path}:{lineno} has no field {text_key!r}; its fields are "
                            f"{sorted(record)}. Set --config.data.text_key."
                        )
                    texts.append(record[text_key])
        else:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    stats = [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    return Documents(
        f"files {patterns!r}", f"files:{stats}:{text_key}", len(texts), lambda lo, hi: iter(texts[lo:hi])
    )


def documents_for_role(data_cfg, role: str) -> Documents:
    """The training ("train") or held-out ("eval") documents `config.data` names."""
    if role not in ("train", "eval"):
        raise ValueError(role)
    if data_cfg.get("train_files", ""):
        files = data_cfg.train_files if role == "train" else data_cfg.get("eval_files", "")
        if not files:
            raise DataError(
                "with --config.data.train_files, held-out data must be named too: set "
                "--config.data.eval_files (files not among the training files)."
            )
        return file_documents(files, text_key=data_cfg.text_key, what=f"data.{role}_files")
    return tfds_documents(
        data_cfg.tfds_name,
        data_cfg.train_split if role == "train" else data_cfg.eval_split,
        text_key=data_cfg.text_key,
        data_dir=data_cfg.get("data_dir", ""),
        manual_dir=data_cfg.get("manual_dir", ""),
    )


def check_no_leak(data_cfg) -> None:
    """Raise if the eval data overlaps the training data (same TFDS examples or the same local file)."""
    if data_cfg.get("train_files", ""):
        if not data_cfg.get("eval_files", ""):
            return
        train = {os.path.abspath(p) for p in _expand_files(data_cfg.train_files, "data.train_files")}
        evals = {os.path.abspath(p) for p in _expand_files(data_cfg.eval_files, "data.eval_files")}
        if train & evals:
            raise DataError(
                f"eval files are also training files: {sorted(train & evals)}; held-out data must not be "
                "trained on. Split the data into separate files."
            )
        return
    builder = _tfds_builder(data_cfg.tfds_name, data_cfg.get("data_dir", ""), data_cfg.get("manual_dir", ""))
    for s, a, b in _split_ranges(builder, data_cfg.train_split):
        for t, c, d in _split_ranges(builder, data_cfg.eval_split):
            if s == t and max(a, c) < min(b, d):
                raise DataError(
                    f"eval split {data_cfg.eval_split!r} overlaps train split {data_cfg.train_split!r} "
                    f"(examples {max(a, c)}..{min(b, d) - 1} of {s!r}); use disjoint slices, e.g. "
                    "train_split='train[:95%]', eval_split='train[95%:]'."
                )


# --------------------------------------------------------------------------------------------------------
# Token stream


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split as one token array: document d is tokens[doc_starts[d]:doc_starts[d+1]] = [BOS] ids [EOS]."""

    tokens: np.ndarray  # (N,) uint16 or int32; an np.memmap when read from the cache
    doc_starts: np.ndarray  # (D+1,) int64
    doc_bytes: np.ndarray  # (D,) int64 UTF-8 bytes of each document's text
    add_bos: bool
    add_eos: bool

    @property
    def num_docs(self) -> int:
        return len(self.doc_bytes)


def _stream_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def tokenize(
    docs: Documents,
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    cache_dir: str = "",
    lo: int = 0,
    hi: int | None = None,
) -> TokenStream:
    """Tokenize documents lo..hi-1 of `docs` (default all) in chunks, with the tokenizer's batch encoder."""
    hi = len(docs) if hi is None else hi
    for flag, tid, what in ((add_bos, tokenizer.bos_id, "BOS"), (add_eos, tokenizer.eos_id, "EOS")):
        if flag and tid is None:
            raise DataError(
                f"the tokenizer has no {what} token; set --config.data.add_{what.lower()}=False or use a "
                "tokenizer that has one."
            )
    key = hashlib.sha256(
        f"{_CACHE_VERSION}|{docs.key}|{lo}:{hi}|{tokenizer.fingerprint()}|{add_bos}|{add_eos}".encode()
    ).hexdigest()[:24]
    cached = os.path.join(cache_dir, key) if cache_dir else ""
    if cached and os.path.exists(os.path.join(cached, "doc_bytes.npy")):
        return TokenStream(
            np.load(os.path.join(cached, "tokens.npy"), mmap_mode="r"),
            np.load(os.path.join(cached, "doc_starts.npy")),
            np.load(os.path.join(cached, "doc_bytes.npy")),
            add_bos,
            add_eos,
        )

    dtype = _stream_dtype(tokenizer)
    bos = np.array([tokenizer.bos_id] if add_bos else [], dtype)
    eos = np.array([tokenizer.eos_id] if add_eos else [], dtype)
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    nbytes: list[int] = []
    chunk: list[str] = []
    chunk_chars = 0

    def flush():
        pieces = []
        for arr in tokenizer.encode_arrays(chunk):
            pieces += [bos, arr.astype(dtype, copy=False), eos]
            lengths.append(len(bos) + len(arr) + len(eos))
        nbytes.extend(len(t.encode("utf-8")) for t in chunk)
        if pieces:
            parts.append(np.concatenate(pieces))
        chunk.clear()

    for text in docs.read(lo, hi):
        chunk.append(text)
        chunk_chars += len(text)
        if len(chunk) >= _CHUNK_DOCS or chunk_chars >= _CHUNK_CHARS:
            flush()
            chunk_chars = 0
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    stream = TokenStream(tokens, doc_starts, np.asarray(nbytes, np.int64), add_bos, add_eos)
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=key + ".tmp")
        np.save(os.path.join(tmp, "tokens.npy"), tokens)
        np.save(os.path.join(tmp, "doc_starts.npy"), doc_starts)
        np.save(os.path.join(tmp, "doc_bytes.npy"), stream.doc_bytes)
        try:
            os.rename(tmp, cached)  # atomic: concurrent writers (other hosts) produce identical files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return stream


# --------------------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows of seq_len positions, each a few pieces of the stream: row r holds pieces row_ptr[r]:row_ptr[r+1].

    A piece of `length` n starting at stream index s fills columns offset..offset+n-1 of its row with inputs
    stream[s:s+n] and targets stream[s+1:s+n+1].
    """

    seq_len: int
    row_ptr: np.ndarray  # (R+1,) int64
    start: np.ndarray  # (P,) int64
    length: np.ndarray  # (P,) int64, 1..seq_len
    offset: np.ndarray  # (P,) int64
    segment: np.ndarray  # (P,) int32, 1-based within the row

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def _chunk(starts: np.ndarray, num_targets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut spans (start, number of targets) into pieces of at most seq_len targets, sharing one token."""
    num_targets = np.maximum(num_targets, 0)
    k = -(-num_targets // seq_len)  # pieces per span
    span = np.repeat(np.arange(len(starts)), k)
    j = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
    return starts[span] + j * seq_len, np.minimum(seq_len, num_targets[span] - j * seq_len)


def build_rows(stream: TokenStream, seq_len: int, packing: str = "concat") -> Rows:
    """The rows of a token stream in `packing` mode ("concat" or "packed"; module docstring)."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if packing == "concat":
        start, length = _chunk(np.array([0]), np.array([len(stream.tokens) - 1]), seq_len)
        n = len(start)
        return Rows(seq_len, np.arange(n + 1), start, length, np.zeros(n, np.int64), np.ones(n, np.int32))
    if packing != "packed":
        raise DataError(f"data.packing must be one of {PACKING_MODES}, not {packing!r}")
    ds = stream.doc_starts
    start, length = _chunk(ds[:-1], np.diff(ds) - 1, seq_len)
    # Next-fit: pieces in stream order, a new row whenever the next piece does not fit.
    row_of = np.empty(len(start), np.int64)
    offset = np.empty(len(start), np.int64)
    row, used = 0, 0
    for i, n in enumerate(length.tolist()):
        if used + n > seq_len:
            row, used = row + 1, 0
        row_of[i], offset[i] = row, used
        used += n
    num_rows = row + 1 if len(start) else 0
    row_ptr = np.searchsorted(row_of, np.arange(num_rows + 1))
    segment = (np.arange(len(start)) - row_ptr[row_of] + 1).astype(np.int32)
    return Rows(seq_len, row_ptr, start, length, offset, segment)


def _gather(tokens, rows: Rows, row_ids: np.ndarray, pad_id: int, scored=None, weights=None) -> dict:
    """Materialise rows `row_ids` (-1 = an empty, fully masked row) as a batch dict, vectorised."""
    b, L = len(row_ids), rows.seq_len
    out = {
        "inputs": np.full((b, L), pad_id, np.int32),
        "targets": np.full((b, L), pad_id, np.int32),
        "loss_mask": np.zeros((b, L), np.float32),
        "segment_ids": np.zeros((b, L), np.int32),
        "positions": np.zeros((b, L), np.int32),
    }
    if weights is not None:
        out["target_bytes"] = np.zeros((b, L), np.int32)
    batch_row = np.flatnonzero(row_ids >= 0)
    r = row_ids[batch_row]
    count = rows.row_ptr[r + 1] - rows.row_ptr[r]
    piece = np.repeat(rows.row_ptr[r] - (np.cumsum(count) - count), count) + np.arange(count.sum())
    n = rows.length[piece]
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    src = np.repeat(rows.start[piece], n) + j
    row = np.repeat(np.repeat(batch_row, count), n)
    col = np.repeat(rows.offset[piece], n) + j
    out["inputs"][row, col] = tokens[src]
    out["targets"][row, col] = tokens[src + 1]
    out["positions"][row, col] = j
    out["segment_ids"][row, col] = np.repeat(rows.segment[piece], n)
    out["loss_mask"][row, col] = 1.0 if scored is None else scored[src + 1]
    if weights is not None:
        out["target_bytes"][row, col] = weights[src + 1] * scored[src + 1]
    return out


def local_rows(
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: slice | None = None,
) -> slice:
    """The rows of a global batch this process reads: `rows` if given (e.g. the slice a mesh assigns to this
    process), else slice p of process_count equal slices (p = process_index; both default to jax's)."""
    if rows is not None:
        if not 0 <= rows.start < rows.stop <= batch_size or rows.step not in (None, 1):
            raise DataError(f"rows {rows} is not a contiguous slice of a batch of {batch_size}")
        return rows
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise DataError(
            f"batch size {batch_size} must be divisible by the number of processes ({process_count}); "
            "change --config.batch_size."
        )
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} out of range for process_count {process_count}")
    b = batch_size // process_count
    return slice(process_index * b, (process_index + 1) * b)


def _pad_id(tokenizer: Tokenizer) -> int:
    # Padding is masked out of the loss; the id only has to be a valid embedding row.
    for i in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if i is not None:
            return i
    raise AssertionError("unreachable")


def _no_text(docs: Documents) -> DataError:
    return DataError(f"{docs.name} has no text (no documents, or only empty ones); choose another split.")


def _prepare(config, role: str, tokenizer: Tokenizer | None) -> tuple[Tokenizer, Documents]:
    """The tokenizer (checked against the model) and the "train" or "eval" documents of a config."""
    tokenizer = tokenizer or load_tokenizer(config.data.tokenizer)
    if "model" in config and "vocab_size" in config.model:
        check_vocab(tokenizer, config.model.vocab_size)
    check_no_leak(config.data)
    return tokenizer, documents_for_role(config.data, role)


# --------------------------------------------------------------------------------------------------------
# Training data


class TrainData:
    """Shuffled training batches; `batch_for_step(step)` is a pure function of (seed, step, data config).

    `TrainData(config)` reads config.seed, config.batch_size (global), config.seq_len and config.data;
    `tokenizer` defaults to load_tokenizer(config.data.tokenizer).
    """

    def __init__(self, config, tokenizer: Tokenizer | None = None):
        tokenizer, docs = _prepare(config, "train", tokenizer)
        d = config.data
        self._setup(
            docs,
            tokenizer,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=config.seed,
            packing=d.packing,
            add_bos=d.add_bos,
            add_eos=d.add_eos,
            window_docs=d.get("window_docs", 0),
            cache_dir=d.get("cache_dir", ""),
            prefetch=d.get("prefetch", 2),
        )

    @classmethod
    def from_documents(cls, docs: Documents, tokenizer: Tokenizer, **options) -> TrainData:
        """Build without a config (tests, benchmarks): keyword options as `_setup` takes them."""
        self = cls.__new__(cls)
        self._setup(docs, tokenizer, **options)
        return self

    def _setup(
        self,
        docs: Documents,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        packing: str = "concat",
        add_bos: bool = True,
        add_eos: bool = True,
        window_docs: int = 0,
        cache_dir: str = "",
        prefetch: int = 2,
    ):
        if packing not in PACKING_MODES:
            raise DataError(f"data.packing must be one of {PACKING_MODES}, not {packing!r}")
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if len(docs) == 0:
            raise _no_text(docs)
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.batch_size, self.seed, self.packing = seq_len, batch_size, int(seed), packing
        self.add_bos, self.add_eos, self.cache_dir, self.prefetch = add_bos, add_eos, cache_dir, prefetch
        self.pad_id = _pad_id(tokenizer)
        n = len(docs)
        per = window_docs if 0 < window_docs < n else n
        self.windows = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
        # docs.name, not docs.key: a moved data_dir or a re-copied file must not block resuming.
        ident = f"{docs.name}|{tokenizer.fingerprint()}|{add_bos}|{add_eos}|{packing}|{seq_len}"
        ident += f"|{batch_size}|{seed}|{per}"
        self.fingerprint = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self._lock = threading.RLock()
        self._loaded: collections.OrderedDict[int, concurrent.futures.Future] = collections.OrderedDict()
        self._counts: dict[int, int] = {}  # rows per window, once known
        self._prefix0: list[int] = []  # cumulative row counts along epoch 0's window order, as far as known
        # Permutations, and cumulative row counts per epoch (key ("cum", e)).
        self._perms: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._background = concurrent.futures.ThreadPoolExecutor(1) if len(self.windows) > 1 else None
        if len(self.windows) == 1:
            stream, rows = self._window(0)
            if int(stream.doc_bytes.sum()) == 0 or rows.num_rows == 0:
                raise _no_text(docs)

    # -- windows -------------------------------------------------------------------------------------

    def _build_window(self, w: int) -> tuple[TokenStream, Rows]:
        lo, hi = self.windows[w]
        stream = tokenize(
            self.docs,
            self.tokenizer,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
            cache_dir=self.cache_dir,
            lo=lo,
            hi=hi,
        )
        rows = build_rows(stream, self.seq_len, self.packing)
        with self._lock:
            self._counts[w] = rows.num_rows
        return stream, rows

    def _window(self, w: int) -> tuple[TokenStream, Rows]:
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

    def _count(self, w: int) -> int:
        with self._lock:
            if w in self._counts:
                return self._counts[w]
        return self._window(w)[1].num_rows

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
            c = self._count(order[i])
            with self._lock:
                if len(self._prefix0) == i:
                    self._prefix0.append((self._prefix0[-1] if i else 0) + c)
        if self.rows_per_epoch == 0:
            raise _no_text(self.docs)

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
        self._background.submit(self._window, nxt)

    def batch_for_step(self, step: int, process_index=None, process_count=None, *, rows: slice | None = None):
        """This process's [local_batch, seq_len] slice of the global batch at `step`.

        process_index/process_count default to jax's; `rows` (a slice of the global batch) overrides both,
        e.g. sharding.process_batch_slice(mesh, batch_size) when the mesh orders processes differently.
        """
        pairs = self.rows_for_step(step, process_index, process_count, rows=rows)
        out = None
        for w in np.unique(pairs[:, 0]).tolist():
            m = pairs[:, 0] == w
            stream, window_rows = self._window(w)
            part = _gather(stream.tokens, window_rows, pairs[m, 1], self.pad_id)
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


# --------------------------------------------------------------------------------------------------------
# Eval data


class EvalData:
    """The held-out split once, in order, with exact totals for loss per token and bits per byte.

    `EvalData(config)` reads config.seq_len, config.data (eval_split / eval_files; batch size
    data.eval_batch_size, or config.batch_size when 0). `num_tokens` = scored targets of the whole split,
    `num_bytes` = UTF-8 bytes of the text they encode (module docstring: "Held-out eval").
    """

    def __init__(self, config, tokenizer: Tokenizer | None = None):
        tokenizer, docs = _prepare(config, "eval", tokenizer)
        d = config.data
        stream = tokenize(
            docs, tokenizer, add_bos=d.add_bos, add_eos=d.add_eos, cache_dir=d.get("cache_dir", "")
        )
        if int(stream.doc_bytes.sum()) == 0:
            raise _no_text(docs)
        rows = build_rows(stream, config.seq_len, d.packing)
        batch_size = d.get("eval_batch_size", 0) or config.batch_size
        self._setup(stream, rows, tokenizer, batch_size=batch_size, pad_id=_pad_id(tokenizer))

    @classmethod
    def from_documents(
        cls,
        docs: Documents,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        packing: str = "concat",
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> EvalData:
        """Build without a config (tests, benchmarks)."""
        stream = tokenize(docs, tokenizer, add_bos=add_bos, add_eos=add_eos)
        self = cls.__new__(cls)
        self._setup(
            stream,
            build_rows(stream, seq_len, packing),
            tokenizer,
            batch_size=batch_size,
            pad_id=_pad_id(tokenizer),
        )
        return self

    def _setup(self, stream, rows, tokenizer, *, batch_size, pad_id):
        self.stream, self.rows, self.batch_size, self.pad_id = stream, rows, batch_size, pad_id
        tokens, ds = stream.tokens, stream.doc_starts
        n = len(tokens)
        # Which stream positions are some row's target.
        diff = np.zeros(n + 1, np.int64)
        np.add.at(diff, rows.start + 1, 1)
        np.add.at(diff, rows.start + 1 + rows.length, -1)
        is_target = np.cumsum(diff[:n]) > 0
        self.scored = is_target.copy()
        if stream.add_bos:
            self.scored[ds[:-1]] = False
        # Bytes of each document sit on its last token.
        self.weights = np.zeros(n, np.int64)
        nonempty = np.flatnonzero(np.diff(ds) > 0)
        np.add.at(self.weights, ds[nonempty + 1] - 1, stream.doc_bytes[nonempty])
        if not stream.add_bos:
            # A document's first token with no context is never a target: move its bytes onto it (unscored).
            first = ds[:-1]
            content_end = ds[1:] - (1 if stream.add_eos else 0)
            for d in np.flatnonzero((first < content_end) & ~is_target[np.minimum(first, n - 1)]).tolist():
                b = len(tokenizer.decode([int(tokens[first[d]])]).encode("utf-8"))
                self.weights[ds[d + 1] - 1] -= b
                self.weights[first[d]] += b
        self.num_tokens = int(self.scored.sum())
        self.num_bytes = int(self.weights[self.scored].sum())

    @property
    def num_batches(self) -> int:
        return -(-self.rows.num_rows // self.batch_size)

    def batch(self, index: int, process_index=None, process_count=None, *, rows: slice | None = None) -> dict:
        """Eval batch `index` (this process's rows); rows past the end of the split are empty and masked."""
        sl = local_rows(self.batch_size, process_index, process_count, rows)
        row_ids = index * self.batch_size + np.arange(sl.start, sl.stop)
        row_ids[row_ids >= self.rows.num_rows] = -1
        return _gather(self.stream.tokens, self.rows, row_ids, self.pad_id, self.scored, self.weights)

    def batches(
        self, process_index=None, process_count=None, *, rows: slice | None = None
    ) -> Iterator[dict]:
        """Every row once, in order. Summed over all batches (and processes), loss_mask gives `num_tokens`
        and target_bytes gives `num_bytes`."""
        for i in range(self.num_batches):
            yield self.batch(i, process_index, process_count, rows=rows)
