"""The training loop: check the inputs, resume or initialise, then step and run the hooks.

    python -m experiments.train --config=configs/shakespeare.py --workdir=DIR [--config.FIELD=VALUE ...]

Re-running the same command resumes from the newest complete checkpoint in DIR. The batch at step s is a
pure function of (seed, s, data config), and the checkpoint holds params, optimizer state and step, so a
resumed run computes bit-identical steps to an uninterrupted one. On SIGTERM (or a TPU preemption notice)
the loop finishes its step, saves, waits for the save, and returns normally. Everything periodic
(logging, evaluation, checkpoints, profiling, preemption, the non-finite guard) is a hook (hooks.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import checkpoint, distributed
from llama_jax import lora as lora_lib
from llama_jax.data import TrainData, chat, check_vocab, eval_sets
from llama_jax.data.tokenizer import training_tokenizer
from llama_jax.errors import CheckpointError, DataError
from llama_jax.inference.exact_match import ExactMatch
from llama_jax.lock import WorkdirLock
from llama_jax.lora.workdir import read_base_ref, restore_base, write_base_ref
from llama_jax.train import hooks, init_from
from llama_jax.train.metrics import MetricWriter, import_wandb, peak_flops, read_metrics, truncate_metrics
from llama_jax.train.optim import make_schedule
from llama_jax.train.program import TrainProgram
from llama_jax.train.step import restore_state

if TYPE_CHECKING:  # experiment.py builds on train/, so train/ never imports it at run time
    from llama_jax.experiment import Experiment

log = logging.getLogger("llama_jax.train")


def train(exp: Experiment, workdir: str, extra_hooks: Sequence[hooks.Hook] = (), *,
          explicit: Collection[str] = ()) -> dict[str, Any]:
    """Train `exp` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics.

    `extra_hooks` run after the built-in ones (hooks.py), each on its own cadence. `explicit`: dotted names
    of the config fields the user set ("model.dim"; experiments.train passes its --config.X flags); with
    init_from, the model and tokenizer come from the source except those (init_from.py).
    """
    distributed.maybe_initialize_distributed()
    distributed.quiet_non_main_processes()
    workdir = os.fspath(workdir)
    exp = init_from.resolve(exp, explicit)  # reads the source only: a refusal leaves the workdir untouched
    if exp.loop.wandb_project and distributed.is_main_process():
        import_wandb()  # a missing wandb is refused here, before the workdir is touched
    if exp.eval_tasks.task_list:
        from llama_jax.inference import harness  # noqa: F401  (likewise a missing lm_eval, the eval extra)
    # Config errors (mesh, divisibility, rules) are raised here, before the workdir is touched.
    program = TrainProgram.from_experiment(exp)
    with _workdir_lock(workdir) as lock:
        return _train(exp, workdir, program, lock, extra_hooks)


def _train(exp: Experiment, workdir: str, program: TrainProgram, lock, extra_hooks) -> dict[str, Any]:
    loop = exp.loop
    resume_step = _check_workdir(exp, workdir)
    if resume_step is not None and resume_step >= loop.num_steps:
        log.warning("nothing to train: %s already holds step %d of num_steps=%d; raise --config.num_steps to "
                    "train longer.", workdir, resume_step, loop.num_steps)
        return {**_last_logged(workdir), "step": resume_step}
    tokenizer = training_tokenizer(exp.data, checkpoint.tokenizer_dir(workdir),
                                   is_main_process=distributed.is_main_process())
    check_vocab(tokenizer, exp.model.vocab_size)
    train_data = TrainData.from_config(exp.data, tokenizer, seq_len=loop.seq_len, batch_size=loop.batch_size,
                                       seed=loop.seed)
    eval_data, exact_match = None, None
    if loop.eval_every:
        eval_data = eval_sets(exp.data, tokenizer, seq_len=loop.seq_len, batch_size=exp.eval_batch_size)
        exact_match = _exact_match(exp, tokenizer)
    mngr = checkpoint.manager(workdir, max_to_keep=loop.keep_checkpoints or None,
                              keep_period=loop.keep_period or None, enable_async_checkpointing=True)
    state = _initial_state(exp, program, mngr, train_data, resume_step)
    base_ref = None
    if exp.lora.enabled:  # the frozen base: init_from's params; on resume, checked to be the adapters' base
        recorded = read_base_ref(workdir) if resume_step is not None else None
        base, base_ref = restore_base(loop.init_from, program.abstract_state.base, recorded=recorded, where=workdir)
        state = state.replace(base=base)
        if resume_step is None:  # lora.train_also params start from the base's values (as lora.base_dtype holds them)
            copy = jax.jit(lora_lib.copy_trained, out_shardings=program.state_shardings.params)
            state = state.replace(params=copy(state.params, base))
    # Only now, with the checkpoint restored (or a fresh state built), does the workdir change: a failed
    # resume leaves the checkpoints, config.json, the tokenizer and metrics.jsonl as they were.
    if resume_step is not None:
        if distributed.is_main_process():
            checkpoint.discard_after(workdir, resume_step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("llama_jax: newer checkpoints discarded")
        mngr.reload()  # it listed any moved steps
    run = hooks.Run(program=program, state=state, num_steps=loop.num_steps, start=int(state.step))
    run.done = run.start
    if distributed.is_main_process():
        _write_workdir(exp, workdir, tokenizer, base_ref, run.start)
    writer = MetricWriter(workdir, enabled=distributed.is_main_process(), wandb_project=loop.wandb_project,
                          config=exp.to_dict())
    with contextlib.closing(writer):
        all_hooks = [*_hooks(exp, workdir, mngr, train_data, eval_data, writer, exact_match, tokenizer),
                     *extra_hooks]
        if lock is not None:
            all_hooks.append(hooks.Heartbeat(lock))
        _loop(run, all_hooks, train_data)
    return {**run.last, "step": run.done}


def _write_workdir(exp: Experiment, workdir: str, tokenizer, base_ref, start: int) -> None:
    """What the run writes before its first step: config.json, a LoRA run's base reference, the tokenizer
    with its chat template, and metrics.jsonl cut back to `start`."""
    checkpoint.write_config(workdir, exp.to_dict())
    if base_ref is not None:
        write_base_ref(workdir, base_ref)
    template = chat.save_tokenizer(tokenizer, exp.data, checkpoint.tokenizer_dir(workdir))  # with its chat template
    if template is not None and exp.data.format == "sft":  # the template writes the training text
        chat.warn_missing_control_tokens(template, tokenizer)
    truncate_metrics(workdir, start)  # rows past the start are recomputed (each step logged once)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """Process 0 takes the workdir's lock (lock.py) and every process learns whether it did."""
    lock, error = None, None
    if distributed.is_main_process():
        try:
            lock = WorkdirLock.acquire(workdir)
        except CheckpointError as e:
            error = e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or CheckpointError(f"{workdir} is in use by another training run (process 0 says so).")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _last_logged(workdir: str) -> dict[str, Any]:
    """The newest value of every metric in metrics.jsonl (a finished run's summary)."""
    last: dict[str, Any] = {}
    for row in read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []:
        last.update({k: v for k, v in row.items() if v is not None})
    return last


def _check_workdir(exp: Experiment, workdir: str) -> int | None:
    """The step to resume from (None: a fresh run), after checking the workdir can be resumed with `exp`."""
    partial = checkpoint.incomplete_checkpoints(workdir)
    if partial:
        log.warning("ignoring incomplete checkpoint(s) %s in %s (a save was interrupted)", partial, workdir)
    resume_step = _resume_step(exp.loop.resume_step, workdir, checkpoint.all_steps(workdir))
    if os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)) and resume_step is not None:
        checkpoint.check_resume_config(workdir, exp.to_dict())
        _warn_if_the_schedule_moves(exp, checkpoint.read_config(workdir)["num_steps"], resume_step)
    return resume_step


def _resume_step(asked: int, workdir: str, steps: list[int]) -> int | None:
    """The checkpoint to resume from: the newest, or `asked` (resume_step) the first time it is asked for.

    resume_step is a one-time action: the run that applies it records it in config.json, and re-running the
    same command (after it finished, or after a Ctrl-C or preemption) resumes from the newest checkpoint,
    never moving the checkpoints trained since then aside again, even once step `asked` has rotated out.
    """
    newest = steps[-1] if steps else None
    if asked < 0:
        return newest
    config = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if os.path.exists(config) and checkpoint.read_config(workdir).get("resume_step") == asked and newest is not None:
        log.warning("--config.resume_step=%d was applied by an earlier run of this command; resuming from the "
                    "newest checkpoint, step %d. To go back to step %d again, move the newer checkpoints out of "
                    "%s by hand.", asked, newest, asked, os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
        return newest
    if asked not in steps:
        raise CheckpointError(
            f"--config.resume_step={asked}: {workdir} has no checkpoint at that step; its checkpoints are at "
            f"steps {steps}."
        )
    return asked


def _warn_if_the_schedule_moves(exp: Experiment, old_num_steps: int, step: int) -> None:
    """num_steps may change on resume, but the lr schedule is a function of it: say what the lr does next."""
    if old_num_steps == exp.loop.num_steps or step >= exp.loop.num_steps:
        return
    before = float(make_schedule(exp.optimizer, old_num_steps)(step))
    after = float(make_schedule(exp.optimizer, exp.loop.num_steps)(step))
    if not math.isclose(before, after, rel_tol=1e-6):
        log.warning(
            "num_steps %d -> %d rescales the %s schedule: the next update (step %d) uses lr %.3g, where the "
            "run as started would have used %.3g.", old_num_steps, exp.loop.num_steps, exp.optimizer.schedule,
            step + 1, after, before,
        )


def _initial_state(exp, program: TrainProgram, mngr, train_data: TrainData, resume_step):
    """The resumed state (data position checked and restored), or a fresh one, optionally from init_from."""
    if resume_step is not None:
        log.info("resuming from the checkpoint at step %d in %s", resume_step, mngr.directory)
        state, data_state = restore_state(mngr, program.abstract_state, resume_step)
        _restore_data_position(exp, train_data, data_state, resume_step)
        return state
    state = program.init_state(exp.loop.seed)
    if exp.loop.init_from and not exp.lora.enabled:  # with LoRA init_from is the frozen base (_train)
        log.info("initialising params from %s (fresh optimizer state)", exp.loop.init_from)
        state = state.replace(params=checkpoint.restore_params(exp.loop.init_from, program.abstract_state.params))
    return state


def _restore_data_position(exp, train_data: TrainData, data_state: dict, step: int) -> None:
    """Check the checkpoint's data state against this data (so a resumed run replays the same batches);
    with allow_config_change a different data config resumes at the step on the new data, saying so."""
    try:
        train_data.restore(data_state)
    except DataError:
        if not exp.loop.allow_config_change:
            raise DataError(
                f"the checkpoint at step {step} was trained on other data (its data state does not match this "
                "data config: dataset, split, tokenizer, seq_len, batch_size, seed or packing), so resuming would "
                "not replay the same batches. Restore that data, or pass --config.allow_config_change=True to "
                f"resume at step {step} on the new data."
            ) from None
        log.warning("allow_config_change: the data differs from what the checkpoint was trained on; resuming at "
                    "step %d on the new data (the batches from here on are not the original run's).", step)


def _exact_match(exp, tokenizer) -> ExactMatch | None:
    """The held-out exact-match examples of data.exact_match_records (None when 0)."""
    if not exp.data.exact_match_records:
        return None
    if jax.process_count() > 1:  # the sampler feeds host arrays to one process's devices
        log.warning("data.exact_match_records is ignored in a multi-process run; run experiments.eval_ppl "
                    "--config.data.exact_match_records=N on the workdir instead.")
        return None
    return ExactMatch.from_config(exp.data, tokenizer, max_seq_len=exp.model.max_seq_len)


def _hooks(exp, workdir, mngr, train_data, eval_data, writer, exact_match=None, tokenizer=None) -> list[hooks.Hook]:
    loop, main = exp.loop, distributed.is_main_process()
    peak, peak_source = peak_flops()
    log.info("MFU peak: %.3g FLOP/s (%s)", peak, peak_source)
    progress = hooks.Progress() if main else None
    tokens_per_step = loop.batch_size * loop.seq_len
    flops_per_token = exp.train_flops_per_token()  # with LoRA, the FLOPs it does (no base weight grads)
    # A resumed run measures spikes against the losses its predecessor logged (rows up to the resume step).
    history = [{k.removeprefix("train/"): v for k, v in r.items()} for r in read_metrics(workdir) if "train/loss" in r]
    guard = hooks.DivergenceGuard(loop.max_consecutive_skips, loop.spike_factor,
                                  hooks.CheckpointList(mngr, workdir), history[-hooks.SPIKE_WINDOW:],
                                  uniform_loss=math.log(exp.model.vocab_size))
    out: list[hooks.Hook] = [guard]
    if loop.profile_steps and main:
        out.append(hooks.Profile(hooks.profile_dir(workdir), loop.profile_start, loop.profile_steps))
    out.append(hooks.Log(writer, loop.log_every, tokens_per_step, flops_per_token, peak, progress,
                         seen=train_data.seen))
    save = hooks.Checkpoint(mngr, train_data, loop.checkpoint_every, guard)
    out.append(save)
    if eval_data is not None:
        responses_only = exp.data.format == "sft" and exp.data.loss_on == "responses"
        out.append(hooks.Evaluate(eval_data, writer, loop.eval_every, responses_only=responses_only,
                                  exact_match=exact_match))
    if exp.eval_tasks.task_list:  # lm_eval tasks (config.eval_tasks); "" never imports lm_eval
        out.append(hooks.EvalTasks(exp.eval_tasks, tokenizer, exp.to_dict(), writer))
    if progress is not None:
        out.append(progress)
    out.append(hooks.Preemption(save, workdir))
    return out


def _loop(run: hooks.Run, all_hooks: list[hooks.Hook], train_data: TrainData) -> None:
    """Step from run.start to run.num_steps, running the hooks that are due after each step."""
    program = run.program
    # The rows of the global batch this process's devices hold; the loader reads only those.
    batches = train_data.iterator(run.start, rows=program.process_batch_slice(train_data.batch_size))
    with contextlib.ExitStack() as stack:
        stack.callback(batches.close)
        for hook in all_hooks:  # closed in reverse order, also when a step or a hook raises
            stack.callback(hook.close, run)
        for hook in all_hooks:
            hook.on_start(run)
        for step in range(run.start, run.num_steps):
            run.state, run.metrics = program.train_step(run.state, program.shard_batch(next(batches)))
            run.done = step + 1
            for hook in all_hooks:
                if hook.due(run):
                    _call(hook, run)
            if run.stop:
                break


def _call(hook: hooks.Hook, run: hooks.Run) -> None:
    t = time.perf_counter()
    hook(run)
    if hook.pauses_clock:
        run.paused += time.perf_counter() - t


def summarize(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "eval/loss", "eval/perplexity", "eval/bits_per_byte", "train/tokens_per_sec", "train/mfu")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not math.isnan(float(np.asarray(metrics[k])))]
    logged = metrics.get("train/logged_step")
    at = f" (train/* as logged at step {logged})" if logged is not None and logged != metrics.get("step") else ""
    return f"step {metrics.get('step')}: " + ", ".join(parts) + at
