"""Continue a prompt with a workdir's model.

    python -m experiments.sample --workdir=DIR --prompt="ROMEO:" --max_new_tokens=200
    python -m experiments.sample --workdir=DIR --prompt="ROMEO:" --temperature=0          # greedy
    python -m experiments.sample --workdir=DIR --prompt="..." --temperature=0.8 --top_k=50 --top_p=0.95 --seed=1
    python -m experiments.sample --workdir=DIR --prompt="..." --mesh_tensor=8             # shard a big model

Prints the prompt followed by the continuation (stdout; logs go to stderr). The prompt is encoded with
the tokenizer's BOS first (when it has one); generation stops at EOS (also at any `eos_token_id` of an
imported HF model's config) or after --max_new_tokens. DIR may come from training or from
`experiments.convert_hf`. Params are restored on one device by default; --mesh_data / --mesh_fsdp /
--mesh_tensor spread them over that many devices by the workdir's sharding rules. The KV cache is sized
by prompt + max_new_tokens, never by the model's max_seq_len.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from experiments import cli
from llama_jax.inference import load_workdir, sample_text

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir (from training or convert_hf).", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (may be empty: then only BOS is the prompt).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the K most likely tokens; 0 disables.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, 0 < top_p <= 1; 1 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    logging.getLogger().setLevel(logging.WARNING)
    mesh = cli.mesh(default_data=1)  # one device unless asked: decoding one prompt gains nothing from more
    model_config, params, tokenizer, experiment = load_workdir(_WORKDIR.value, mesh, step=_STEP.value)
    text, _ = sample_text(
        params, model_config, tokenizer, experiment, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
    )
    sys.stdout.write(_PROMPT.value + text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
