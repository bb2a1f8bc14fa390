"""Tokenize every source of a config into its token cache (data.cache_dir), before training.

    python -m experiments.build_cache --config=configs/mixture_example.py \
        --config.data.cache_dir=/tmp/tokcache [--worker=0 --num_workers=1] [--workdir=DIR]

Every worker builds shards i with i % num_workers == worker that are not built yet, for the training and
held-out text of every source (llama_jax/data/cache.py), so workers need no coordination: run one per core
(`for w in 0 1 ...; do python -m experiments.build_cache ... --worker=$w --num_workers=N & done`), one per
VM of a pod, or one array task each on a cluster. A killed worker rerun builds only the shards it had not
finished. Training builds whatever is still missing (each of its processes its share) and waits for the
rest, so this step is optional; it moves tokenization off the accelerators. The last line is JSON.

A tokenizer trained by the run (data.tokenizer=train:...) lives in the run's workdir: give --workdir, or
train it first with experiments.train_tokenizer and pass its directory as data.tokenizer.
"""

from __future__ import annotations

import json
import time

from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.data import Cache, check_no_leak, source_for_role
from llama_jax.data.cache import cache_root
from llama_jax.data.tokenizer import TRAINED_TOKENIZER, load_tokenizer
from llama_jax.errors import ConfigError
from llama_jax.experiment import Experiment

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Experiment config file.")
_WORKER = flags.DEFINE_integer("worker", 0, "This worker's index, 0 <= worker < num_workers.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "How many workers share the shards.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A run's workdir, for a tokenizer trained by that run.")


def main(argv):
    cli.quiet_logs()
    data = Experiment.from_config(_CONFIG.value).data
    if not data.cache_dir:
        raise ConfigError("set --config.data.cache_dir (a local directory or gs://BUCKET/PATH) to build a cache.")
    if not 0 <= _WORKER.value < _NUM_WORKERS.value:
        raise ConfigError(f"--worker={_WORKER.value} must be in [0, --num_workers={_NUM_WORKERS.value}).")
    if TRAINED_TOKENIZER.match(data.tokenizer):
        if not _WORKDIR.value:
            raise ConfigError(f"data.tokenizer={data.tokenizer!r} is trained by the run: give --workdir=DIR of that "
                              "run (after it trained the tokenizer), or train one with experiments.train_tokenizer "
                              "and pass its directory as --config.data.tokenizer.")
        tokenizer = load_tokenizer(f"{_WORKDIR.value}/tokenizer")
    else:
        tokenizer = load_tokenizer(data.tokenizer)
    check_no_leak(data)
    t0, built = time.perf_counter(), {}
    # Each source's training text, then every held-out set (the sources' and data.eval_sets').
    jobs = [(cfg, "train") for cfg in data.source_configs()] + [(cfg, "eval") for cfg in data.held_out_configs()]
    for cfg, role in jobs:
        source = source_for_role(cfg, data, role)
        cache = Cache(cache_root(data.cache_dir, cfg.name, role), source, tokenizer, add_bos=data.add_bos,
                      add_eos=data.add_eos)
        mine = cache.build(_WORKER.value, _NUM_WORKERS.value)
        done = cache.done()
        built[f"{cfg.name}/{role}"] = {
            "built": len(mine), "shards": len(done), "complete": sum(d is not None for d in done),
            "tokens": sum(d["tokens"] for d in done if d is not None), "root": cache.root,
        }
        print(f"{cfg.name}/{role}: built {len(mine)} shard(s) now; {built[f'{cfg.name}/{role}']['complete']} of "
              f"{len(done)} complete in {cache.root}", flush=True)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "worker": _WORKER.value,
                      "num_workers": _NUM_WORKERS.value, "caches": built}), flush=True)


if __name__ == "__main__":
    cli.run(main)
