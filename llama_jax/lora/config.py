"""`config.lora`: low-rank adapters trained on a frozen base model (LoRA, Hu et al. 2021).

    --config.init_from=BASE_WORKDIR --config.lora.rank=8 [--config.lora.alpha=16]
        [--config.lora.targets='("attn/(q|k|v|o)_proj/kernel$", "mlp/(gate|up|down)_proj/kernel$")']
        [--config.lora.base_dtype=bfloat16] [--config.lora.train_also='("embed/embedding$", "lm_head/kernel$")']
        [--config.lora.train_also_lr_scale=0.4]

rank 0 (the default) is ordinary training. With rank r > 0 each param whose '/'-joined path a regex of
`targets` searches (the paths partition rules match: `layers_0/attn/q_proj/kernel`, or `layers/...` under
scan_layers) gets adapters A [*in, r] and B [r, *out], and the model computes with
x @ W + (alpha / r) * (x @ A) @ B in training (no dense [in, out] gradient, none for W) and the merged
W + (alpha / r) * A @ B in evaluation, sampling and export. Only A and B are trained; the base comes from
`init_from` and never changes. Targets are the attention and MLP projection kernels; the embedding and the
LM head are refused (llama_jax.lora.target_paths).

`train_also` (PEFT's modules_to_save) names params trained fully next to the adapters, starting from the
base's values: the embedding and LM head rows of tokens the base barely saw (the README's addition task on a
base whose tokenizer has few digits), or the norms. They live in the adapter tree at their own path, so they
are checkpointed, optimized and merged with the adapters; the base keeps its own copy unchanged.
`train_also_lr_scale` multiplies their updates (their learning rate; the adapters keep optimizer.lr).

No dropout field: the model has no dropout rng.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from llama_jax.errors import ConfigError
from llama_jax.sections import Section

BASE_DTYPES = ("", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    SECTION = "lora"

    rank: int = 0  # 0: off (every param trains); r > 0: only rank-r adapters train
    alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    # Regexes searched in '/'-joined param paths; every match gets adapters. Default: attention q, k, v, o.
    targets: tuple[str, ...] = (r"attn/(q|k|v|o)_proj/kernel$",)
    # dtype the frozen base params are held in on the devices; "" = model.param_dtype. Adapters and their
    # optimizer state always use model.param_dtype.
    base_dtype: str = ""
    # Regexes searched in '/'-joined param paths; every match trains fully alongside the adapters (rank > 0).
    train_also: tuple[str, ...] = ()
    # The train_also params learn at this times optimizer.lr (and its schedule); the adapters at 1x. Fully
    # trained embedding rows and head columns want a smaller step than adapters do (the README's sweep).
    train_also_lr_scale: float = 1.0

    def __post_init__(self):
        self._check(self.rank >= 0, f"lora.rank={self.rank} must be >= 0 (0 turns LoRA off).")
        self._check(self.alpha > 0, f"lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank).")
        self._check(self.train_also_lr_scale > 0,
                    f"lora.train_also_lr_scale={self.train_also_lr_scale} must be > 0 (to freeze those params, "
                    "drop them from lora.train_also).")
        self._check(self.base_dtype in BASE_DTYPES,
                    f"lora.base_dtype={self.base_dtype!r} is not one of {BASE_DTYPES} ('' = model.param_dtype).")
        self._check(not self.enabled or bool(self.targets),
                    "lora.targets is empty: give at least one regex of the param paths to adapt.")
        for regex in (*self.targets, *self.train_also):
            try:
                re.compile(regex)
            except (re.error, TypeError) as e:
                raise ConfigError(f"lora.targets / lora.train_also: {regex!r} is not a valid regex ({e}).") from e

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def base_dtype_for(self, param_dtype: str) -> jnp.dtype:
        """The dtype the frozen base is held in, for a model whose params are stored in `param_dtype`."""
        return jnp.dtype(self.base_dtype or param_dtype)
