"""Documents -> one token stream per split (or window): `[BOS] ids [EOS]` per document, optionally cached
on disk as memory-mapped .npy files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

import numpy as np

from llama_jax.data.sources import Documents
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError

_CACHE_VERSION = "v1"
_CHUNK_DOCS = 1024  # documents tokenized per encode_arrays call
_CHUNK_CHARS = 8 << 20  # ... or fewer when they are long, to bound memory


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split as one token array: document d is tokens[doc_starts[d]:doc_starts[d+1]] = [BOS] ids [EOS]
    (an SFT record's tokens as its template renders them, with `trained`)."""

    tokens: np.ndarray  # (N,) uint16 or int32; an np.memmap when read from the cache
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
        return _read_cache(cached, add_bos, add_eos)

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
        _write_cache(cached, stream)
    return stream


def _read_cache(cached: str, add_bos: bool, add_eos: bool) -> TokenStream:
    return TokenStream(
        np.load(os.path.join(cached, "tokens.npy"), mmap_mode="r"),
        np.load(os.path.join(cached, "doc_starts.npy")),
        np.load(os.path.join(cached, "doc_bytes.npy")),
        add_bos,
        add_eos,
    )


def _write_cache(cached: str, stream: TokenStream) -> None:
    cache_dir, key = os.path.split(cached)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=key + ".tmp")
    np.save(os.path.join(tmp, "tokens.npy"), stream.tokens)
    np.save(os.path.join(tmp, "doc_starts.npy"), stream.doc_starts)
    np.save(os.path.join(tmp, "doc_bytes.npy"), stream.doc_bytes)
    try:
        os.rename(tmp, cached)  # atomic: concurrent writers (other hosts) produce identical files
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
