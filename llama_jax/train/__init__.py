"""Training: optimizer, the pure train step, the jitted program, hooks and the loop, metrics.

The names below are imported on first use (llama_jax/_lazy.py), so importing one submodule (train.optim,
train.config: what experiment.py needs) does not load the loop and everything it runs.
"""

from llama_jax import _lazy

_EXPORTS = {
    "CheckpointList": "hooks",
    "DivergenceGuard": "hooks",
    "Hook": "hooks",
    "Run": "hooks",
    "LoopConfig": "config",
    "summarize": "loop",
    "train": "loop",
    "MetricWriter": "metrics",
    "peak_flops": "metrics",
    "read_metrics": "metrics",
    "OptimizerConfig": "optim",
    "decay_mask_fn": "optim",
    "learning_rate": "optim",
    "make_optimizer": "optim",
    "make_schedule": "optim",
    "TrainProgram": "program",
    "TrainState": "step",
    "make_train_step": "step",
    "restore_state": "step",
    "save_state": "step",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
