"""Held-out evaluation: every target token scored once; loss, perplexity and bits-per-byte.

bits/byte = (total NLL in nats) / (UTF-8 bytes of the scored text * ln 2). Unlike per-token loss it does
not depend on the tokenizer, so byte-level and BPE models are compared on one scale.

Which tokens are scored, and the bytes they carry, are data.py's conventions (its docstring, "Held-out
eval"): documents are tokenized `[BOS] ids [EOS]`, every stream token is a target except the first of the
stream (concat) or of each document (packed), BOS targets are never scored, and a document's UTF-8 bytes
sit on its last token. So with BOS/EOS and the byte tokenizer a text of n bytes scores n + 1 tokens (its
bytes and the EOS) and carries exactly n bytes.

Sliding windows (`Windows`, `window_layout`, `WindowedEval`). Without a stride, text longer than the
context is cut into non-overlapping windows of seq_len targets (the concat rows of data.py), so a target
early in a window sees little context. With `stride=S` (0 < S <= seq_len), as in Hugging Face's perplexity
guide: the first window scores its seq_len targets; each later window is a full window of seq_len inputs
that ends S targets further on and scores only those last S targets (the final one possibly fewer). A
target is still scored exactly once, but is predicted from at least seq_len - S + 1 preceding tokens
(stride=1: always a full seq_len tokens; targets in the first window: everything before them). The scored
set, token and byte totals are the same with or without a stride; only the context differs. Windows never
cross a span: the whole stream in concat mode, one document in packed mode.

    model_config, params, tokenizer, config = workdir.load_workdir(DIR, mesh)
    data = eval_windows(docs, tokenizer, seq_len=2048, batch_size=8, stride=512)
    perplexity(params, model_config, data, mesh=mesh, rules=rules)  # {"loss", "perplexity", ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import data as data_lib
from llama_jax import sharding
from llama_jax.config import ModelConfig


def evaluate(eval_step, shard_batch, params, batches, num_bytes: int) -> dict[str, float]:
    """Run `eval_step` over `batches` (this process's rows of every eval batch, in order).

    eval_step: (params, global batch) -> {"nll_sum", "tokens"}; shard_batch: local batch -> global batch;
    num_bytes: UTF-8 bytes of the text the scored targets encode.
    """
    # Per-batch sums stay on device until the end (no host sync per batch), then add up in float64 on the
    # host: an f32 running sum would lose token counts past 2**24 and bits of the loss on big splits.
    per_batch = [eval_step(params, shard_batch(batch)) for batch in batches]
    per_batch = jax.device_get(per_batch)
    nll = float(np.sum([s["nll_sum"] for s in per_batch], dtype=np.float64))
    tokens = float(np.sum([s["tokens"] for s in per_batch], dtype=np.float64))
    if tokens == 0:
        raise ValueError("the evaluation split has no target tokens; check config.data.eval_split.")
    loss = nll / tokens
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(loss),
        "eval/bits_per_byte": nll / (num_bytes * math.log(2)),
        "eval/tokens": tokens,
        "eval/bytes": float(num_bytes),
    }


# ---------------------------------------------------------------------- sliding windows
@dataclasses.dataclass(frozen=True)
class Windows:
    """Eval rows over a token stream, one window per row. Window w has inputs stream[start : start + length]
    and targets stream[start + 1 : start + length + 1] in columns 0..length-1 (RoPE positions 0..length-1),
    and scores the targets in columns first_scored..length-1."""

    seq_len: int
    start: np.ndarray  # (W,) int64
    length: np.ndarray  # (W,) int64, 1..seq_len
    first_scored: np.ndarray  # (W,) int64, 0..length-1

    @property
    def num_windows(self) -> int:
        return len(self.start)


def window_layout(span_starts, span_ends, seq_len: int, stride: int | None = None) -> Windows:
    """Windows over spans [span_starts[i], span_ends[i]) of a token stream (module docstring).

    A span of n tokens has n - 1 targets, its tokens after the first. stride None (or 0): consecutive
    non-overlapping windows of up to seq_len targets (data.py's concat rows). stride S: the first window
    scores up to seq_len targets; window j >= 1 ends at target min(seq_len + j*S, n - 1), holds the seq_len
    inputs before it and scores only its targets not scored before (at most S).
    """
    if seq_len < 1:
        raise data_lib.DataError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and stride != 0 and not 0 < stride <= seq_len:
        raise data_lib.DataError(f"stride must satisfy 0 < stride <= seq_len={seq_len}, got {stride}")
    s0 = np.asarray(span_starts, np.int64)
    targets = np.maximum(np.asarray(span_ends, np.int64) - s0 - 1, 0)  # per span
    L = int(seq_len)
    if not stride:
        count = -(-targets // L)
    else:
        count = (targets > 0) + -(-np.maximum(targets - L, 0) // stride)
    span = np.repeat(np.arange(len(s0)), count)
    j = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # window index within its span
    t = targets[span]
    if not stride:
        start = s0[span] + j * L
        length = np.minimum(L, t - j * L)
        first = np.zeros_like(j)
    else:
        end = np.where(j == 0, np.minimum(L, t), np.minimum(L + j * stride, t))  # last target, span-relative
        prev_end = np.where(j == 0, 0, L + (j - 1) * stride)
        length = np.where(j == 0, end, L)
        start = s0[span] + end - length
        first = length - (end - prev_end)
    return Windows(L, start.astype(np.int64), length.astype(np.int64), first.astype(np.int64))


class WindowedEval:
    """Eval batches of `Windows` over an EvalData's token stream, with its scored targets and byte weights.

    Same interface as data.EvalData: `batches(rows=...)`, `batch_size`, `num_tokens`, `num_bytes`. Every
    target EvalData scores is scored by exactly one window (checked), so the totals are EvalData's.
    """

    def __init__(self, eval_data: data_lib.EvalData, windows: Windows, batch_size: int | None = None):
        self.stream, self.windows = eval_data.stream, windows
        self.scored, self.weights, self.pad_id = eval_data.scored, eval_data.weights, eval_data.pad_id
        self.batch_size = int(batch_size or eval_data.batch_size)
        self.seq_len = windows.seq_len
        n = len(self.stream.tokens)
        w = windows
        diff = np.zeros(n + 2, np.int64)
        np.add.at(diff, w.start + 1 + w.first_scored, 1)
        np.add.at(diff, w.start + 1 + w.length, -1)
        times = np.cumsum(diff[:n])  # how many windows score each stream position
        if times.max(initial=0) > 1 or np.any(self.scored & (times == 0)):
            raise AssertionError("windows do not score every target exactly once")  # a bug, not bad input
        self.num_tokens = int(self.scored[times == 1].sum())
        self.num_bytes = int(self.weights[self.scored & (times == 1)].sum())
        assert (self.num_tokens, self.num_bytes) == (eval_data.num_tokens, eval_data.num_bytes)

    @property
    def num_batches(self) -> int:
        return -(-self.windows.num_windows // self.batch_size)

    def batch(self, index: int, process_index=None, process_count=None, *, rows: slice | None = None) -> dict:
        """Eval batch `index` (this process's rows); rows past the last window are empty and masked."""
        sl = data_lib.local_rows(self.batch_size, process_index, process_count, rows)
        ids = index * self.batch_size + np.arange(sl.start, sl.stop)
        valid = ids < self.windows.num_windows
        w = np.where(valid, ids, 0)
        L = self.windows.seq_len
        col = np.arange(L)[None, :]  # [1, L]
        length = np.where(valid, self.windows.length[w], 0)[:, None]  # [b, 1]
        live = col < length  # [b, L]
        src = np.where(live, self.windows.start[w][:, None] + col, 0)  # stream index of each input
        tokens = self.stream.tokens
        mask = live & (col >= self.windows.first_scored[w][:, None]) & self.scored[src + 1]
        return {
            "inputs": np.where(live, tokens[src], self.pad_id).astype(np.int32),
            "targets": np.where(live, tokens[src + 1], self.pad_id).astype(np.int32),
            "loss_mask": mask.astype(np.float32),
            "segment_ids": live.astype(np.int32),
            "positions": np.where(live, col, 0).astype(np.int32),
            "target_bytes": np.where(mask, self.weights[src + 1], 0).astype(np.int32),
        }

    def batches(self, process_index=None, process_count=None, *, rows: slice | None = None) -> Iterator[dict]:
        """Every window once, in order."""
        for i in range(self.num_batches):
            yield self.batch(i, process_index, process_count, rows=rows)


def eval_windows(
    docs: data_lib.Documents,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    stride: int | None = None,
    packing: str = "concat",
    add_bos: bool = True,
    add_eos: bool = True,
) -> data_lib.EvalData | WindowedEval:
    """Eval data for `docs`: data.EvalData's rows without a stride, sliding `Windows` with one.

    Windows span the whole token stream with packing="concat" (attention crosses documents, as in concat
    training) and one document each with packing="packed".
    """
    ev = data_lib.EvalData.from_documents(
        docs, tokenizer, seq_len=seq_len, batch_size=batch_size, packing=packing, add_bos=add_bos, add_eos=add_eos
    )
    if ev.num_tokens == 0 or ev.num_bytes == 0:
        raise data_lib.DataError(f"{docs.name} has no text to score (empty, or shorter than two tokens).")
    if not stride:
        return ev
    ds = ev.stream.doc_starts
    if packing == "packed":
        starts, ends = ds[:-1], ds[1:]
    else:
        starts, ends = np.array([0]), np.array([len(ev.stream.tokens)])
    return WindowedEval(ev, window_layout(starts, ends, seq_len, stride), batch_size)


# ---------------------------------------------------------------------- scoring a model
def make_sharded_eval_step(model_config: ModelConfig, mesh: Mesh, rules: sharding.RuleSet, param_shardings):
    """train_step.make_eval_step jitted for params placed by `param_shardings` and batches split over the
    mesh's data x fsdp axes (what Trainer.eval_step is, without building an optimizer)."""
    from llama_jax.train_step import make_eval_step

    return jax.jit(
        make_eval_step(model_config, mesh, rules),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )


def perplexity(params, model_config: ModelConfig, eval_data, *, mesh: Mesh, rules: sharding.RuleSet) -> dict:
    """Score `eval_data` (data.EvalData or WindowedEval) with params placed on `mesh`.

    Returns {"loss" (nats per scored token), "perplexity", "bits_per_byte", "tokens", "bytes"}.
    """
    sharding.check_batch_fits_mesh(eval_data.batch_size, 1, mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    eval_step = make_sharded_eval_step(model_config, mesh, rules, param_shardings)
    rows = sharding.process_batch_slice(mesh, eval_data.batch_size)
    result = evaluate(
        eval_step,
        lambda b: sharding.shard_batch(b, mesh),
        params,
        eval_data.batches(rows=rows),
        eval_data.num_bytes,
    )
    out = {k.removeprefix("eval/"): v for k, v in result.items()}
    # The exact host-side counts (evaluate's are f32 sums, exact only up to 2**24).
    out["tokens"], out["bytes"] = int(eval_data.num_tokens), int(eval_data.num_bytes)
    return out


# ---------------------------------------------------------------------- a workdir on a dataset or a file
DEFAULT_MAX_SEQ_LEN = 2048  # the window when neither --seq_len nor the workdir's config gives one


def workdir_data_config(experiment: dict, tokenizer, overrides: dict | None = None, split: str | None = None):
    """The data config to evaluate on: defaults <- the workdir's config.data <- `overrides` (flat
    "FIELD" or "data.FIELD" keys) <- `split` (the TFDS eval_split). An imported workdir has no data config;
    it gets BOS/EOS only where its tokenizer has them."""
    from ml_collections import ConfigDict

    from llama_jax.defaults import base_config

    d = base_config().data.to_dict()
    if "data" in experiment:
        d.update(experiment["data"])
    else:
        d["add_bos"], d["add_eos"] = tokenizer.bos_id is not None, tokenizer.eos_id is not None
    d.update({k.removeprefix("data."): v for k, v in (overrides or {}).items()})
    if split:
        if d.get("train_files"):
            raise data_lib.DataError(
                "split (--split) names a TFDS split, but this data config reads local files (data.train_files); "
                "use a text file or data.eval_files instead."
            )
        d["eval_split"] = split
    return ConfigDict(d)


def text_file_documents(path: str) -> data_lib.Documents:
    """A UTF-8 text file as one document."""
    import os

    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise data_lib.DataError(f"text file {path} does not exist (relative paths start at {os.getcwd()}).")
    with open(full, encoding="utf-8") as f:
        return data_lib.Documents.from_texts([f.read()], name=f"file {path}")


def evaluate_workdir(
    workdir_path,
    *,
    text_file: str | None = None,
    split: str | None = None,
    data_overrides: dict | None = None,
    seq_len: int = 0,
    stride: int = 0,
    batch_size: int = 0,
    step: int | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Loss, perplexity and bits/byte of a workdir's model (what `experiments.eval_ppl` prints).

    Data: `text_file` (one document), else the held-out split of the workdir's config.data (with
    `data_overrides` and `split` applied; see workdir_data_config). seq_len 0: the workdir's seq_len, else
    min(max_seq_len, 2048). batch_size 0: the workdir's eval batch size (else one row per batch shard),
    rounded up to a multiple of the mesh's data*fsdp. mesh: default all devices, data parallel.
    """
    from llama_jax import checkpoint, workdir
    from llama_jax.config import ConfigError

    docs = text_file_documents(text_file) if text_file else None  # a missing file fails before any loading
    mesh = workdir.inference_mesh(data=-1) if mesh is None else mesh
    model_config, params, tokenizer, experiment = workdir.load_workdir(workdir_path, mesh, step=step)
    d = workdir_data_config(experiment, tokenizer, data_overrides, split)
    seq_len = seq_len or int(experiment.get("seq_len", 0)) or min(model_config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}.")
    shards = sharding.batch_shards(mesh)
    if not batch_size:
        batch_size = int(d.get("eval_batch_size", 0) or experiment.get("batch_size", 0) or shards)
        batch_size = -(-batch_size // shards) * shards
    docs = docs or data_lib.documents_for_role(d, "eval")
    eval_data = eval_windows(
        docs, tokenizer, seq_len=seq_len, batch_size=batch_size, stride=stride or None,
        packing=d.packing, add_bos=d.add_bos, add_eos=d.add_eos,
    )
    result = perplexity(params, model_config, eval_data, mesh=mesh, rules=workdir.workdir_rules(experiment))
    result.update(
        data=docs.name, seq_len=seq_len, stride=stride, packing=d.packing, batch_size=batch_size,
        step=checkpoint.latest_step(workdir_path) if step is None else step,
    )
    return result
