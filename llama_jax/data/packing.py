"""A token stream -> rows of seq_len positions ("concat" or "packed"), and rows -> batch dicts."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from llama_jax.data.config import PACKING_MODES
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream
from llama_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows of seq_len positions, each a few pieces of the stream: row r holds pieces row_ptr[r]:row_ptr[r+1].

    A piece of `length` n starting at stream index s fills columns offset..offset+n-1 of its row with inputs
    stream[s:s+n] and targets stream[s+1:s+n+1] at RoPE positions 0..n-1.
    """

    seq_len: int
    row_ptr: np.ndarray  # (R+1,) int64
    start: np.ndarray  # (P,) int64
    length: np.ndarray  # (P,) int64, 1..seq_len
    offset: np.ndarray  # (P,) int64
    segment: np.ndarray  # (P,) int32, 1-based within the row
    # (P,) int64: columns before offset + first[p] are context only, not scored (sliding eval windows);
    # None = every target of every piece is scored.
    first: np.ndarray | None = None

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


def row_count(num_tokens: int, seq_len: int) -> int:
    """Rows of a stream of num_tokens in "concat" mode (build_rows' count, without building them)."""
    return -(-max(int(num_tokens) - 1, 0) // seq_len)


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


def window_layout(span_starts, span_ends, seq_len: int, stride: int | None = None) -> Rows:
    """Eval rows over spans [span_starts[i], span_ends[i]) of a token stream, one window per row.

    A span of n tokens has n - 1 targets, its tokens after the first. stride None (or 0): consecutive
    non-overlapping windows of up to seq_len targets (build_rows' concat rows). stride S (0 < S <= seq_len),
    as in Hugging Face's perplexity guide: the first window scores up to seq_len targets; window j >= 1 ends
    at target min(seq_len + j*S, n - 1), holds the seq_len inputs before it and scores only its targets not
    scored before (at most S), its first columns being context (`Rows.first`). Every target is scored
    exactly once, predicted from at least seq_len - S + 1 preceding tokens of its span.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and stride != 0 and not 0 < stride <= seq_len:
        raise DataError(f"stride must satisfy 0 < stride <= seq_len={seq_len}, got {stride}")
    s0 = np.asarray(span_starts, np.int64)
    targets = np.maximum(np.asarray(span_ends, np.int64) - s0 - 1, 0)  # per span
    L = int(seq_len)
    if not stride:
        count = -(-targets // L)
    else:
        count = (targets > 0) + -(-np.maximum(targets - L, 0) // stride)
    span = np.repeat(np.arange(len(s0)), count)
    j = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # window index within its span
    t = targets[span]
    if not stride:
        start = s0[span] + j * L
        length = np.minimum(L, t - j * L)
        first = np.zeros_like(j)
    else:
        end = np.where(j == 0, np.minimum(L, t), np.minimum(L + j * stride, t))  # last target, span-relative
        prev_end = np.where(j == 0, 0, L + (j - 1) * stride)
        length = np.where(j == 0, end, L)
        start = s0[span] + end - length
        first = length - (end - prev_end)
    n = len(start)
    return Rows(
        L, np.arange(n + 1), start.astype(np.int64), length.astype(np.int64), np.zeros(n, np.int64),
        np.ones(n, np.int32), first.astype(np.int64),
    )


def empty_batch(b: int, seq_len: int, pad_id: int, with_bytes: bool = False) -> dict:
    """A batch of b empty rows: padding everywhere, nothing scored."""
    out = {
        "inputs": np.full((b, seq_len), pad_id, np.int32),
        "targets": np.full((b, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((b, seq_len), np.float32),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "positions": np.zeros((b, seq_len), np.int32),
    }
    if with_bytes:
        out["target_bytes"] = np.zeros((b, seq_len), np.int32)
    return out


def gather(tokens, rows: Rows, row_ids: np.ndarray, pad_id: int, scored=None, weights=None, *,
           into: dict | None = None, at: np.ndarray | None = None) -> dict:
    """Materialise rows `row_ids` (-1 = an empty, fully masked row) as a batch dict, vectorised.

    loss_mask is 1 on the targets a row scores (all but a piece's first `first` columns), times `scored`
    (per stream position) when given; `weights` (per stream position) adds `target_bytes` under that mask.
    `into` (an empty_batch) and `at` (its row for each of row_ids): write there instead of a new batch.
    """
    L = rows.seq_len
    out = empty_batch(len(row_ids), L, pad_id, weights is not None) if into is None else into
    at = np.arange(len(row_ids)) if at is None else np.asarray(at)
    batch_row = np.flatnonzero(row_ids >= 0)
    r = row_ids[batch_row]
    count = rows.row_ptr[r + 1] - rows.row_ptr[r]
    piece = np.repeat(rows.row_ptr[r] - (np.cumsum(count) - count), count) + np.arange(count.sum())
    n = rows.length[piece]
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    # One flat index into the [b, L] arrays, computed once for all of them.
    flat = np.repeat(np.repeat(at[batch_row], count) * L + rows.offset[piece], n) + j
    if isinstance(tokens, np.ndarray):
        src = np.repeat(rows.start[piece], n) + j
        inputs, targets = tokens[src], tokens[src + 1]
    else:  # a cache.TokenFile: read each piece's tokens (and the one after) by range
        starts = rows.start[piece]
        chunks = tokens.ranges(starts, starts + n + 1)
        buf = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
        k = np.repeat(np.cumsum(n + 1) - (n + 1), n) + j
        inputs, targets = buf[k], buf[k + 1]
    out["inputs"].reshape(-1)[flat] = inputs
    out["targets"].reshape(-1)[flat] = targets
    out["positions"].reshape(-1)[flat] = j
    out["segment_ids"].reshape(-1)[flat] = np.repeat(rows.segment[piece], n)
    mask = np.ones(len(j), bool) if rows.first is None else j >= np.repeat(rows.first[piece], n)
    if scored is not None:
        mask &= scored[np.repeat(rows.start[piece], n) + j + 1]
    out["loss_mask"].reshape(-1)[flat] = mask
    if weights is not None:
        out["target_bytes"].reshape(-1)[flat] = weights[np.repeat(rows.start[piece], n) + j + 1] * mask
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


def pad_id_of(tokenizer: Tokenizer) -> int:
    # Padding is masked out of the loss; the id only has to be a valid embedding row.
    for i in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if i is not None:
            return i
    raise AssertionError("unreachable")

