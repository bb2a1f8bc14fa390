"""The training loop: resume, train, log, evaluate, checkpoint, survive preemption.

    python -m experiments.train --config=configs/shakespeare.py --workdir=DIR [--config.FIELD=VALUE ...]

Re-running the same command resumes from the newest complete checkpoint in DIR. The batch at step s is a
pure function of (seed, s, data config), and the checkpoint holds params, optimizer state, step and rng,
so a resumed run computes bit-identical steps to an uninterrupted one. On SIGTERM (or a TPU preemption
notice) the loop finishes its step, saves, waits for the save, and returns normally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llama_jax import checkpoint, data, evaluation, sharding
from llama_jax.logging_utils import MetricWriter, peak_flops
from llama_jax.tokenizer import Tokenizer, check_vocab, load_tokenizer, train_sentencepiece
from llama_jax.train_step import SkipGuard, Trainer, TrainState

log = logging.getLogger("llama_jax.train")

# Fields that may differ between a run and the one it resumes: they steer the loop, not the result.
RUN_CONTROL_FIELDS = frozenset(
    {"num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_period",
     "profile_start", "profile_steps", "allow_config_change"}
)


class ConfigMismatchError(checkpoint.CheckpointError):
    """Resuming a workdir with a config that changes what is computed."""


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lines `field: old -> new` for every leaf that differs (JSON-normalised)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, name + ".")
        elif _normalise(a) != _normalise(b):
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def _normalise(v):
    return [_normalise(x) for x in v] if isinstance(v, list | tuple) else v


def _check_resume_config(workdir, new: dict) -> None:
    old = checkpoint.read_config(workdir)
    if "num_steps" not in old:
        raise ConfigMismatchError(
            f"{workdir} holds an imported checkpoint, not a training run. Fine-tune from it with "
            f"--config.init_from={workdir} and a new --workdir."
        )
    diff = [line for line in config_diff(old, new) if line.split(":")[0] not in RUN_CONTROL_FIELDS]
    if diff and not new.get("allow_config_change", False):
        shown = "\n  ".join(diff)
        raise ConfigMismatchError(
            f"{workdir} was trained with a different config; resuming would mix two experiments:\n  {shown}\n"
            "Use a new --workdir, or pass --config.allow_config_change=True to resume with the new values."
        )


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM (single process) or by Orbax's preemption sync point (multi-host TPU/GPU)."""

    requested: bool = False

    def install(self) -> None:
        # Multi-process: jax.distributed's preemption service owns SIGTERM; a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
        self.requested = True

    def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts must agree on the step to stop at; jax.distributed's preemption service does that.
            return bool(mngr.reached_preemption(step))
        return self.requested


TRAINED_TOKENIZER = re.compile(r"^train:(bpe|unigram):(\d+)$")


def training_tokenizer(config, workdir: str) -> Tokenizer:
    """The run's tokenizer. `config.data.tokenizer = "train:bpe:2048"` (or unigram) trains a SentencePiece
    model on the *training* split the first time and keeps it in WORKDIR/tokenizer, where resuming,
    evaluation and sampling find it; anything else is a `load_tokenizer` spec."""
    spec = config.data.tokenizer
    m = TRAINED_TOKENIZER.match(spec)
    if not m:
        return load_tokenizer(spec)
    tok_dir = checkpoint.tokenizer_dir(workdir)
    if os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        return load_tokenizer(tok_dir)
    docs = data.documents_for_role(config.data, "train")
    log.info("training a %s tokenizer with %s pieces on %s", m.group(1), m.group(2), docs.name)
    if not sharding.is_main_process():
        raise RuntimeError("train the tokenizer once on one host (experiments.train_tokenizer) for a pod run.")
    return train_sentencepiece(docs.read(0, len(docs)), tok_dir, vocab_size=int(m.group(2)), model_type=m.group(1))


def _incomplete_checkpoints(workdir) -> list[str]:
    root = epath.Path(workdir) / checkpoint.CHECKPOINT_DIR
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if "tmp" in p.name)


def _truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop metrics.jsonl rows written after the checkpoint we resume from: they will be recomputed."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def _save(mngr, state: TrainState, step: int, data_state: dict, *, force: bool = False) -> bool:
    rest = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng,
            "consecutive_skips": state.consecutive_skips}
    return mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave(rest),
            data_state=ocp.args.JsonSave(data_state),
        ),
        force=force,
    )


def _restore(mngr, abstract: TrainState, step: int) -> tuple[TrainState, dict]:
    rest = {"opt_state": abstract.opt_state, "step": abstract.step, "rng": abstract.rng,
            "consecutive_skips": abstract.consecutive_skips}
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                train_state=ocp.args.StandardRestore(rest),
                data_state=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:
        raise checkpoint.CheckpointError(
            f"could not restore the training state of step {step} from {mngr.directory}: {e}\n"
            "If the model or optimizer config changed, use a new --workdir; if the checkpoint is damaged, "
            f"move {mngr.directory}/{step} aside to resume from the one before."
        ) from e
    ts = out["train_state"]
    state = TrainState(params=out["params"], opt_state=ts["opt_state"], step=ts["step"], rng=ts["rng"],
                       consecutive_skips=ts["consecutive_skips"])
    return state, out["data_state"]


def train(config, workdir: str) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics."""
    sharding.maybe_initialize_distributed()
    sharding.quiet_non_main_processes()
    main = sharding.is_main_process()
    workdir = os.fspath(workdir)
    cfg_dict = config.to_dict()

    # --- everything that can be wrong with the input is checked before anything compiles --------------
    partial = _incomplete_checkpoints(workdir)
    if partial:
        log.warning("ignoring incomplete checkpoint(s) %s in %s (a save was interrupted)", partial, workdir)
    resume_step = checkpoint.latest_step(workdir)
    if os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)) and resume_step is not None:
        _check_resume_config(workdir, cfg_dict)
    tokenizer = training_tokenizer(config, workdir)
    check_vocab(tokenizer, config.model.vocab_size)
    trainer = Trainer.from_config(config)
    train_data = data.TrainData(config, tokenizer)
    eval_data = data.EvalData(config, tokenizer) if config.eval_every else None

    if main:
        checkpoint.write_config(workdir, cfg_dict)
        tokenizer.save(checkpoint.tokenizer_dir(workdir))
    mngr = checkpoint.manager(
        workdir,
        max_to_keep=config.keep_checkpoints or None,
        keep_period=config.keep_period or None,
        enable_async_checkpointing=True,
    )

    if resume_step is not None:
        log.info("resuming from the checkpoint at step %d in %s", resume_step, workdir)
        state, data_state = _restore(mngr, trainer.abstract_state, resume_step)
        train_data.restore(data_state)  # checks the data config is the one the run was started with
        if main:
            _truncate_metrics(workdir, resume_step)
    else:
        state = trainer.init_state(config.seed)
        if config.init_from:
            log.info("initialising params from %s (fresh optimizer state)", config.init_from)
            params = checkpoint.restore_params(config.init_from, trainer.abstract_state.params)
            state = state.replace(params=params)
    start = int(state.step)

    preemption = Preemption()
    preemption.install()
    guard = SkipGuard(config.max_consecutive_skips)
    writer = MetricWriter(workdir, enabled=main)
    flops_per_step = trainer.model_config.flops_per_token(config.seq_len) * config.batch_size * config.seq_len
    peak, peak_source = peak_flops()
    log.info("MFU peak: %.3g FLOP/s (%s)", peak, peak_source)
    progress = _progress_bar(main, start, config.num_steps)
    # The rows of the global batch this process's devices hold; the loader reads only those.
    batches = train_data.iterator(start, rows=trainer.process_batch_slice(config.batch_size))
    eval_rows = None if eval_data is None else trainer.process_batch_slice(eval_data.batch_size)

    last: dict[str, Any] = {}
    timer_start, timer_steps, paused = time.perf_counter(), 0, 0.0
    profiling = False
    step = start
    try:
        for step in range(start, config.num_steps):
            if config.profile_steps and step == config.profile_start and main:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profiling = True
            batch = trainer.shard_batch(next(batches))
            state, metrics = trainer.train_step(state, batch)
            guard(metrics)
            done = step + 1
            if profiling and done == config.profile_start + config.profile_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
            timer_steps += 1

            if done % config.log_every == 0 or done == config.num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - timer_start - paused
                # The first interval includes compilation; it is still reported, as a real user sees it.
                tps = timer_steps * config.batch_size * config.seq_len / max(elapsed, 1e-9)
                last = {f"train/{k}": v for k, v in metrics.items()}
                last["train/tokens_per_sec"] = tps
                last["train/mfu"] = tps / (config.batch_size * config.seq_len) * flops_per_step / peak
                writer.write(done, last)
                if progress is not None:
                    progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tps:,.0f}",
                                         mfu=f"{last['train/mfu']:.1%}")
                timer_start, timer_steps, paused = time.perf_counter(), 0, 0.0

            if eval_data is not None and (done % config.eval_every == 0 or done == config.num_steps):
                t = time.perf_counter()
                result = evaluation.evaluate(
                    trainer.eval_step, trainer.shard_batch, state.params,
                    eval_data.batches(rows=eval_rows), eval_data.num_bytes,
                )
                writer.write(done, result)
                last.update(result)
                log.info("step %d: eval loss %.4f, bits/byte %.4f", done, result["eval/loss"],
                         result["eval/bits_per_byte"])
                paused += time.perf_counter() - t

            if done % (config.checkpoint_every or config.num_steps) == 0 or done == config.num_steps:
                t = time.perf_counter()
                _save(mngr, state, done, train_data.state(done), force=True)
                paused += time.perf_counter() - t
            if progress is not None:
                progress.update(1)
            if done < config.num_steps and preemption.reached(mngr, done):
                mngr.wait_until_finished()
                if mngr.latest_step() != done:
                    _save(mngr, state, done, train_data.state(done), force=True)
                    mngr.wait_until_finished()
                log.warning("preempted: saved step %d to %s; re-run the same command to resume.", done, workdir)
                break
        guard.flush()
    finally:
        batches.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        if progress is not None:
            progress.close()
        if profiling:
            jax.profiler.stop_trace()
    last["step"] = step + 1 if config.num_steps > start else start
    return last


def _progress_bar(main: bool, start: int, total: int):
    if not main:
        return None
    from tqdm.auto import tqdm

    # In a log file (a pod's nohup, CI) a bar line every second would drown everything else.
    interval = 1.0 if sys.stderr.isatty() else 60.0
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=interval)


def summarize(metrics: dict[str, Any]) -> str:
    keys = ("train/loss", "eval/loss", "eval/perplexity", "eval/bits_per_byte", "train/tokens_per_sec", "train/mfu")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not math.isnan(float(np.asarray(metrics[k])))]
    return f"step {metrics.get('step')}: " + ", ".join(parts)
