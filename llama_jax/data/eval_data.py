"""Held-out data: every target scored once, in order, with exact token and UTF-8 byte totals for loss per
token and bits per byte (llama_jax/data/__init__, "Held-out eval").

SFT records (data.format="sft") score only their trained targets (llama_jax/data/sft.py); bytes are those of
the scored tokens' text.

Rows are build_rows' (non-overlapping windows) or, with a stride, `window_layout`'s sliding windows, in
which each target is predicted from at least seq_len - stride + 1 tokens of context. The scored set and the
token and byte totals are the same either way; only the context differs. Windows never cross a span: the
whole stream in concat mode, one document in packed mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from llama_jax.data import cache as token_cache
from llama_jax.data import files, sft
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.data.packing import Rows, build_rows, gather, local_rows, pad_id_of, window_layout
from llama_jax.data.sources import Documents, check_no_leak, no_text, source_for_role
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream, tokenize
from llama_jax.errors import DataError


class EvalData:
    """The rows of a token stream once, in order, with what they score.

    `num_tokens` = scored targets of the whole split, `num_bytes` = UTF-8 bytes of the text they encode;
    summed over all batches (and processes), loss_mask gives num_tokens and target_bytes gives num_bytes.
    """

    def __init__(self, stream: TokenStream, rows: Rows, tokenizer: Tokenizer, *, batch_size: int):
        self.stream, self.rows, self.batch_size = stream, rows, int(batch_size)
        self.pad_id = pad_id_of(tokenizer)
        tokens, ds = stream.tokens, stream.doc_starts
        n = len(tokens)
        # How many rows score each stream position (a row scores its targets from column `first` on).
        first = np.zeros_like(rows.start) if rows.first is None else rows.first
        diff = np.zeros(n + 1, np.int64)
        np.add.at(diff, rows.start + 1 + first, 1)
        np.add.at(diff, rows.start + 1 + rows.length, -1)
        times = np.cumsum(diff[:n])
        if times.max(initial=0) > 1:
            raise AssertionError("eval rows score a target twice")  # a bug in the layout, not bad input
        is_target = times == 1
        self.scored = is_target.copy()
        if stream.add_bos:
            self.scored[ds[:-1]] = False
        self.weights = np.zeros(n, np.int64)
        if stream.trained is not None:
            # SFT records: only trained targets are scored, and a record's bytes (those of its trained tokens'
            # text, sft.tokenize_records) sit on its last scored token.
            self.scored &= stream.trained
            idx = np.flatnonzero(self.scored)
            last = np.searchsorted(idx, ds[1:]) - 1  # per record: its last scored token, as an index into idx
            has = np.zeros(len(ds) - 1, bool)
            if len(idx):
                has = (last >= 0) & (idx[np.maximum(last, 0)] >= ds[:-1])
            np.add.at(self.weights, idx[last[has]], stream.doc_bytes[has])
            self.num_tokens = int(self.scored.sum())
            self.num_bytes = int(self.weights[self.scored].sum())
            return
        # Bytes of each document sit on its last token.
        nonempty = np.flatnonzero(np.diff(ds) > 0)
        np.add.at(self.weights, ds[nonempty + 1] - 1, stream.doc_bytes[nonempty])
        if not stream.add_bos:
            # A document's first token with no context is never a target: move its bytes onto it (unscored).
            first_tok = ds[:-1]
            content_end = ds[1:] - (1 if stream.add_eos else 0)
            for d in np.flatnonzero((first_tok < content_end) & ~is_target[np.minimum(first_tok, n - 1)]).tolist():
                b = len(tokenizer.decode([int(tokens[first_tok[d]])]).encode("utf-8"))
                self.weights[ds[d + 1] - 1] -= b
                self.weights[first_tok[d]] += b
        self.num_tokens = int(self.scored.sum())
        self.num_bytes = int(self.weights[self.scored].sum())

    @classmethod
    def from_config(cls, data: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int) -> EvalData:
        """The held-out data of a one-source config (eval_sets for several), checked not to overlap the
        training data."""
        sets = eval_sets(data, tokenizer, seq_len=seq_len, batch_size=batch_size)
        if len(sets) != 1:
            raise DataError(f"this config has {len(sets)} held-out sets ({sorted(sets)}): use eval_sets.")
        return next(iter(sets.values()))

    @property
    def num_batches(self) -> int:
        return -(-self.rows.num_rows // self.batch_size)

    def batch(self, index: int, process_index=None, process_count=None, *, rows: slice | None = None) -> dict:
        """Eval batch `index` (this process's rows); rows past the end of the split are empty and masked."""
        sl = local_rows(self.batch_size, process_index, process_count, rows)
        row_ids = index * self.batch_size + np.arange(sl.start, sl.stop)
        row_ids[row_ids >= self.rows.num_rows] = -1
        return gather(self.stream.tokens, self.rows, row_ids, self.pad_id, self.scored, self.weights)

    def batches(self, process_index=None, process_count=None, *, rows: slice | None = None) -> Iterator[dict]:
        """Every row once, in order."""
        for i in range(self.num_batches):
            yield self.batch(i, process_index, process_count, rows=rows)


def eval_windows(
    docs: Documents,
    tokenizer: Tokenizer,
    options: DataConfig | None = None,
    *,
    seq_len: int,
    batch_size: int,
    stride: int = 0,
) -> EvalData:
    """EvalData of `docs` (packing, add_bos, add_eos from `options`): build_rows' rows, or with `stride`
    sliding windows spanning the whole stream (concat; attention crosses documents, as in concat training)
    or one document each (packed)."""
    options = options or DataConfig()
    if options.format == "sft":
        stream, _ = sft.tokenize_records(docs, sft.Formatter.from_config(options, tokenizer), seq_len=seq_len)
    else:
        stream = tokenize(docs, tokenizer, add_bos=options.add_bos, add_eos=options.add_eos)
    if stride:
        ds = stream.doc_starts
        if options.packing == "packed":
            starts, ends = ds[:-1], ds[1:]
        else:
            starts, ends = np.array([0]), np.array([len(stream.tokens)])
        rows = window_layout(starts, ends, seq_len, stride)
    else:
        rows = build_rows(stream, seq_len, options.packing)
    ev = EvalData(stream, rows, tokenizer, batch_size=batch_size)
    if ev.num_tokens == 0 or ev.num_bytes == 0:
        raise DataError(f"{docs.name} has no text to score (empty, or shorter than two tokens).")
    return ev


def eval_sets(data: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int) -> dict[str, EvalData]:
    """Each source's held-out data, by source name (a source of several without held-out files has none),
    then each extra held-out set of data.eval_sets, by its name; all checked not to overlap any training
    data. With data.cache_dir each is tokenized once into the cache (CACHE/NAME/eval)."""
    check_no_leak(data)
    out = {cfg.name: _held_out(cfg, data, tokenizer, seq_len=seq_len, batch_size=batch_size)
           for cfg in data.held_out_configs()}
    if not out:
        raise DataError("no source names held-out data: set eval_files (or a TFDS eval_split) on a source, or "
                        "name a held-out set in data.eval_sets.")
    return out


def _held_out(cfg: SourceConfig, data: DataConfig, tokenizer: Tokenizer, *, seq_len: int, batch_size: int) -> EvalData:
    source = source_for_role(cfg, data, "eval")
    if data.format == "sft":
        stream = sft.tokenize_source(source, sft.Formatter.from_config(data, tokenizer), seq_len=seq_len)
    else:
        _, shards = token_cache.open_source(source, tokenizer, cache_dir=data.cache_dir, role="eval",
                                            add_bos=data.add_bos, add_eos=data.add_eos)
        stream = concat_streams([s.stream() for s in shards])
    if int(stream.doc_bytes.sum()) == 0:
        raise no_text(source.description)
    return EvalData(stream, build_rows(stream, seq_len, data.packing), tokenizer, batch_size=batch_size)


def concat_streams(streams: list[TokenStream]) -> TokenStream:
    """One in-memory stream of several (held-out shards, read whole: eval scores every token)."""
    tokens = [s.tokens if isinstance(s.tokens, np.ndarray) else s.tokens.ranges([0], [len(s.tokens)])[0]
              for s in streams]
    if len(streams) == 1 and isinstance(streams[0].tokens, np.ndarray):
        return streams[0]
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    starts = [np.asarray(s.doc_starts[:-1]) + o for s, o in zip(streams, offsets)]
    return TokenStream(
        np.concatenate(tokens), np.concatenate([*starts, [offsets[-1]]]).astype(np.int64),
        np.concatenate([s.doc_bytes for s in streams]).astype(np.int64), streams[0].add_bos, streams[0].add_eos,
        None if streams[0].trained is None else np.concatenate([s.trained for s in streams]),
    )


def text_file_documents(path: str) -> Documents:
    """A UTF-8 text file as one document."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise DataError(f"text file {path} does not exist (relative paths start at {os.getcwd()}).")
    return Documents.from_texts([files.read_text(full, "--text_file")], name=f"file {path}")
