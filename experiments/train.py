"""Train a model: python -m experiments.train --config=configs/shakespeare.py --workdir=DIR [--config.X=Y].

Re-running the same command resumes from DIR's newest complete checkpoint. Fine-tune an imported or
trained workdir (its model config and tokenizer are used; the config file's model section is not):

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/ft --config.init_from=/runs/llama1b_hf
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from llama_jax.experiment import Experiment
from llama_jax.train import summarize, train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config live.", required=True)


def main(argv):
    cli.quiet_logs()
    # The --config.X flags are what the user asked for; with init_from, other model fields come from the
    # source workdir (llama_jax/train/init_from.py).
    explicit = flags.FLAGS["config"].override_values
    print(summarize(train(Experiment.from_config(_CONFIG.value), _WORKDIR.value, explicit=explicit)))


if __name__ == "__main__":
    cli.run(main)
