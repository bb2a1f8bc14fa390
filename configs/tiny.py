"""For tests and quick checks: a 2-layer GQA model on tiny_shakespeare; a train step well under a second."""

from llama_jax.experiment import base_config


def get_config():
    c = base_config("tiny")
    c.num_steps = 20
    c.batch_size = 8
    c.seq_len = 64
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 10
    c.optimizer.warmup_steps = 5
    return c
