"""Periodic work around the train step, each piece a hook with its own cadence.

The loop (loop.py) only steps and calls `hook(run)` for every hook whose `due(run)` is true; a new
periodic behaviour is a new hook here, not a new `if` in the loop. Hooks run in list order after each
step: the divergence guard first (a halted run writes nothing more), then profiling, logging, the checkpoint, evaluation
and lm_eval tasks (after the step's save, so a failure there never loses it), the progress bar, and preemption last.

`Run` is what hooks share: the state after the step, its metrics (device arrays), the step count, the
clock, and a `stop` flag a hook sets to end the loop after this step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from llama_jax.data import EvalData, TrainData
from llama_jax.errors import Interrupted, TrainingHalted
from llama_jax.inference.exact_match import ExactMatch
from llama_jax.inference.perplexity import combine, evaluate, response_metrics
from llama_jax.lock import WorkdirLock
from llama_jax.train.metrics import MetricWriter
from llama_jax.train.program import TrainProgram
from llama_jax.train.step import TrainState, save_state

log = logging.getLogger("llama_jax.train")


@dataclasses.dataclass
class Run:
    """The state of a training run, shared by the loop and its hooks."""

    program: TrainProgram
    state: TrainState
    num_steps: int
    start: int  # the step the run started (or resumed) at
    done: int = 0  # steps completed, counting those before a resume
    metrics: Mapping[str, Any] | None = None  # the last step's metrics, still on device
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # the latest logged/evaluated values
    paused: float = 0.0  # seconds spent in hooks since the last log line (not training time)
    stop: bool = False  # set by a hook: end the loop after this step

    @property
    def at_end(self) -> bool:
        return self.done == self.num_steps


class Hook:
    """Runs every `every` steps and at the last step (every=0: only at the last step)."""

    every: int = 1
    # Time spent in this hook is excluded from tokens/s (evaluation and checkpoint saves).
    pauses_clock: bool = False

    def due(self, run: Run) -> bool:
        return run.at_end or (self.every > 0 and run.done % self.every == 0)

    def on_start(self, run: Run) -> None:
        """Before the first step."""

    def __call__(self, run: Run) -> None:
        raise NotImplementedError

    def close(self, run: Run) -> None:
        """After the loop, also when it ends with an exception."""


# ---------------------------------------------------------------------- divergence guard
SPIKE_WINDOW = 100  # steps whose median loss / update norm a spike is measured against
SPIKE_MIN_HISTORY = 10  # healthy steps seen before the spike rule applies


class DivergenceGuard(Hook):
    """Halts training that diverged, before a diverged state can be saved.

    Two rules: `max_consecutive_skips` non-finite steps in a row (their updates were already dropped by the
    step), or a finite blow-up: a loss or an update norm above `spike_factor` times its median over the
    last SPIKE_WINDOW healthy steps (0 disables). The first steps have no such history: until SPIKE_MIN_HISTORY
    of them, a loss above `spike_factor` times `uniform_loss` (ln vocab_size, what a model that knows nothing
    scores) halts. Every step it checks the *previous* step's metrics, so
    the host never waits for the device; the Checkpoint hook calls `check` on the current step first, so
    every saved checkpoint passed the rules. The halt message names the newest checkpoint, which is
    therefore healthy, and the command that resumes from it.
    """

    def __init__(self, max_consecutive_skips: int, spike_factor: float, checkpoints: CheckpointList,
                 history: list[dict[str, float]] = (), uniform_loss: float = 0.0):
        self.max_consecutive_skips, self.spike_factor, self.checkpoints = max_consecutive_skips, spike_factor, checkpoints
        self.uniform_loss = uniform_loss
        self._history = {k: collections.deque((h[k] for h in history if k in h), maxlen=SPIKE_WINDOW)
                         for k in ("loss", "update_norm")}
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._checked = -1

    def __call__(self, run: Run) -> None:
        previous, self._pending = self._pending, (run.done, run.metrics)
        if previous is not None:
            self.check(*previous)
        if run.at_end:
            self.check(run.done, run.metrics)

    def check(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Raise TrainingHalted if step `step`'s metrics break a rule (each step is checked once)."""
        if step <= self._checked:
            return
        self._checked = step
        m = jax.device_get({k: metrics[k] for k in ("consecutive_skips", "loss", "update_norm")})
        skips = int(m["consecutive_skips"])
        if self.max_consecutive_skips > 0 and skips >= self.max_consecutive_skips:
            raise TrainingHalted(
                f"{skips} consecutive train steps up to step {step} had a non-finite loss or gradient (limit "
                f"max_consecutive_skips={self.max_consecutive_skips}); their updates were skipped. Likely causes: "
                "a learning rate too high for this model (lower optimizer.lr, lengthen optimizer.warmup_steps, "
                "keep optimizer.clip_norm > 0), float16 overflow (use bfloat16), or corrupt data. "
                + self.checkpoints.resume_hint()
            )
        if skips:
            return  # a skipped step changed nothing and is no baseline for the spike rule
        for key in ("loss", "update_norm"):
            self._check_spike(step, key, float(m[key]))
        for key in ("loss", "update_norm"):
            self._history[key].append(float(m[key]))

    def _check_spike(self, step: int, key: str, value: float) -> None:
        history = self._history[key]
        if self.spike_factor <= 0:
            return
        if len(history) < SPIKE_MIN_HISTORY:
            if key == "loss" and self.uniform_loss > 0 and value > self.spike_factor * self.uniform_loss:
                raise TrainingHalted(
                    f"training diverged at step {step}: loss {value:.4g} is {value / self.uniform_loss:.1f}x the "
                    f"loss of a uniform guess over the vocabulary ({self.uniform_loss:.4g} nats; limit "
                    f"spike_factor={self.spike_factor} while the run has under {SPIKE_MIN_HISTORY} steps of "
                    "history). " + self.checkpoints.resume_hint()
                )
            return
        median = statistics.median(history)
        if value > self.spike_factor * median:
            raise TrainingHalted(
                f"training diverged at step {step}: {key} {value:.4g} is {value / median:.1f}x its median "
                f"{median:.4g} over the last {len(history)} steps (limit spike_factor={self.spike_factor}). "
                + self.checkpoints.resume_hint()
            )


@dataclasses.dataclass
class CheckpointList:
    """What a halt message needs to say where to resume: the workdir's newest saved step."""

    mngr: ocp.CheckpointManager
    workdir: str

    def resume_hint(self) -> str:
        self.mngr.wait_until_finished()
        last = self.mngr.latest_step()
        if last is None:
            return "No checkpoint was saved; fix the cause and start again."
        return (
            f"The newest checkpoint, step {last} ({self.workdir}/checkpoints/{last}), passed these checks; "
            "after fixing the cause, re-run the same command with the changed flags and "
            "--config.allow_config_change=True to resume from it (or --config.resume_step=N for an older one)."
        )


# ---------------------------------------------------------------------- profiling
class Profile(Hook):
    """A jax.profiler trace of steps [start, start + steps) into `directory` (main process only)."""

    def __init__(self, directory: str, start: int, steps: int):
        self.directory, self.start, self.steps = directory, start, steps
        self.tracing = False

    def due(self, run: Run) -> bool:
        return run.done in (self.start, self.start + self.steps) and run.done < run.num_steps

    def on_start(self, run: Run) -> None:
        if run.start == self.start:
            self._begin()

    def __call__(self, run: Run) -> None:
        if not self.tracing and run.done == self.start:
            self._begin()
        elif self.tracing:
            self.close(run)

    def _begin(self) -> None:
        jax.profiler.start_trace(self.directory)
        self.tracing = True

    def close(self, run: Run) -> None:
        if self.tracing:
            jax.block_until_ready(run.state)
            jax.profiler.stop_trace()
            self.tracing = False


# ---------------------------------------------------------------------- checkpoints
class Checkpoint(Hook):
    """An async save of params, train state and data state every `every` steps and at the end, of a state
    the divergence guard has passed."""

    pauses_clock = True

    def __init__(self, mngr: ocp.CheckpointManager, train_data: TrainData, every: int, guard: DivergenceGuard):
        self.mngr, self.train_data, self.every, self.guard = mngr, train_data, every, guard

    def __call__(self, run: Run) -> None:
        self.guard.check(run.done, run.metrics)
        save_state(self.mngr, run.state, run.done, self.train_data.state(run.done))

    def close(self, run: Run) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


# ---------------------------------------------------------------------- evaluation
class Evaluate(Hook):
    """Held-out loss, perplexity and bits/byte of every held-out set (the sources' and data.eval_sets; with
    several, also their total and mean: inference.combine) every `every` steps and at the end; with
    `responses_only` (SFT, loss_on="responses": only response tokens are scored) also as eval/response_*, and with
    `exact_match` (data.exact_match_records) eval/exact_match of greedy answers (inference/exact_match.py)."""

    pauses_clock = True

    def __init__(self, eval_sets: dict[str, EvalData], writer: MetricWriter, every: int, *,
                 responses_only: bool = False, exact_match: ExactMatch | None = None):
        self.eval_sets, self.writer, self.every = eval_sets, writer, every
        self.responses_only, self.exact_match = responses_only, exact_match

    def __call__(self, run: Run) -> None:
        program = run.program
        params = program.eval_params(run.state)
        results = {}
        for name, ev in self.eval_sets.items():
            rows = program.process_batch_slice(ev.batch_size)
            results[name] = evaluate(program.eval_step, program.shard_batch, params, ev.batches(rows=rows),
                                     ev.num_bytes)
        result = combine(results)  # several sets: eval/<set>/..., the total as eval/... and eval/mean/...
        if self.responses_only:
            result.update(response_metrics(result, "eval/"))
        if self.exact_match is not None:
            batch_size = next(iter(self.eval_sets.values())).batch_size
            result.update(self.exact_match(program.model_params(run.state), program.model_config,
                                           batch_size=batch_size))
        self.writer.write(run.done, result)
        run.last.update(result)
        scored = " (responses)" if self.responses_only else ""
        message = (f"step {run.done}: eval loss{scored} {result['eval/loss']:.4f}, bits/byte "
                   f"{result['eval/bits_per_byte']:.4f}")
        if len(results) > 1:
            message += (" (" + ", ".join(f"{n} {result[f'eval/{n}/loss']:.4f}" for n in results)
                        + f"; mean bits/byte {result['eval/mean/bits_per_byte']:.4f})")
        if "eval/exact_match" in result:
            message += f", exact match {result['eval/exact_match']:.3f} of {int(result['eval/exact_match_records'])}"
        if log.isEnabledFor(logging.INFO):
            tqdm.write(message, file=sys.stderr)  # above the progress bar, not glued onto it


class EvalTasks(Hook):
    """lm-evaluation-harness tasks (config.eval_tasks) on the live params every `every` steps and at the end,
    through the adapter (llama_jax/inference/harness.py, built once: one compiled scoring step for the run),
    logged as lm_eval/<task>/<metric>. Every process runs it: process 0 drives lm_eval, the others follow."""

    pauses_clock = True

    def __init__(self, config, tokenizer, experiment: dict, writer: MetricWriter):
        self.config, self.tokenizer, self.experiment, self.writer = config, tokenizer, experiment, writer
        self.every = config.every
        self._lm = None

    def __call__(self, run: Run) -> None:
        from llama_jax.inference.harness import HarnessLM, metrics_of, run_tasks  # lm_eval: only when asked

        program, params = run.program, run.program.model_params(run.state)
        if self._lm is None:
            self._lm = HarnessLM(params, program.model_config, self.tokenizer, mesh=program.mesh,
                                 rules=program.rules, experiment=self.experiment, batch_size=self.config.batch_size)
        self._lm.params = params
        results = run_tasks(self._lm, self.config.task_list, num_fewshot=self.config.num_fewshot,
                            limit=self.config.limit or None)
        if results is None:  # a follower process
            return
        scores = metrics_of(results)
        self.writer.write(run.done, scores)
        run.last.update(scores)
        if log.isEnabledFor(logging.INFO):
            tqdm.write(f"step {run.done}: " + ", ".join(f"{k.removeprefix('lm_eval/')} {v:.4f}"
                                                        for k, v in scores.items() if "stderr" not in k),
                       file=sys.stderr)


# ---------------------------------------------------------------------- logging
class Log(Hook):
    """Train metrics to metrics.jsonl / TensorBoard every `every` steps, with tokens/s and MFU, and the
    progress bar's postfix. The first interval includes compilation, reported as a user sees it."""

    def __init__(self, writer: MetricWriter, every: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, progress: Progress | None, seen: Callable[[int], dict] | None = None):
        self.writer, self.every, self.tokens_per_step, self.seen = writer, every, tokens_per_step, seen
        self.flops_per_token, self.peak_flops, self.progress = flops_per_token, peak_flops, progress
        self._since, self._since_step = time.perf_counter(), 0

    def on_start(self, run: Run) -> None:
        self._since, self._since_step = time.perf_counter(), run.start

    def __call__(self, run: Run) -> None:
        metrics = jax.device_get(run.metrics)
        elapsed = max(time.perf_counter() - self._since - run.paused, 1e-9)
        tps = (run.done - self._since_step) * self.tokens_per_step / elapsed
        row = {f"train/{k}": v for k, v in metrics.items()}
        row["train/tokens_per_sec"] = tps
        row["train/mfu"] = tps * self.flops_per_token / self.peak_flops
        if self.seen is not None:  # data/<source>/{epochs,tokens}: what each source has given so far
            row.update(self.seen(run.done))
        self.writer.write(run.done, row)
        run.last.update(row, **{"train/logged_step": run.done})  # a stop between log steps reports it
        if self.progress is not None:
            self.progress.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tps:,.0f}",
                                          mfu=f"{row['train/mfu']:.1%}")
        self._since, self._since_step, run.paused = time.perf_counter(), run.done, 0.0


class Progress(Hook):
    """A tqdm bar over the run's steps (main process); in a log file a line a minute, not a second."""

    def __init__(self):
        self.bar = None

    def on_start(self, run: Run) -> None:
        interval = 1.0 if sys.stderr.isatty() else 60.0
        self.bar = tqdm(total=run.num_steps, initial=run.start, desc="train", dynamic_ncols=True,
                        mininterval=interval)

    def __call__(self, run: Run) -> None:
        self.bar.update(1)

    def close(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- preemption
class Preemption(Hook):
    """Stop at the end of a step when SIGTERM or Ctrl-C (SIGINT) arrived (single process) or, multi-host,
    when Orbax's preemption sync point says every host reached it; the step is saved first, and the save
    waited for. A second Ctrl-C exits at once. After a Ctrl-C the loop raises `Interrupted`."""

    def __init__(self, checkpoint: Checkpoint, workdir: str):
        self.checkpoint, self.mngr, self.workdir = checkpoint, checkpoint.mngr, workdir
        self.requested = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def on_start(self, run: Run) -> None:
        # Multi-process: jax.distributed's preemption service owns SIGTERM (a Python handler would replace
        # it), and a Ctrl-C reaches one host only, so it cannot pick a step every host stops at.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint at the end of this step, then exiting (Ctrl-C again: exit now).")
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.interrupted = True
        else:
            log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
        self.requested = True

    def due(self, run: Run) -> bool:
        return not run.at_end

    def __call__(self, run: Run) -> None:
        reached = bool(self.mngr.reached_preemption(run.done)) if jax.process_count() > 1 else self.requested
        if not reached:
            return
        self.mngr.wait_until_finished()
        if self.mngr.latest_step() != run.done:
            self.checkpoint(run)
            self.mngr.wait_until_finished()
        if self.interrupted:
            raise Interrupted(f"interrupted by Ctrl-C: saved step {run.done} to {self.workdir}; re-run the same "
                              "command to resume.")
        log.warning("preempted: saved step %d to %s; re-run the same command to resume.", run.done, self.workdir)
        run.stop = True

    def close(self, run: Run) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Heartbeat(Hook):
    """Keeps the workdir lock fresh (lock.py; rewrites it at most every HEARTBEAT_S)."""

    def __init__(self, lock: WorkdirLock):
        self.lock = lock

    def __call__(self, run: Run) -> None:
        self.lock.heartbeat()


def profile_dir(workdir: str) -> str:
    return os.path.join(workdir, "profile")
