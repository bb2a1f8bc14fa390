"""An ablation starting point: the tiny model with every ablation flag spelled out.

Sweep any of them, e.g.
    python -m experiments.sweep --config=configs/ablation_example.py --workdir=runs/abl \
        --sweep='model.norm=rmsnorm,layernorm' --sweep='model.num_kv_heads=1,4' --seeds=2
"""

from llama_jax.experiment import base_config


def get_config():
    c = base_config("tiny", num_layers=4, dim=128, num_heads=4, num_kv_heads=4, ffn_dim=344, max_seq_len=128)
    c.model.norm = "rmsnorm"  # rmsnorm | layernorm
    c.model.mlp_activation = "swiglu"  # swiglu | geglu | gelu | relu2
    c.model.position = "rope"  # rope | none
    c.model.qk_norm = False
    c.model.tie_embeddings = False
    c.model.parallel_block = False
    c.model.use_bias = False
    c.num_steps = 300
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 30
    return c
