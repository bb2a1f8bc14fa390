"""Perplexity and bits-per-byte of a workdir's model on held-out text.

    # the workdir's own held-out split (its config.data: eval_split, or eval_files)
    python -m experiments.eval_ppl --workdir=DIR
    # another split / dataset, or a local text file (one document)
    python -m experiments.eval_ppl --workdir=DIR --split=test
    # Wikipedia articles (TFDS has no wikitext; wiki40b is a Beam dataset: build it once as array_record,
    # `tfds build wiki40b/en --file_format=array_record --data_dir=TFDS_DIR`, with apache-beam installed)
    python -m experiments.eval_ppl --workdir=DIR --config.data.tfds_name=wiki40b/en \
        --config.data.eval_split=test --config.data.text_key=text --config.data.data_dir=TFDS_DIR
    python -m experiments.eval_ppl --workdir=DIR --text_file=book.txt --seq_len=2048 --stride=512
    # an SFT fine-tune: loss on held-out responses (response_loss, ...) and greedy exact match on 200 records
    python -m experiments.eval_ppl --workdir=DIR --config.data.exact_match_records=200

    # several held-out sets: the workdir's (each source's and data.eval_sets'), some of them, ad-hoc files
    python -m experiments.eval_ppl --workdir=DIR --sets=tiny_shakespeare,test --set_files='notes=notes/*.txt'

Every held-out set is scored: each source's (data.sources) and each of data.eval_sets, or those --sets
names, plus --set_files ones. A table on stderr has a row per set (documents, tokens, bytes, nats/token,
perplexity, bits/byte), then with several sets their mean (each set counts once, Paloma-style) and their
total (nats/token over all sets' tokens, bits/byte over all their bytes); the JSON line then holds the
total, mean/loss and mean/bits_per_byte, and "sets": {name: {...}}.

Prints a final JSON line {"loss" (nats/token), "perplexity", "bits_per_byte", "tokens", "bytes", ...}
(strict JSON: a non-finite value is null and listed under "nonfinite", and the exit status is then 1);
a progress bar over the eval batches goes to stderr (in a log file, a line a minute).
Every target token is scored exactly once; --stride=S scores each token with at least seq_len - S + 1
tokens of context (sliding windows, llama_jax/data/eval_data.py). DIR may come from training or from
`experiments.convert_hf` (tokenizer: DIR/tokenizer). Params are data-parallel over all devices by default;
--mesh_fsdp / --mesh_tensor shard them by the workdir's sharding rules. The logic is
llama_jax.inference.evaluate_workdir; this file only parses flags.
"""

from __future__ import annotations

import logging
import math
import sys

from absl import flags
from ml_collections import ConfigDict, config_flags

from experiments import cli
from llama_jax import distributed
from llama_jax.data import DataConfig
from llama_jax.errors import DataError, NonFiniteResult
from llama_jax.inference import evaluate_workdir
from llama_jax.train.metrics import json_line

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to evaluate (from training or convert_hf).", required=True)
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Evaluate on this UTF-8 text file (one document).")
_SPLIT = flags.DEFINE_string("split", None, "TFDS split to evaluate (overrides config.data.eval_split).")
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    ConfigDict({"data": DataConfig().to_dict()}),
    "Data overrides, --config.data.FIELD=VALUE (fields of llama_jax/data/config.py's DataConfig); "
    "fields not given come from the workdir's config.json.",
)
_SETS = flags.DEFINE_list(
    "sets", None, "Score only these of the workdir's held-out sets (its sources' and data.eval_sets names); "
    "--set_files sets are scored too. Default: all of them."
)
_SET_FILES = flags.DEFINE_multi_string(
    "set_files", [], "NAME=GLOBS: another held-out set, from local or gs:// files (comma-separated globs, the "
    "formats of data.eval_files); repeat for more."
)
_SEQ_LEN = flags.DEFINE_integer(
    "seq_len", 0, "Window length in tokens (default: the workdir's seq_len, else min(max_seq_len, 2048))."
)
_STRIDE = flags.DEFINE_integer(
    "stride", 0, "Sliding windows: each window after the first scores only its last STRIDE targets "
    "(0 < STRIDE <= seq_len). 0: non-overlapping windows."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Windows per batch, a multiple of mesh data*fsdp (default: the workdir's eval batch "
    "size, else one per batch shard)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    logging.getLogger().setLevel(logging.WARNING)
    distributed.maybe_initialize_distributed()
    result = evaluate_workdir(
        _WORKDIR.value,
        text_file=_TEXT_FILE.value,
        split=_SPLIT.value,
        data_overrides=flags.FLAGS["config"].override_values,
        sets=_SETS.value,
        set_files=_set_files(_SET_FILES.value),
        seq_len=_SEQ_LEN.value,
        stride=_STRIDE.value,
        batch_size=_BATCH_SIZE.value,
        step=_STEP.value,
        mesh=cli.mesh(default_data=-1),  # data parallel over every device unless asked
    )
    if distributed.is_main_process():
        print_table(result)
        scored = " (responses only)" if "response_loss" in result else ""
        exact = (f", exact match {result['exact_match']:.3f} of {result['exact_match_records']:.0f} records"
                 if "exact_match" in result else "")
        print(
            f"{result['data']}: loss{scored} {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, bits/byte "
            f"{result['bits_per_byte']:.4f} ({result['tokens']} tokens, {result['bytes']} bytes){exact}",
            file=sys.stderr,
        )
        print(json_line(result), flush=True)
    if not math.isfinite(result["loss"]):
        raise NonFiniteResult(
            f"the loss of {_WORKDIR.value} on {result['data']} is {result['loss']}: its params are damaged or "
            "diverged. Evaluate an earlier checkpoint with --step=N (see its checkpoints/ directory)."
        )


def _set_files(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, globs = spec.partition("=")
        if not sep or not name.strip() or not globs.strip():
            raise DataError(f"--set_files={spec!r} is not NAME=GLOBS; write e.g. --set_files='wiki=/data/wiki/*.jsonl'.")
        out[name.strip()] = globs.strip()
    return out


def print_table(result: dict) -> None:
    """A row per held-out set, then with several their mean (loss and bits/byte) and total, on stderr."""
    def row(name, r):
        return (f"{name:20s} {r['documents']:9d} {r['tokens']:10.0f} {r['bytes']:11.0f} {r['loss']:10.4f} "
                f"{r['perplexity']:10.3f} {r['bits_per_byte']:9.4f}")

    lines = [f"{'set':20s} {'documents':>9s} {'tokens':>10s} {'bytes':>11s} {'nats/token':>10s} "
             f"{'perplexity':>10s} {'bits/byte':>9s}"]
    if "sets" in result:
        lines += [row(name, r) for name, r in result["sets"].items()]
        lines.append(f"{'mean':20s} {'':9s} {'':10s} {'':11s} {result['mean/loss']:10.4f} {'':10s} "
                     f"{result['mean/bits_per_byte']:9.4f}")
    lines.append(row("total" if "sets" in result else "all", result))
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
