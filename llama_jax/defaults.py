"""The experiment config every `configs/*.py` starts from: one ConfigDict, one section per subsystem.

`config.model` holds exactly the fields of `llama_jax.config.ModelConfig` (built from a preset), so
`--config.model.FIELD=VALUE` reaches the model with no hand-copying. Each other section is read by one
module: `mesh`/`sharding` by llama_jax.sharding, `optimizer` by llama_jax.optim, `data` by
llama_jax.data.
"""

from __future__ import annotations

import ml_collections

from llama_jax.config import preset


def base_config(model_preset: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = preset(model_preset, **model_overrides).to_dict()

    # Training loop (top-level names are relied on by other tools).
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 16  # global, across all hosts
    c.seq_len = 128
    c.grad_accum_steps = 1
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.keep_period = 0  # also keep every N-th step permanently; 0 disables
    c.init_from = ""  # workdir whose params start a fine-tune (fresh optimizer)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=3e-4,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            schedule="cosine",
            warmup_steps=100,
            min_lr_ratio=0.1,
            clip_norm=1.0,
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            tfds_name="tiny_shakespeare",
            train_split="train",
            eval_split="validation",
            text_key="text",
            data_dir="",
            manual_dir="",
            tokenizer="byte",
        )
    )
    return c
