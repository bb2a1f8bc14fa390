"""Pretrain Llama-3-8B on C4 (TFDS c4/en) on a TPU v5p-128 pod slice: FSDP x 4-way tensor parallel.

Checked by the TPU compiler (tests/tools/test_plan.py; `python -m experiments.plan
--config=configs/llama3_8b_c4_tpu.py --topology=v5p-128`): a 46.6 GiB peak of 95.7 GiB per chip. The remat policy is
the one that recomputes least while fitting with room to spare (`--search`: save_dots, which also keeps the
MLP's gate and up projections, does not fit at this batch).

    --config.data.tokenizer=gs://BUCKET/llama3/tokenizer.json   (Llama-3's HF tokenizer)
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

from llama_jax.experiment import base_config

TOPOLOGY = "v5p-128"  # where this config is meant to run; the planner test compiles it for this slice


def get_config():
    c = base_config(
        "llama3_8b", dtype="bfloat16", remat_policy="save_dots_except_mlp", scan_layers=True, loss_chunk=512
    )
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 4
    c.sharding.rule_set = "fsdp_tp"
    c.num_steps = 250_000
    c.batch_size = 256  # x 8192 tokens = 2M tokens per step
    c.seq_len = 8192
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 1000
    c.keep_period = 10_000
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.data.tfds_name = "c4/en:3.1.0"
    c.data.eval_split = "validation[:2000]"
    c.data.tokenizer = "gs://YOUR_BUCKET/llama3/tokenizer.json"
    c.data.packing = "packed"
    return c
