"""The README main job: a small LLaMA trained on tiny-shakespeare in under 5 minutes on 2 CPU cores.

On a 2-core CPU the budget is ~2M tokens, so the choices favour many cheap optimizer steps: a 1M-param
model (d=128, 4 layers), a BPE tokenizer trained on the training split (2.4 bytes per token, so each step
sees 2.4x the text of a byte-level model), short windows and a high learning rate.
"""

from llama_jax.experiment import base_config


def get_config():
    c = base_config("shakespeare")
    c.data.tokenizer = "train:bpe:1024"
    c.num_steps = 920
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optimizer.lr = 4e-3
    c.optimizer.warmup_steps = 80
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.mesh.data = 1
    return c
