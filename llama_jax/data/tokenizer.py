"""Tokenizers behind one small interface, so the data pipeline, evaluation and sampling never care which.

Three implementations:

* `ByteTokenizer` ("byte"): UTF-8 bytes are ids 0..255; then BOS=256, EOS=257, PAD=258; vocab_size 259.
  Lossless for any text, needs no file, and makes bits-per-byte trivially exact. Saved as `byte.json`.
* `SentencePieceTokenizer`: a `tokenizer.model` file (LLaMA-1/2's, or one from `train_sentencepiece`).
* `HFTokenizer`: a Hugging Face `tokenizer.json` read with the `tokenizers` library (LLaMA-3 and most HF
  models). BOS/EOS/PAD come from `tokenizer_config.json` / `special_tokens_map.json` beside it when present,
  otherwise from well-known added tokens (`<s>`, `</s>`, `<|begin_of_text|>`, `<|end_of_text|>`, ...).

Conventions shared by all: `encode` never adds BOS/EOS (the data pipeline decides where they go) and treats
text that merely looks like a special token (e.g. a literal "<s>") as ordinary text; `decode` drops special
tokens. `encode_arrays` is the fast path the data pipeline uses (multithreaded for SentencePiece and HF,
vectorised for bytes).

`load_tokenizer(spec)` accepts "byte", a `.model`/`.json` file, or a directory holding one of
`byte.json`, `tokenizer.model`, `tokenizer.json` (a workdir's `tokenizer/`, or an HF model directory).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from etils import epath

from llama_jax.data.config import DataConfig
from llama_jax.data.sources import documents_for_role
from llama_jax.errors import TokenizerError

BYTE_FILE = "byte.json"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# Names HF models use for their begin/end/pad tokens, in order of preference.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Tokenizer(abc.ABC):
    """The interface: text <-> ids, special ids, vocab size, and saving into a workdir's tokenizer dir."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """One more than the largest id `encode` or the specials can produce (the model's minimum vocab)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (BOS/EOS/PAD) are dropped."""

    @abc.abstractmethod
    def save(self, directory) -> str:
        """Write the files `load_tokenizer(directory)` reads back; returns the main file's path."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short hash identifying the exact vocabulary (used as part of data cache keys)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def special_tokens(self) -> dict[str, int]:
        """Strings that stand for one special token each in text a chat template writes ("<|im_end|>",
        "<s>"), by string; `encode_chat` encodes them as those tokens. The byte tokenizer has none."""
        return {}

    def special_token_strings(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token as strings, the variables a chat template reads (as HF passes its
        special_tokens_map); only those the tokenizer has."""
        names = {i: s for s, i in self.special_tokens().items()}
        out = {}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None and i in names:
                out[key] = names[i]
        return out

    def encode_chat(self, text: str) -> list[int]:
        """Ids of text a chat template rendered: each `special_tokens()` string in it is that token (as HF's
        apply_chat_template(tokenize=True) encodes control tokens), the text between is `encode`d."""
        table = self.special_tokens()
        if not table:
            return self.encode(text)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(table, key=len, reverse=True)))
        ids, pos = [], 0
        for m in pattern.finditer(text):
            ids += self.encode(text[pos : m.start()]) if m.start() > pos else []
            ids.append(table[m.group()])
            pos = m.end()
        return ids + (self.encode(text[pos:]) if pos < len(text) else [])

    def piece(self, i: int) -> str:
        """Token i as text for a person to read (llama_jax.data.display); special tokens by name."""
        names = {v: k for k, v in self.special_tokens().items()}
        return names.get(int(i)) or self.decode([int(i)])

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like `encode_batch` but returns int32 arrays; the data pipeline's fast path."""
        return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab_size 259).

    Keeping bytes at their own values means a token id *is* the byte, so `decode` is `bytes(ids)` and a
    model trained on it needs vocab_size >= 259 (e.g. 384 or 512 to keep the embedding shardable).
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(i) for i in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def piece(self, i: int) -> str:
        i = int(i)
        if i >= 256:
            return {256: "<bos>", 257: "<eos>", 258: "<pad>"}.get(i, f"<{i}>")
        return chr(i) if i < 128 else f"<0x{i:02X}>"

    def save(self, directory) -> str:
        path = _mkdir(directory) / BYTE_FILE
        path.write_text(
            json.dumps({"type": "byte", "bos_id": 256, "eos_id": 257, "pad_id": 258, "vocab_size": 259})
        )
        return os.fspath(path)

    def fingerprint(self) -> str:
        return "byte-v1"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model`; ids absent from the model (e.g. LLaMA's pad, -1) are None."""

    def __init__(self, model_proto: bytes, num_threads: int | None = None):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._threads = num_threads or _default_threads()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    @classmethod
    def from_file(cls, path) -> SentencePieceTokenizer:
        return cls(epath.Path(path).read_bytes())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._threads)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def special_tokens(self) -> dict[str, int]:
        # Control pieces (<s>, </s>, <pad>, ...): sentencepiece itself encodes their text as plain text.
        sp = self._sp
        return {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}

    def save(self, directory) -> str:
        path = _mkdir(directory) / SENTENCEPIECE_FILE
        path.write_bytes(self._proto)
        return os.fspath(path)

    def fingerprint(self) -> str:
        return "sp-" + hashlib.sha256(self._proto).hexdigest()[:16]


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, encoded with the (multithreaded, Rust) `tokenizers` library.

    `special_tokens` maps "bos_token"/"eos_token"/"pad_token" to token strings (as in HF's
    tokenizer_config.json); missing ones are looked up among well-known added tokens. When only an
    end-of-text token exists (GPT-2 style), it also serves as BOS.
    """

    def __init__(self, json_str: str, special_tokens: dict | None = None):
        self._json = json_str
        self._tok = tokenizers.Tokenizer.from_str(json_str)
        # Literal "<s>" in the training text must stay text, not become a control token.
        self._tok.encode_special_tokens = True
        self._special = {k: v for k, v in (special_tokens or {}).items() if v}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

        def find(key: str, names: Sequence[str]) -> int | None:
            name = self._special.get(key)
            if name is not None:
                if name not in vocab:
                    raise TokenizerError(f"{key} {name!r} from the tokenizer config is not in tokenizer.json")
                return vocab[name]
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id = find("bos_token", _BOS_NAMES)
        self.eos_id = find("eos_token", _EOS_NAMES)
        self.pad_id = find("pad_token", _PAD_NAMES)
        if self.bos_id is None:
            self.bos_id = self.eos_id

    @classmethod
    def from_file(cls, path) -> HFTokenizer:
        """Read `path`, and special tokens from tokenizer_config.json / special_tokens_map.json beside it."""
        path = epath.Path(path)
        json_str = path.read_text()
        special: dict[str, str] = {}
        # special_tokens_map.json first, so tokenizer_config.json (HF's primary source) wins on conflicts.
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = path.parent / name
            if p.exists():
                cfg = json.loads(p.read_text())
                for key in ("bos_token", "eos_token", "pad_token"):
                    content = _token_content(cfg.get(key))
                    if content:
                        special[key] = content
        return cls(json_str, special)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def special_token_strings(self) -> dict[str, str]:
        ids = (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))
        out = {key: self._tok.id_to_token(i) for key, i in ids if i is not None}
        return {**out, **self._special}  # tokenizer_config.json's strings, as HF reads them

    @functools.cached_property
    def _chat_tok(self) -> tokenizers.Tokenizer:
        # A second instance that splits on added tokens (the first keeps a literal "<s>" as text).
        return tokenizers.Tokenizer.from_str(self._json)

    def encode_chat(self, text: str) -> list[int]:
        return self._chat_tok.encode(text, add_special_tokens=False).ids

    def piece(self, i: int) -> str:
        return self._tok.decode([int(i)], skip_special_tokens=False)

    def save(self, directory) -> str:
        directory = _mkdir(directory)
        (directory / HF_FILE).write_text(self._json)
        cfg = {}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                cfg[key] = self._tok.id_to_token(i)
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        return os.fspath(directory / HF_FILE)

    def fingerprint(self) -> str:
        specials = json.dumps([self.bos_id, self.eos_id, self.pad_id])
        return "hf-" + hashlib.sha256((self._json + specials).encode()).hexdigest()[:16]


def _mkdir(directory) -> epath.Path:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _load_file(path: epath.Path) -> Tokenizer:
    if path.name == BYTE_FILE:
        return ByteTokenizer()
    if path.name.endswith(".json"):
        try:
            return HFTokenizer.from_file(path)
        except TokenizerError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(
                f"{path} is not a Hugging Face tokenizer.json the `tokenizers` library reads: {e}"
            ) from e
    try:
        return SentencePieceTokenizer.from_file(path)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
        raise TokenizerError(
            f"{path} is not a SentencePiece model ({e}). LLaMA-3's original/tokenizer.model is a tiktoken "
            "file, which is not supported: point at the HF repo's tokenizer.json instead."
        ) from e


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a spec: "byte", a tokenizer file (.model = SentencePiece, .json = HF or byte.json), or
    a directory holding one; local, or any path etils.epath reads (gs://...).

    In a directory the first present of byte.json, tokenizer.model, tokenizer.json is used (HF LLaMA-2 repos
    ship both of the last two, which agree; SentencePiece's is the original). If tokenizer.model is not a
    SentencePiece file (LLaMA-3 ships tiktoken ones) tokenizer.json is used instead.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = epath.Path(spec) if spec else None
    if path is None or not path.exists():
        raise TokenizerError(
            f"tokenizer {spec!r} not found: use 'byte', a tokenizer.model / tokenizer.json file, or a "
            "directory holding one (e.g. WORKDIR/tokenizer). Train one with `python -m "
            "experiments.train_tokenizer --output_dir=DIR`."
        )
    if not path.is_dir():
        return _load_file(path)
    present = [path / n for n in (BYTE_FILE, SENTENCEPIECE_FILE, HF_FILE) if (path / n).exists()]
    if not present:
        raise TokenizerError(
            f"directory {path} holds none of {BYTE_FILE}, {SENTENCEPIECE_FILE}, {HF_FILE}; point the "
            "tokenizer at a directory that does, or at 'byte'."
        )
    for i, c in enumerate(present):
        try:
            return _load_file(c)
        except TokenizerError:
            if i == len(present) - 1:
                raise
    raise AssertionError("unreachable")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise unless every id the tokenizer can produce is a valid row of the model's embedding.

    A model vocab larger than the tokenizer's is fine (it is often padded to a multiple of 128 for sharding).
    """
    need = tokenizer.vocab_size
    if need > model_vocab_size:
        padded = -(-need // 128) * 128
        raise TokenizerError(
            f"the tokenizer ({tokenizer!r}) produces ids up to {need - 1}, but the model has only "
            f"{model_vocab_size} embedding rows. Set --config.model.vocab_size={need} (or {padded}, a "
            f"multiple of 128 that shards well), or use a tokenizer with at most {model_vocab_size} ids."
        )


def training_sentences(texts: Iterable[str], max_len: int) -> Iterable[str]:
    """Training "sentences" for SentencePiece: runs of whole lines (newlines kept) up to `max_len` bytes.

    Feeding multi-line chunks rather than single lines matters: at encode time a word right after a newline
    has no leading space, and the trainer has to see that context to learn pieces for it. A single line
    longer than `max_len` bytes is cut into pieces that fit (SentencePiece would otherwise skip it).
    """
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > max_len:
                yield "".join(buf)
                buf, size = [], 0
            if n > max_len:
                step = max_len if line.isascii() else max(1, max_len // 4)  # <= 4 bytes per char
                for i in range(0, len(line), step):
                    yield line[i : i + step]
                continue
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def train_sentencepiece(
    texts: Iterable[str],
    output_dir,
    *,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    max_sentence_length: int = 4096,
    max_sentences: int = 0,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `texts` (documents) and save it as OUTPUT_DIR/tokenizer.model.

    Choices that make the result lossless on arbitrary text (so `decode(encode(t)) == t` and bits-per-byte is
    exact): identity normalisation, whitespace kept as is, no dummy-prefix space, "\\n" as its own piece, and
    (by default) byte fallback for characters outside the vocabulary. Ids: unk 0, bos 1, eos 2, pad 3 (as in
    LLaMA, plus a pad). `max_sentences` > 0 samples that many training sentences (SentencePiece's
    input_sentence_size) to bound memory on big corpora.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', not {model_type!r}")
    sentences = iter(training_sentences(texts, max_sentence_length))
    first = next(sentences, None)
    if first is None:
        raise TokenizerError("no text to train the tokenizer on: the dataset split or file is empty.")

    def all_sentences():
        yield first
        yield from sentences

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=num_threads or _default_threads(),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(
            f"SentencePiece training failed: {e}. If the vocab size is too high for the text, lower "
            "--vocab_size or train on more text; if it is too small, raise it (byte_fallback alone takes 256 "
            "pieces, plus one per distinct character)."
        ) from e
    tok = SentencePieceTokenizer(model.getvalue(), num_threads=num_threads)
    tok.save(output_dir)
    return tok


TRAINED_TOKENIZER = re.compile(r"^train:(bpe|unigram):(\d+)$")


def training_tokenizer(data: DataConfig, tokenizer_dir: str, *, is_main_process: bool) -> Tokenizer:
    """The tokenizer a run trains with. `data.tokenizer = "train:bpe:2048"` (or unigram) trains a
    SentencePiece model on the *training* split the first time and keeps it in `tokenizer_dir` (the
    workdir's), where resuming, evaluation and sampling find it; anything else is a `load_tokenizer` spec."""
    m = TRAINED_TOKENIZER.match(data.tokenizer)
    if not m:
        return load_tokenizer(data.tokenizer)
    if os.path.exists(os.path.join(tokenizer_dir, SENTENCEPIECE_FILE)):
        return load_tokenizer(tokenizer_dir)
    if not is_main_process:
        raise TokenizerError(
            "train the tokenizer once on one host (experiments.train_tokenizer) for a pod run, and pass its "
            "directory as --config.data.tokenizer."
        )
    docs = documents_for_role(data, "train")
    logging.getLogger(__name__).info(
        "training a %s tokenizer with %s pieces on %s", m.group(1), m.group(2), docs.name
    )
    return train_sentencepiece(docs.read(0, len(docs)), tokenizer_dir, vocab_size=int(m.group(2)),
                               model_type=m.group(1))
