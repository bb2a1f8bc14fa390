"""The main job on tiny-shakespeare, judged on three held-out sets instead of one (Paloma-style): its own
validation split, its test split (TFDS, disjoint from train and validation), and this repository's model
code (`llama_jax/model/*.py`, a file a document; relative to the repo root, where the commands run) as an
out-of-domain set.

    python -m experiments.train --config=configs/shakespeare_eval_sets.py --workdir=/tmp/evalsets \
        --config.data.manual_dir=/tmp/tfds_manual
    python -m experiments.eval_ppl --workdir=/tmp/evalsets

Every evaluation logs eval/{tiny_shakespeare,test,code}/{loss,perplexity,bits_per_byte}, their mean over
the three sets as eval/mean/{loss,bits_per_byte} and their token-weighted total as eval/*. Neither set is
trained on: training reads only the train split (data.eval_sets never feeds training; the leak check
refuses a set that overlaps it).
"""

import pathlib

from llama_jax.experiment import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("shakespeare.py"))
    c.data.eval_sets = {
        "test": {"split": "test"},  # tfds_name, data_dir and manual_dir come from config.data
        "code": {"files": "llama_jax/model/*.py"},
    }
    return c
