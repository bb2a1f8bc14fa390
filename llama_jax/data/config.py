"""`config.data`: where the text comes from, how it is tokenized and packed (see llama_jax/data/__init__)."""

from __future__ import annotations

import dataclasses

from llama_jax.sections import Section

PACKING_MODES = ("concat", "packed")
FORMATS = ("text", "sft")
LOSS_ON = ("responses", "all")


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
    # Supervised fine-tuning (llama_jax/data/sft.py): "sft" reads train_files / eval_files as .jsonl records,
    # {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}; "packed" only.
    format: str = "text"
    loss_on: str = "responses"  # sft: "responses" (completions, assistant turns) or "all" (every token)
    # sft chat records: "" = the tokenizer dir's template (chat_template.jinja / tokenizer_config.json), a
    # shipped name ("chatml", "llama3"; llama_jax/data/chat.py) or a .jinja file.
    chat_template: str = ""
    # sft: at each evaluation also generate (greedy) for the first N held-out records and log the fraction
    # whose completion (or last assistant turn) equals the record's after stripping whitespace as
    # eval/exact_match (llama_jax/inference/exact_match.py); 0 = off.
    exact_match_records: int = 0

    def __post_init__(self):
        self._check(self.packing in PACKING_MODES, f"data.packing={self.packing!r} is not one of {PACKING_MODES}.")
        for name in ("eval_batch_size", "window_docs", "prefetch", "exact_match_records"):
            v = getattr(self, name)
            self._check(v >= 0, f"data.{name}={v} must be >= 0.")
        self._check(bool(self.text_key), "data.text_key must name the feature or field holding the text.")
        self._check(bool(self.tokenizer), "data.tokenizer must be 'byte', a tokenizer file or dir, or train:bpe:N.")
        self._check(self.format in FORMATS, f"data.format={self.format!r} is not one of {FORMATS}.")
        self._check(self.loss_on in LOSS_ON, f"data.loss_on={self.loss_on!r} is not one of {LOSS_ON}.")
        self._check(self.format == "sft" or not self.exact_match_records, "data.exact_match_records needs "
                    "records with reference answers: data.format='sft' (prompt/completion or chat records).")
        if self.format == "sft":
            # A row must never let one conversation attend into the next, and each record is its own segment.
            self._check(self.packing == "packed", "data.format='sft' needs data.packing='packed' (one "
                        "segment per record, so conversations never attend into each other).")
            self._check(bool(self.train_files), "data.format='sft' reads local .jsonl files: set "
                        "data.train_files and data.eval_files.")
            self._check(not self.tokenizer.startswith("train:"), "data.format='sft' fine-tunes with an "
                        "existing tokenizer (the model's dir or file), not a newly trained one "
                        "(data.tokenizer='train:...').")
            self._check(not self.cache_dir, "data.cache_dir caches text token streams; SFT records are "
                        "tokenized each run (with their loss masks): set data.cache_dir=''.")
