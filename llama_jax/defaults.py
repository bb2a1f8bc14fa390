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
    c.grad_accum_steps = 1  # microbatches per step (lax.scan); batch_size is the global batch per update
    c.z_loss = 0.0  # coefficient of PaLM's z-loss, mean over targets of logsumexp(logits)^2; 1e-4 is typical
    c.max_consecutive_skips = 5  # halt after this many non-finite (skipped) steps in a row; 0 never halts
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.keep_period = 0  # also keep every N-th step permanently; 0 disables
    c.init_from = ""  # workdir whose params start a fine-tune (fresh optimizer)
    c.allow_config_change = False  # resume a workdir even though its config.json differs (diff is shown)
    c.profile_start = 10  # first step of a jax.profiler trace (written to WORKDIR/profile)
    c.profile_steps = 0  # number of steps to trace; 0 = no trace

    # Device mesh (llama_jax.sharding): sizes of the data / fsdp / tensor axes over all processes'
    # devices; -1 = all remaining devices. Batch is split over data*fsdp.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # rule_set: "dp" | "fsdp" | "fsdp_tp" (llama_jax.sharding.RULE_SETS). fsdp_tp uses whichever mesh
    # axes are > 1, so the mesh alone picks the strategy. param_rules: ((regex, spec), ...) replacing the
    # set's param rules; activation_rules: ((logical_name, mesh_axes), ...) replacing its activation rules.
    c.sharding = ml_collections.ConfigDict(dict(rule_set="fsdp_tp", param_rules=None, activation_rules=None))

    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | adafactor | lion
            lr=3e-4,  # peak learning rate
            b1=0.9,  # adamw / lion
            b2=0.95,  # adamw / lion (lion's paper uses 0.99)
            eps=1e-8,  # adamw
            weight_decay=0.1,  # decoupled; adafactor's is not multiplied by the lr
            schedule="cosine",  # cosine | linear | constant | wsd, all after a linear warmup
            warmup_steps=100,
            min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio
            decay_fraction=0.1,  # wsd: the final fraction of num_steps spent decaying
            wsd_decay_shape="linear",  # wsd: linear | cosine | 1-sqrt
            clip_norm=1.0,  # global-norm gradient clipping; 0 disables
            # Regexes searched in '/'-joined param paths; matches get no weight decay.
            no_decay=(r"norm/(scale|bias)$", r"(^|/)bias$", r"(^|/)embed/embedding$"),
            adafactor_decay_rate=0.8,
            adafactor_param_scale=False,  # multiply updates by the param RMS (T5 style)
            adafactor_clipping_threshold=1.0,  # update clipping by block RMS; 0 disables
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            tfds_name="tiny_shakespeare",
            train_split="train",  # TFDS split syntax, slices allowed: "train[:95%]"
            eval_split="validation",  # held out; must not overlap train_split
            text_key="text",  # TFDS feature / jsonl field holding the text
            data_dir="",  # TFDS data dir ("" = TFDS default; gs:// works)
            manual_dir="",  # offline builds: dir with the downloaded files (tiny_shakespeare: input.txt)
            train_files="",  # comma-separated local globs (.jsonl: a doc per line; else a doc per file)
            eval_files="",  # held-out local files; required with train_files
            tokenizer="byte",  # "byte", a tokenizer.model/tokenizer.json, or a dir holding one
            packing="concat",  # "concat" (attend across docs) or "packed" (segment_ids per doc)
            add_bos=True,
            add_eos=True,
            eval_batch_size=0,  # 0 = batch_size
            window_docs=0,  # >0: tokenize the train split lazily, this many documents at a time (C4-size data)
            cache_dir="",  # keep tokenized splits here as .npy (memory-mapped on reuse); "" = in memory
            prefetch=2,  # batches computed ahead in a background thread
        )
    )
    return c
