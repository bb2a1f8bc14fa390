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
