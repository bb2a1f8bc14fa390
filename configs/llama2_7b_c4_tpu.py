"""Pretrain Llama-2-7B on C4 (TFDS c4/en) on a TPU v4-64 pod slice (32 chips): FSDP over all chips.

Checked by the TPU compiler (tests/tools/test_plan.py; `python -m experiments.plan
--config=configs/llama2_7b_c4_tpu.py --topology=v4-64`): 16.9 of 30.7 GiB per chip with full remat;
save_qkv_proj would need 40 GiB at this batch.

    --config.data.tokenizer=gs://BUCKET/llama2/tokenizer.model   (Llama-2's sentencepiece model)
    --config.data.data_dir=gs://BUCKET/tensorflow_datasets      (where c4/en is prepared)
"""

from llama_jax.experiment import base_config

TOPOLOGY = "v4-64"  # where this config is meant to run; the planner test compiles it for this slice


def get_config():
    c = base_config("llama2_7b", dtype="bfloat16", remat_policy="full", scan_layers=True, loss_chunk=512)
    c.model.max_seq_len = 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding.rule_set = "fsdp"
    c.num_steps = 250_000
    c.batch_size = 512  # x 2048 tokens = 1M tokens per step
    c.seq_len = 2048
    c.log_every = 50
    c.eval_every = 2000
    c.checkpoint_every = 1000
    c.keep_period = 10_000
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1
    c.data.tfds_name = "c4/en:3.1.0"
    c.data.train_split = "train"
    c.data.eval_split = "validation[:2000]"
    c.data.tokenizer = "gs://YOUR_BUCKET/llama2/tokenizer.model"
    c.data.packing = "concat"
    return c
