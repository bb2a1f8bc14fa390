"""Documents -> a token stream: `[BOS] ids [EOS]` per document, with document offsets and UTF-8 sizes.
(On disk, shard by shard: llama_jax/data/cache.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from llama_jax.data.sources import Documents
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError

_CHUNK_DOCS = 1024  # documents tokenized per encode_arrays call
_CHUNK_CHARS = 8 << 20  # ... or fewer when they are long, to bound memory


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split as one token array: document d is tokens[doc_starts[d]:doc_starts[d+1]] = [BOS] ids [EOS]
    (an SFT record's tokens as its template renders them, with `trained`)."""

    # (N,) uint16 or int32; a cache.TokenFile (read by range, never whole) when it comes from the cache
    tokens: np.ndarray
    doc_starts: np.ndarray  # (D+1,) int64
    doc_bytes: np.ndarray  # (D,) int64 UTF-8 bytes of each document's text
    add_bos: bool
    add_eos: bool
    # (N,) bool: the targets that are trained (SFT responses, llama_jax/data/sft.py); None = every target.
    trained: np.ndarray | None = None

    @property
    def num_docs(self) -> int:
        return len(self.doc_bytes)


def stream_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def check_specials(tokenizer: Tokenizer, add_bos: bool, add_eos: bool) -> None:
    for flag, tid, what in ((add_bos, tokenizer.bos_id, "BOS"), (add_eos, tokenizer.eos_id, "EOS")):
        if flag and tid is None:
            raise DataError(
                f"the tokenizer has no {what} token; set --config.data.add_{what.lower()}=False or use a "
                "tokenizer that has one."
            )


def tokenize_texts(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> TokenStream:
    """Tokenize texts in chunks with the tokenizer's batch encoder; `progress(docs, tokens)` after each."""
    check_specials(tokenizer, add_bos, add_eos)
    dtype = stream_dtype(tokenizer)
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
            if progress is not None:
                progress(len(chunk), len(parts[-1]))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        chunk_chars += len(text)
        if len(chunk) >= _CHUNK_DOCS or chunk_chars >= _CHUNK_CHARS:
            flush()
            chunk_chars = 0
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    doc_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return TokenStream(tokens, doc_starts, np.asarray(nbytes, np.int64), add_bos, add_eos)


def tokenize(
    docs: Documents,
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    lo: int = 0,
    hi: int | None = None,
) -> TokenStream:
    """Tokenize documents lo..hi-1 of `docs` (default all), in memory."""
    hi = len(docs) if hi is None else hi
    return tokenize_texts(docs.read(lo, hi), tokenizer, add_bos=add_bos, add_eos=add_eos)
