"""llama_jax: a JAX/Flax, TPU-first research codebase for LLaMA-family language models."""

from llama_jax.config import ConfigError, ModelConfig, preset

__all__ = ["ConfigError", "ModelConfig", "preset"]
__version__ = "0.1.0"
