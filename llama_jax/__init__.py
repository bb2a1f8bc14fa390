"""llama_jax: a JAX/Flax, TPU-first research codebase for LLaMA-family language models.

The folders are the architecture: model/ (pure Flax), data/ (host-side input pipeline), train/ (optimizer,
step, program, hooks, loop), inference/ (load a workdir, sample, perplexity), tools/ (HF conversion,
sweeps); experiment.py builds the config, checkpoint.py owns the workdir on disk, sharding.py the mesh and
partition rules, distributed.py multi-host start-up, errors.py the one error hierarchy.

The names below are imported on first use (llama_jax/_lazy.py): `import llama_jax.model` loads the model
alone, not the data pipeline (TensorFlow Datasets), checkpointing (Orbax) or chat templates (jinja2).
"""

from llama_jax import _lazy

_EXPORTS = {
    "ConfigError": "errors",
    "LlamaJaxError": "errors",
    "generate": "inference",
    "load_workdir": "inference",
    "KVCache": "model",
    "Llama": "model",
    "ModelConfig": "model",
    "init_params": "model",
    "preset": "model",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
__version__ = "0.1.0"
