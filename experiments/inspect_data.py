"""Print the rows training would see, token by token: whether each is trained on and its segment.

    python -m experiments.inspect_data --config=configs/tiny.py --config.data.format=sft \
        --config.data.train_files=train.jsonl --config.data.eval_files=eval.jsonl \
        --config.data.tokenizer=HF_DIR --config.data.packing=packed [--num_rows=2] [--split=eval]

Rows are shown in file order (row 0 first; training visits them shuffled), one line per segment (a
document, or an SFT record), with each run of trained tokens enclosed in ⟦ ⟧ (llama_jax/data/display.py);
then a summary: records read and kept, truncated and dropped records (SFT), rows, and the trained
fraction of target tokens; the last line is that summary as JSON. Builds the rows with the functions
training uses (llama_jax/data/sft.py or tokens.py, then packing.build_rows and gather).
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.data import (
    Formatter,
    build_rows,
    check_vocab,
    documents_for_role,
    format_row,
    gather,
    summary,
    tokenize,
    tokenize_records,
)
from llama_jax.data.packing import pad_id_of
from llama_jax.data.tokenizer import training_tokenizer
from llama_jax.experiment import Experiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_NUM_ROWS = flags.DEFINE_integer("num_rows", 2, "Rows to print (from the first).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Training data or held-out data.")
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Workdir whose tokenizer/ holds a tokenizer trained for "
    "data.tokenizer=train:...; default: train one in a temporary dir.",
)


def main(argv):
    cli.quiet_logs()
    exp = Experiment.from_config(_CONFIG.value)
    data, seq_len = exp.data, exp.loop.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = training_tokenizer(data, f"{_WORKDIR.value or tmp}/tokenizer", is_main_process=True)
    check_vocab(tokenizer, exp.model.vocab_size)
    docs = documents_for_role(data, _SPLIT.value)
    stats = None
    if data.format == "sft":
        stream, stats = tokenize_records(docs, Formatter.from_config(data, tokenizer), seq_len=seq_len)
    else:
        stream = tokenize(
            docs, tokenizer, add_bos=data.add_bos, add_eos=data.add_eos, cache_dir=data.cache_dir
        )
    rows = build_rows(stream, seq_len, data.packing)
    shown = np.arange(min(_NUM_ROWS.value, rows.num_rows))
    batch = gather(stream.tokens, rows, shown, pad_id_of(tokenizer), stream.trained)
    print(
        f"{docs.name}, seq_len {seq_len}, packing {data.packing!r}, format {data.format!r}"
        + (f", loss_on {data.loss_on!r}" if data.format == "sft" else "")
        + ":"
    )
    for r in range(len(shown)):
        print(format_row(batch, r, tokenizer))
    out = {"data": docs.name, **summary(stream, rows, len(docs))}
    cut = ""
    if stats is not None:
        out.update(truncated=stats.truncated, dropped=stats.dropped, merged=stats.merged)
        cut = f" ({stats.truncated} truncated to {seq_len + 1} tokens, {stats.dropped} dropped)"
    print(
        f"{out['records']} records{cut}, {out['rows']} rows ({out['positions_used']:.1%} of positions used), "
        f"{out['trained']} of {out['targets']} target tokens trained ({out['trained_fraction']:.1%})"
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    cli.run(main)
