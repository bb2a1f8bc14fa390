"""Llama-3.2-1B on one GPU: bf16 compute, cuDNN attention, remat, seq 2048.

Measured on one H200 (README, "One GPU, measured"): 51,874 tokens/s, 41.0% MFU, peak 70.9 GiB. On an 80 GB
H100/A100 (JAX's default limit there is ~59.7 GiB) add --config.model.loss_chunk=512: peak 50.0 GiB
(measured on the H200 under that same limit).

Fine-tune an imported checkpoint:
    python -m experiments.convert_hf --hf_dir=/models/Llama-3.2-1B --workdir=/runs/llama1b_hf
    python -m experiments.train --config=configs/llama3_2_1b_gpu.py --workdir=/runs/llama1b_ft \
        --config.init_from=/runs/llama1b_hf     # model config and tokenizer come from there
"""

from llama_jax.experiment import base_config


def get_config():
    c = base_config("llama3_2_1b", dtype="bfloat16", remat_policy="save_dots", scan_layers=True)
    c.model.attention_impl = "dot_product"
    c.model.max_seq_len = 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.sharding.rule_set = "dp"
    c.num_steps = 20_000
    c.batch_size = 16
    c.seq_len = 2048
    c.log_every = 20
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 500
    c.data.tfds_name = "c4/en:3.1.0"
    c.data.eval_split = "validation[:1000]"
    c.data.tokenizer = "/models/Llama-3.2-1B/tokenizer.json"
    c.data.packing = "packed"
    return c
