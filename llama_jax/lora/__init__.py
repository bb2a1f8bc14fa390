"""LoRA: low-rank adapters trained on a frozen base (the `config.lora` section).

config.py      LoraConfig: rank (0 = off), alpha, targets (regexes over param paths), base_dtype, train_also
adapters.py    which params get adapters (and which train fully), their init and shardings, the low-rank
               collection the train step applies (x @ W + s * (x @ A) @ B), and the merged weights W + s * A @ B

`llama_jax.lora.workdir` (the adapter workdir's reference to its base, its fingerprint, and the merged
params that load_workdir and the HF export read) builds on llama_jax.checkpoint, which itself imports
this package's config for the resume check, so it is imported by its module path, not from here.
"""

from llama_jax.lora.adapters import (
    adapter_param_count,
    adapter_specs,
    copy_trained,
    delta,
    init_adapters,
    lowrank,
    merge,
    overlay,
    target_paths,
    train_also_mask,
    train_also_matmul_param_count,
    train_also_paths,
)
from llama_jax.lora.config import LoraConfig

__all__ = [
    "LoraConfig", "adapter_param_count", "adapter_specs", "copy_trained", "delta", "init_adapters", "lowrank", "merge",
    "overlay", "target_paths", "train_also_mask", "train_also_matmul_param_count", "train_also_paths",
]
