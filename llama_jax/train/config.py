"""The loop section: the experiment config's top-level fields (seed, num_steps, batch_size, seq_len, hook
cadences, resuming), read by the training loop (loop.py). Kept apart from the loop, beside the other sections
(model/config.py, data/config.py, train/optim.py, ...), so experiment.py, which builds every section, does
not import the loop, and train/ can import Experiment without an import circle."""

from __future__ import annotations

import dataclasses

from llama_jax.sections import Section


@dataclasses.dataclass(frozen=True)
class LoopConfig(Section):
    """The experiment's top-level fields: the run's length, batch, loss options and hook cadences."""

    seed: int = 0
    num_steps: int = 1000
    batch_size: int = 16  # global, across all hosts
    seq_len: int = 128
    grad_accum_steps: int = 1  # microbatches per step (lax.scan); batch_size is the global batch per update
    z_loss: float = 0.0  # coefficient of PaLM's z-loss, mean over targets of logsumexp(logits)^2; 1e-4 is typical
    max_consecutive_skips: int = 5  # halt after this many non-finite (skipped) steps in a row; 0 never halts
    # Halt when the loss or the update norm exceeds this multiple of its median over the last 100 steps
    # (a finite blow-up); 0 disables. Checkpoints are saved only from states that pass.
    spike_factor: float = 3.0
    log_every: int = 10
    eval_every: int = 200  # 0: no evaluation during training
    checkpoint_every: int = 200  # 0: save only at the end
    keep_checkpoints: int = 3  # 0: keep all
    keep_period: int = 0  # also keep every N-th step permanently; 0 disables
    init_from: str = ""  # workdir whose params start a fine-tune (fresh optimizer)
    allow_config_change: bool = False  # resume a workdir even though its config.json differs (diff is shown)
    # Resume from this checkpoint step instead of the newest; newer ones move to WORKDIR/discarded/. -1: newest.
    # Applied once: re-running the same command later resumes from the newest checkpoint (loop._resume_step).
    resume_step: int = -1
    profile_start: int = 10  # first step of a jax.profiler trace (written to WORKDIR/profile)
    profile_steps: int = 0  # number of steps to trace; 0 = no trace
    # Also log the metrics.jsonl scalars to this Weights & Biases project (pip install -e ".[wandb]"); "": off.
    wandb_project: str = ""

    def __post_init__(self):
        for name in ("num_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
            v = getattr(self, name)
            self._check(v > 0, f"{name}={v} must be a positive integer.")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "keep_period", "max_consecutive_skips",
                     "profile_start", "profile_steps"):
            v = getattr(self, name)
            self._check(v >= 0, f"{name}={v} must be >= 0.")
        self._check(self.z_loss >= 0, f"z_loss={self.z_loss} must be >= 0.")
        self._check(self.spike_factor == 0 or self.spike_factor > 1,
                    f"spike_factor={self.spike_factor} must be 0 (off) or > 1.")
        self._check(self.resume_step >= -1, f"resume_step={self.resume_step} must be a step, or -1 for the newest.")


@dataclasses.dataclass(frozen=True)
class EvalTasksConfig(Section):
    """config.eval_tasks: lm-evaluation-harness tasks run on the live params during training (hooks.EvalTasks,
    pip install -e ".[eval]"), logged as lm_eval/<task>/<metric>. tasks "" is off (lm_eval is never imported)."""

    SECTION = "eval_tasks"

    tasks: str = ""  # comma-separated lm_eval task names, e.g. "llama_jax_tiny_mc,arc_easy_local"
    every: int = 0  # steps between runs; 0: only at the end of training
    limit: int = 0  # documents per task; 0: all
    num_fewshot: int = 0
    batch_size: int = 8  # tokens per scoring step, in rows of the model's context (HarnessLM's batch_size)

    def __post_init__(self):
        for name in ("every", "limit", "num_fewshot"):
            self._check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0.")
        self._check(self.batch_size > 0, f"batch_size={self.batch_size} must be a positive integer.")

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]
