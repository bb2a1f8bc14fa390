"""`config.data`: where the text comes from, how it is tokenized and packed (see llama_jax/data/__init__)."""

from __future__ import annotations

import dataclasses

from llama_jax.sections import Section

PACKING_MODES = ("concat", "packed")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    SECTION = "data"

    tfds_name: str = "tiny_shakespeare"
    train_split: str = "train"  # TFDS split syntax, slices allowed: "train[:95%]"
    eval_split: str = "validation"  # held out; must not overlap train_split
    text_key: str = "text"  # TFDS feature / jsonl field holding the text
    data_dir: str = ""  # TFDS data dir ("" = TFDS default; gs:// works)
    manual_dir: str = ""  # offline builds: dir with the downloaded files (tiny_shakespeare: input.txt)
    train_files: str = ""  # comma-separated local globs (.jsonl: a doc per line; else a doc per file)
    eval_files: str = ""  # held-out local files; required with train_files
    # "byte", a tokenizer.model/tokenizer.json, a dir holding one, or "train:bpe:N" / "train:unigram:N"
    # (a SentencePiece model of N pieces trained on the training split, kept in WORKDIR/tokenizer).
    tokenizer: str = "byte"
    packing: str = "concat"  # "concat" (attend across docs) or "packed" (segment_ids per doc)
    add_bos: bool = True
    add_eos: bool = True
    eval_batch_size: int = 0  # 0 = the training batch_size
    window_docs: int = 0  # >0: tokenize the train split lazily, this many documents at a time (C4-size data)
    cache_dir: str = ""  # keep tokenized splits here as .npy (memory-mapped on reuse); "" = in memory
    prefetch: int = 2  # batches computed ahead in a background thread

    def __post_init__(self):
        self._check(self.packing in PACKING_MODES, f"data.packing={self.packing!r} is not one of {PACKING_MODES}.")
        for name in ("eval_batch_size", "window_docs", "prefetch"):
            v = getattr(self, name)
            self._check(v >= 0, f"data.{name}={v} must be >= 0.")
        self._check(bool(self.text_key), "data.text_key must name the feature or field holding the text.")
        self._check(bool(self.tokenizer), "data.tokenizer must be 'byte', a tokenizer file or dir, or train:bpe:N.")
