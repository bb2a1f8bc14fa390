"""Perplexity and bits-per-byte of a workdir's model on held-out text.

    # the workdir's own held-out split (its config.data: eval_split, or eval_files)
    python -m experiments.eval_ppl --workdir=DIR
    # another split / dataset, or a local text file (one document)
    python -m experiments.eval_ppl --workdir=DIR --split=test
    python -m experiments.eval_ppl --workdir=DIR --config.data.tfds_name=wikitext/wikitext-103-raw-v1 \
        --config.data.eval_split=test
    python -m experiments.eval_ppl --workdir=DIR --text_file=book.txt --seq_len=2048 --stride=512

Prints a final JSON line {"loss" (nats/token), "perplexity", "bits_per_byte", "tokens", "bytes", ...}.
Every target token is scored exactly once; --stride=S scores each token with at least seq_len - S + 1
tokens of context (sliding windows, llama_jax/evaluation.py docstring). DIR may come from training or from
`experiments.convert_hf` (tokenizer: DIR/tokenizer). Params are data-parallel over all devices by default;
--mesh_fsdp / --mesh_tensor shard them by the workdir's sharding rules. The logic is
llama_jax.evaluation.evaluate_workdir; this file only parses flags.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from llama_jax import checkpoint, data, evaluation, sharding, workdir
from llama_jax.config import ConfigError
from llama_jax.defaults import base_config
from llama_jax.tokenizer import TokenizerError

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to evaluate (from training or convert_hf).", required=True)
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Evaluate on this UTF-8 text file (one document).")
_SPLIT = flags.DEFINE_string("split", None, "TFDS split to evaluate (overrides config.data.eval_split).")
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    ConfigDict({"data": base_config().data.to_dict()}),
    "Data overrides, --config.data.FIELD=VALUE (fields of llama_jax/defaults.py's data section); "
    "fields not given come from the workdir's config.json.",
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
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "Mesh data axis size (-1: all remaining devices).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Mesh fsdp axis size (params sharded over it).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Mesh tensor axis size (tensor parallelism).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    logging.getLogger().setLevel(logging.WARNING)
    try:
        sharding.maybe_initialize_distributed()
        result = evaluation.evaluate_workdir(
            _WORKDIR.value,
            text_file=_TEXT_FILE.value,
            split=_SPLIT.value,
            data_overrides=flags.FLAGS["config"].override_values,
            seq_len=_SEQ_LEN.value,
            stride=_STRIDE.value,
            batch_size=_BATCH_SIZE.value,
            step=_STEP.value,
            mesh=workdir.inference_mesh(_MESH_DATA.value, _MESH_FSDP.value, _MESH_TENSOR.value),
        )
    except (checkpoint.CheckpointError, TokenizerError, data.DataError, ConfigError) as e:
        # The message already names the fix; a traceback would only bury it.
        raise SystemExit(f"eval_ppl: {e}") from e
    if sharding.is_main_process():
        print(
            f"{result['data']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, bits/byte "
            f"{result['bits_per_byte']:.4f} ({result['tokens']} tokens, {result['bytes']} bytes)",
            file=sys.stderr,
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
