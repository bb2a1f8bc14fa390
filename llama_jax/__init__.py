"""llama_jax: a JAX/Flax, TPU-first research codebase for LLaMA-family language models.

The folders are the architecture: model/ (pure Flax), data/ (host-side input pipeline), train/ (optimizer,
step, program, hooks, loop), inference/ (load a workdir, sample, perplexity), tools/ (HF conversion,
sweeps); experiment.py builds the config, checkpoint.py owns the workdir on disk, sharding.py the mesh and
partition rules, distributed.py multi-host start-up, errors.py the one error hierarchy.
"""

from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.inference import generate, load_workdir
from llama_jax.model import KVCache, Llama, ModelConfig, init_params, preset

__all__ = [
    "ConfigError",
    "KVCache",
    "Llama",
    "LlamaJaxError",
    "ModelConfig",
    "generate",
    "init_params",
    "load_workdir",
    "preset",
]
__version__ = "0.1.0"
