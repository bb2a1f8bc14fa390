"""Print the rows training would see, token by token: whether each is trained on, its segment, its source.

    python -m experiments.inspect_data --config=configs/tiny.py --config.data.format=sft \
        --config.data.train_files=train.jsonl --config.data.eval_files=eval.jsonl \
        --config.data.tokenizer=HF_DIR --config.data.packing=packed [--num_rows=2] [--split=eval]
    python -m experiments.inspect_data --config=configs/mixture_example.py --as_trained --num_rows=8

Rows are shown in file order, per source (row 0 first; training visits them shuffled), one line per
segment (a document, or an SFT record), with each run of trained tokens enclosed in ⟦ ⟧
(llama_jax/data/display.py); then a summary: records read and kept, truncated and dropped records (SFT),
rows, and the trained fraction of target tokens; the last line is that summary as JSON. With --as_trained,
the first rows of step 0, 1, ... in training order (the mixture's), each labelled with its source, shard
and row. Builds the rows with the functions training uses (sft.py or tokens.py, packing.build_rows, gather;
TrainData for --as_trained).
"""

from __future__ import annotations

import json
import logging
import tempfile

import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.data import (
    Formatter,
    TrainData,
    build_rows,
    check_vocab,
    format_row,
    gather,
    source_documents,
    summary,
    tokenize,
    tokenize_records,
)
from llama_jax.data.packing import pad_id_of
from llama_jax.data.tokenizer import training_tokenizer
from llama_jax.errors import TokenizerError
from llama_jax.experiment import Experiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_NUM_ROWS = flags.DEFINE_integer("num_rows", 2, "Rows to print (from the first), per source.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Training data or held-out data.")
_AS_TRAINED = flags.DEFINE_bool("as_trained", False, "Show the first rows in training order (the mixture's), "
                                "each with its source, shard and row.")
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Workdir whose tokenizer/ holds a tokenizer trained for "
    "data.tokenizer=train:...; default: train one in a temporary dir.",
)


def as_trained(exp, tokenizer) -> None:
    loop = exp.loop
    td = TrainData.from_config(exp.data, tokenizer, seq_len=loop.seq_len, batch_size=loop.batch_size,
                               seed=loop.seed, worker=0, num_workers=1)
    shown, step = 0, 0
    counts = {name: 0 for name in td.names}
    while shown < _NUM_ROWS.value:
        batch, where = td.batch_for_step(step, 0, 1), td.rows_for_step(step, 0, 1)
        for r in range(min(len(where), _NUM_ROWS.value - shown)):
            s, shard, row = (int(x) for x in where[r])
            name = td.names[s]
            counts[name] += 1
            print(f"step {step} row {r}: source {name!r}, shard {td.sources[name].shards[shard].name}, row {row}")
            print(format_row(batch, r, tokenizer))
            shown += 1
        step += 1
    out = {"rows": shown, "by_source": counts, **{k: v for k, v in td.seen(step).items()}}
    print(json.dumps(out), flush=True)


def main(argv):
    cli.quiet_logs()
    exp = Experiment.from_config(_CONFIG.value)
    data, seq_len = exp.data, exp.loop.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = training_tokenizer(data, f"{_WORKDIR.value or tmp}/tokenizer", is_main_process=True)
    try:
        check_vocab(tokenizer, exp.model.vocab_size)
    except TokenizerError as e:
        # The rows need no model, so a config file's model (often a small preset, next to a real tokenizer)
        # does not stop them being shown; what training with this config would refuse is still said.
        logging.warning("training with this config would stop here: %s", e)
    if _AS_TRAINED.value:
        return as_trained(exp, tokenizer)
    out = {}
    for name, docs in source_documents(data, _SPLIT.value).items():
        stats = None
        if data.format == "sft":
            stream, stats = tokenize_records(docs, Formatter.from_config(data, tokenizer), seq_len=seq_len)
        else:
            stream = tokenize(docs, tokenizer, add_bos=data.add_bos, add_eos=data.add_eos)
        rows = build_rows(stream, seq_len, data.packing)
        shown = np.arange(min(_NUM_ROWS.value, rows.num_rows))
        batch = gather(stream.tokens, rows, shown, pad_id_of(tokenizer), stream.trained)
        print(
            f"source {name!r}: {docs.name}, seq_len {seq_len}, packing {data.packing!r}, format {data.format!r}"
            + (f", loss_on {data.loss_on!r}" if data.format == "sft" else "")
            + ":"
        )
        for r in range(len(shown)):
            print(format_row(batch, r, tokenizer))
        out[name] = {"data": docs.name, **summary(stream, rows, len(docs))}
        cut = ""
        if stats is not None:
            out[name].update(truncated=stats.truncated, dropped=stats.dropped, merged=stats.merged)
            cut = f" ({stats.truncated} truncated to {seq_len + 1} tokens, {stats.dropped} dropped)"
        s = out[name]
        print(
            f"{s['records']} records{cut}, {s['rows']} rows ({s['positions_used']:.1%} of positions used), "
            f"{s['trained']} of {s['targets']} target tokens trained ({s['trained_fraction']:.1%})"
        )
    print(json.dumps(next(iter(out.values())) if len(out) == 1 else out), flush=True)


if __name__ == "__main__":
    cli.run(main)
