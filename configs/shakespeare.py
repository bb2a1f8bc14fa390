"""The README main job: a small LLaMA trained on tiny-shakespeare in about 5 minutes on 2 CPU cores."""

from llama_jax.defaults import base_config


def get_config():
    c = base_config("shakespeare")
    c.num_steps = 2000
    c.batch_size = 16
    c.seq_len = 256
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.mesh.data = 1
    return c
