"""Fine-tune a trained workdir on a generated task with exact answers (experiments.make_task): the README's
fine-tuning demonstration, minutes on a laptop CPU.

    python -m experiments.make_task --task=add --out_dir=/tmp/task_add
    python -m experiments.train --config=configs/sft_task.py --workdir=/tmp/sft_add \
        --config.init_from=/tmp/shakespeare                       # the README main job's workdir
    # LoRA instead of full fine-tuning, the README sweep's best settings (rank-8 adapters, alpha 16, on the
    # attention and MLP projections; the embedding and LM head trained fully at 10x the adapters' lr 2e-3,
    # i.e. 2e-2; no weight decay):
    #   --config.lora.rank=8 --config.optimizer.weight_decay=0

The model config and tokenizer come from init_from. Loss is on the answers only (data.loss_on="all" is the
ablation); each evaluation greedy-decodes the held-out prompts for eval/exact_match. The lora fields below
are read only when lora.rank > 0.
"""

from llama_jax.experiment import base_config


def get_config():
    c = base_config("shakespeare")  # replaced by init_from's model config
    c.data.format = "sft"
    c.data.packing = "packed"
    c.data.train_files = "/tmp/task_add/train.jsonl"
    c.data.eval_files = "/tmp/task_add/eval.jsonl"
    c.data.exact_match_records = 200
    c.num_steps = 300
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 50
    c.eval_every = 150
    c.checkpoint_every = 300
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.min_lr_ratio = 0.1
    c.mesh.data = 1
    # The base's tokenizer (BPE on tiny-shakespeare) barely has digits, '+' or '=': their embedding rows and
    # head columns must train, which adapters on the projections cannot do (the README's sweep: without
    # this, rank-8 adapters reach 0.017 exact match).
    c.lora.train_also = ("embed/embedding$", "lm_head/kernel$")
    c.lora.train_also_lr_scale = 10.0  # they learn at 2e-2 while the adapters take optimizer.lr = 2e-3
    c.lora.targets = (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
    return c
