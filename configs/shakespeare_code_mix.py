"""A data-mixture ablation on a CPU: the main job's model on tiny-shakespeare (TFDS) mixed with this
repository's own source code as local compressed shards, 80/20, each with its held-out set.

    python -m experiments.make_shards --inputs='llama_jax/**/*.py,experiments/*.py,README.md' \
        --output_dir=/tmp/code_shards --docs_per_shard=20
    python -m experiments.train --config=configs/shakespeare_code_mix.py --workdir=/tmp/mix \
        --config.data.manual_dir=/tmp/tfds_manual --config.data.cache_dir=/tmp/tokcache

Every evaluation logs eval/shakespeare/* and eval/code/* and their total; every log line data/<source>/epochs
and tokens. The code source is small, so it repeats (its own epochs) while shakespeare streams.
"""

import pathlib

from llama_jax.experiment import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("shakespeare.py"))
    c.data.sources = {
        "shakespeare": {"weight": 0.8},  # the section's own source: TFDS tiny_shakespeare, train / validation
        "code": {
            "train_files": "/tmp/code_shards/train-*.jsonl.zst",
            "eval_files": "/tmp/code_shards/heldout.jsonl.zst",
            "weight": 0.2,
        },
    }
    return c
