"""Training: optimizer, the pure train step, the jitted program, hooks and the loop, metrics."""

from llama_jax.train.hooks import CheckpointList, DivergenceGuard, Hook, Run
from llama_jax.train.loop import LoopConfig, summarize, train
from llama_jax.train.metrics import MetricWriter, peak_flops, read_metrics
from llama_jax.train.optim import OptimizerConfig, decay_mask_fn, learning_rate, make_optimizer, make_schedule
from llama_jax.train.program import TrainProgram
from llama_jax.train.step import TrainState, make_train_step, restore_state, save_state

__all__ = [
    "CheckpointList",
    "DivergenceGuard",
    "Hook",
    "LoopConfig",
    "MetricWriter",
    "OptimizerConfig",
    "Run",
    "TrainProgram",
    "TrainState",
    "decay_mask_fn",
    "learning_rate",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "peak_flops",
    "read_metrics",
    "restore_state",
    "save_state",
    "summarize",
    "train",
]
