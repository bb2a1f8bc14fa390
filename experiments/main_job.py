"""The README main job: train a config, evaluate held-out perplexity, print a sample, time each phase.

    python -m experiments.main_job --config=configs/shakespeare.py --workdir=/tmp/shakespeare \
        --config.data.manual_dir=/tmp/tfds_manual

Each phase is the library call its own script makes (experiments.train, experiments.eval_ppl,
experiments.sample), so this is the same work a user does by hand. The last line is JSON.
"""

import math
import time

from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.experiment import Experiment
from llama_jax.inference import evaluate_workdir, load_workdir, sample_text
from llama_jax.train import summarize, train
from llama_jax.train.metrics import json_line

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run lives (resumed if it exists).", required=True)
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Prompt of the printed sample.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Length of the printed sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature of the printed sample.")


def main(argv):
    cli.quiet_logs()
    exp, path = Experiment.from_config(_CONFIG.value), _WORKDIR.value
    times = {}

    t = time.perf_counter()
    metrics = train(exp, path)
    times["train_s"] = time.perf_counter() - t
    print(summarize(metrics), flush=True)

    t = time.perf_counter()
    result = evaluate_workdir(path)
    times["eval_s"] = time.perf_counter() - t
    print(f"held-out {result['data']}: {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_byte']:.4f} bits/byte = {result['bits_per_byte'] * math.log(2):.4f} nats/byte",
          flush=True)

    t = time.perf_counter()
    model_config, params, tokenizer, experiment = load_workdir(path)
    text, _ = sample_text(
        params, model_config, tokenizer, experiment, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, seed=0,
    )
    times["sample_s"] = time.perf_counter() - t
    print(f"\n--- sample ---\n{_PROMPT.value}{text}\n--------------", flush=True)

    print(json_line({
        "eval_loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_byte": result["bits_per_byte"],
        "nats_per_byte": result["bits_per_byte"] * math.log(2),
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        "train_steps": metrics.get("step"),
        **{k: round(v, 1) for k, v in times.items()},
    }))


if __name__ == "__main__":
    cli.run(main)
