"""Pretrain Llama-3-8B on a v5p-128 slice from sharded parquet on a bucket mixed with a second source: the
model, mesh and schedule of configs/llama3_8b_c4_tpu.py (checked to fit by the TPU compiler there), the data
of a pretraining run. Paths are placeholders: point them at your bucket.

    # once, on any machines (one worker per core or VM; optional: training builds what is missing)
    python -m experiments.build_cache --config=configs/llama3_8b_fineweb_mix.py --worker=$W --num_workers=$N
    # on every host of the slice
    python -m experiments.train --config=configs/llama3_8b_fineweb_mix.py --workdir=gs://BUCKET/runs/8b_mix

FineWeb-Edu ships as parquet shards with a "text" column (e.g. sample/100BT/*.parquet); the code source
is .jsonl.zst shards. The token cache goes to the bucket, so every host (and every later run) reads the
same tokens by range. Weights change at step 200k (an annealing stage with more code).
"""

import pathlib

from llama_jax.experiment import config_from_file

BUCKET = "gs://YOUR_BUCKET"


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("llama3_8b_c4_tpu.py"))
    c.data.sources = {
        "fineweb_edu": {
            "train_files": f"{BUCKET}/fineweb-edu/sample/100BT/*.parquet",
            "eval_files": f"{BUCKET}/fineweb-edu/heldout/*.parquet",
            "weight": 0.85,
        },
        "code": {
            "train_files": f"{BUCKET}/code/train-*.jsonl.zst",
            "eval_files": f"{BUCKET}/code/heldout.jsonl.zst",
            "weight": 0.15,
        },
    }
    c.data.stages = "200000:fineweb_edu=0.7,code=0.3"
    c.data.cache_dir = f"{BUCKET}/token_cache/llama3"
    return c
