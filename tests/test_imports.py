"""What importing a module loads, each in a fresh interpreter: no import circle between experiment.py and the
training loop, and a package face that loads only what is used."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def loaded_after(statement: str, modules: list[str]) -> dict[str, bool]:
    """{module: whether it is in sys.modules} after running `statement` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps({{m: m in sys.modules for m in {modules!r}}}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_experiment_config_does_not_import_the_training_loop():
    """experiment.py builds the loop section (train/config.py), not the loop that train/ runs with it."""
    assert loaded_after("import llama_jax.experiment", ["llama_jax.train.loop", "llama_jax.train.hooks"]) == {
        "llama_jax.train.loop": False, "llama_jax.train.hooks": False}


def test_the_model_loads_without_the_data_checkpoint_and_chat_stacks():
    """`import llama_jax.model` went through an eager package face that loaded TensorFlow Datasets, Orbax and
    jinja2 (8.5 s); the face now imports each name on first use, and still serves them all."""
    heavy = ["tensorflow_datasets", "orbax.checkpoint", "jinja2", "llama_jax.data", "llama_jax.inference"]
    assert loaded_after("import llama_jax.model", heavy) == dict.fromkeys(heavy, False)
    assert loaded_after("from llama_jax import Llama, preset", heavy) == dict.fromkeys(heavy, False)
    assert loaded_after("from llama_jax import load_workdir", ["llama_jax.inference"]) == {"llama_jax.inference": True}


def test_sample_help_and_flag_errors_load_no_jax():
    """A command answers --help (and a usage error) before loading the stacks its work needs."""
    statement = ("import sys\nsys.argv = ['sample', '--help']\nimport experiments.sample\n"
                 "from absl import flags\nflags.FLAGS(['sample', '--workdir=x'])")
    assert loaded_after(statement, ["jax", "orbax.checkpoint"]) == {"jax": False, "orbax.checkpoint": False}


def test_the_training_loop_loads_wandb_only_for_a_run_that_logs_to_it():
    """Weights & Biases is an optional extra (loop.wandb_project): an install without it trains as before."""
    assert loaded_after("import llama_jax.train.loop", ["wandb"]) == {"wandb": False}


def test_lm_eval_is_loaded_only_by_the_harness():
    """lm-evaluation-harness is an optional extra (".[eval]"): the inference package and the training loop
    load without it, and the adapter is one attribute access away."""
    assert loaded_after("import llama_jax.inference, llama_jax.train.loop", ["lm_eval"]) == {"lm_eval": False}
    assert loaded_after("from llama_jax.inference import HarnessLM", ["lm_eval"]) == {"lm_eval": True}
