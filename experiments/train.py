"""Train a model: python -m experiments.train --config=configs/shakespeare.py --workdir=DIR [--config.X=Y].

Re-running the same command resumes from DIR's newest complete checkpoint.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from llama_jax.train import summarize, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config live.", required=True)


def main(argv):
    del argv
    # Our progress at INFO; Orbax/absl chatter only when it matters.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("llama_jax").setLevel(logging.INFO)
    print(summarize(train(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
    app.run(main)
