"""Train a SentencePiece tokenizer and save OUTPUT_DIR/tokenizer.model.

    python -m experiments.train_tokenizer --output_dir=/tmp/tok --vocab_size=2048 \
        --config.data.manual_dir=/tmp/manual          # tiny_shakespeare's train split, offline

It trains on the experiment config's *training* data (config.data: the TFDS `train_split`, or
`train_files`), so the held-out split never shapes the vocabulary; or on --text_file instead. Then train
with `--config.data.tokenizer=OUTPUT_DIR --config.model.vocab_size=VOCAB_SIZE`.
"""

import json

from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax import data
from llama_jax.data import DataConfig, train_sentencepiece

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Experiment config (its data).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where tokenizer.model is written.", required=True)
_TEXT_FILE = flags.DEFINE_string(
    "text_file", "", "Train on these local files instead (comma-separated globs; .jsonl uses data.text_key)."
)
_SPLIT = flags.DEFINE_string("split", "", "TFDS split to train on instead of config.data.train_split.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, specials and byte pieces included.")
_BYTE_FALLBACK = flags.DEFINE_bool("byte_fallback", True, "Unknown characters become UTF-8 byte pieces.")
_CHARACTER_COVERAGE = flags.DEFINE_float("character_coverage", 1.0, "Share of characters given own pieces.")
_MAX_SENTENCE_LENGTH = flags.DEFINE_integer(
    "max_sentence_length", 4096, "Bytes per training sentence (runs of whole lines; longer lines are cut)."
)
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 0, "Sample this many sentences (0 = all); for big data."
)
_MAX_DOCS = flags.DEFINE_integer("max_docs", 0, "Read only the first N documents (0 = all); for big data.")


def main(argv):
    d = DataConfig.from_dict(_CONFIG.value.data)
    if _TEXT_FILE.value:
        docs = data.file_documents(_TEXT_FILE.value, text_key=d.text_key, what="--text_file")
    elif _SPLIT.value or not d.train_files:
        docs = data.tfds_documents(
            d.tfds_name,
            _SPLIT.value or d.train_split,
            text_key=d.text_key,
            data_dir=d.data_dir,
            manual_dir=d.manual_dir,
        )
    else:
        docs = data.file_documents(d.train_files, text_key=d.text_key, what="data.train_files")
    n = min(len(docs), _MAX_DOCS.value) if _MAX_DOCS.value else len(docs)
    print(
        f"training a {_MODEL_TYPE.value} tokenizer ({_VOCAB_SIZE.value} pieces) on {n} documents of "
        f"{docs.name}"
    )
    tok = train_sentencepiece(
        docs.read(0, n),
        _OUTPUT_DIR.value,
        vocab_size=_VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value,
        byte_fallback=_BYTE_FALLBACK.value,
        character_coverage=_CHARACTER_COVERAGE.value,
        max_sentence_length=_MAX_SENTENCE_LENGTH.value,
        max_sentences=_MAX_SENTENCES.value,
    )
    sample = next(iter(docs.read(0, 1)))[:100_000]
    ratio = len(sample.encode("utf-8")) / max(1, len(tok.encode(sample)))
    use = f"--config.data.tokenizer={_OUTPUT_DIR.value} --config.model.vocab_size={tok.vocab_size}"
    print(
        json.dumps(
            {
                "output_dir": _OUTPUT_DIR.value,
                "vocab_size": tok.vocab_size,
                "bytes_per_token": round(ratio, 3),
                "use_with": use,
            }
        )
    )


if __name__ == "__main__":
    cli.run(main)
