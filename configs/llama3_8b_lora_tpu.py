"""LoRA fine-tune of Llama-3-8B on one TPU v5litepod-8 (8 x 16 GiB), where its full fine-tune does not fit.

Rank-16 adapters on every attention and MLP projection over a bf16 frozen base, fsdp over the 8 chips,
seq 4096. The train step is low-rank (x @ W + s * (x @ A) @ B), so it computes about 4N rather than 6N
FLOPs per token and holds no f32 copy, gradient or Adam moments of the base. Checked by the TPU compiler
(tests/tools/test_plan.py; the README's LoRA table has the numbers and the full fine-tune beside them):

    python -m experiments.plan --config=configs/llama3_8b_lora_tpu.py --topology=v5litepod-8 --noestimate
    python -m experiments.plan --config=configs/llama3_8b_lora_tpu.py --topology=v5litepod-8 --noestimate \\
        --config.lora.rank=0   # the full fine-tune at the same batch: does not fit

    --config.init_from=gs://BUCKET/runs/llama3_8b   (a workdir of the base: experiments.convert_hf --from_hf)
    --config.data.train_files=... --config.data.eval_files=...   (chat / sft records)
"""

from llama_jax.experiment import base_config

TOPOLOGY = "v5litepod-8"  # where this config is meant to run; the planner test compiles it for this slice


def get_config():
    c = base_config("llama3_8b", dtype="bfloat16", remat_policy="full", scan_layers=True, loss_chunk=512)
    c.init_from = "gs://YOUR_BUCKET/runs/llama3_8b"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding.rule_set = "fsdp"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = (r"attn/(q|k|v|o)_proj/kernel$", r"mlp/(gate|up|down)_proj/kernel$")
    c.lora.base_dtype = "bfloat16"
    c.num_steps = 2000
    c.batch_size = 8  # x 4096 tokens: one sequence per chip
    c.seq_len = 4096
    c.log_every = 10
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    c.data.format = "sft"
    c.data.packing = "packed"
    c.data.train_files = "gs://YOUR_BUCKET/sft/train.jsonl"
    c.data.eval_files = "gs://YOUR_BUCKET/sft/eval.jsonl"
    c.data.tokenizer = "gs://YOUR_BUCKET/llama3/tokenizer.json"
    return c
