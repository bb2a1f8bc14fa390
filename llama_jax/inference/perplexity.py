"""Held-out evaluation: every target token scored once; loss, perplexity and bits-per-byte.

bits/byte = (total NLL in nats) / (UTF-8 bytes of the scored text * ln 2). Unlike per-token loss it does
not depend on the tokenizer, so byte-level and BPE models are compared on one scale.

Which tokens are scored, and the bytes they carry, are llama_jax.data's conventions (its docstring, "Held-out
eval"): documents are tokenized `[BOS] ids [EOS]`, every stream token is a target except the first of the
stream (concat) or of each document (packed), BOS targets are never scored, and a document's UTF-8 bytes
sit on its last token. So with BOS/EOS and the byte tokenizer a text of n bytes scores n + 1 tokens (its
bytes and the EOS) and carries exactly n bytes.

Sliding windows (`--stride`): llama_jax/data/eval_data.py.

    model_config, params, tokenizer, config = load_workdir(DIR, mesh)
    data = eval_windows(docs, tokenizer, seq_len=2048, batch_size=8, stride=512)
    perplexity(params, model_config, data, mesh=mesh, rules=rules)  # {"loss", "perplexity", ...}
"""

from __future__ import annotations

import logging
import math
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from llama_jax import checkpoint, distributed, sharding
from llama_jax.data import DataConfig, eval_windows, held_out_documents, text_file_documents
from llama_jax.errors import ConfigError, DataError
from llama_jax.inference.exact_match import ExactMatch
from llama_jax.inference.load import inference_mesh, load_workdir, workdir_rules
from llama_jax.model import Llama, ModelConfig, batch_loss_sums, for_platform

log = logging.getLogger(__name__)

_MAX_EXP_ARG = math.log(sys.float_info.max)


def evaluate(
    eval_step, shard_batch, params, batches, num_bytes: int, *, progress: bool = False,
    num_batches: int | None = None, desc: str = "eval",
) -> dict[str, float]:
    """Run `eval_step` over `batches` (this process's rows of every eval batch, in order).

    eval_step: (params, global batch) -> {"nll_sum", "tokens"}; shard_batch: local batch -> global batch;
    num_bytes: UTF-8 bytes of the text the scored targets encode. progress: a tqdm bar over the batches on
    stderr (main process; in a log file a line a minute) labelled `desc`, with an ETA when `num_batches` is
    given.
    """
    # Per-batch sums stay on device until the end (no transfer per batch), then add up in float64 on the
    # host: an f32 running sum would lose token counts past 2**24 and bits of the loss on big splits.
    bar = _progress_bar(num_batches, desc) if progress and distributed.is_main_process() else None
    per_batch = []
    for batch in batches:
        per_batch.append(eval_step(params, shard_batch(batch)))
        if bar is not None and len(per_batch) > 1:
            # Dispatch is asynchronous: without a sync the bar would race to the end and then wait. Waiting
            # for the previous batch keeps the bar at device speed and still one batch in flight.
            jax.block_until_ready(per_batch[-2])
            bar.update(1)
    per_batch = jax.device_get(per_batch)
    if bar is not None:
        bar.update(len(per_batch) - bar.n)
        bar.close()
    nll = float(np.sum([s["nll_sum"] for s in per_batch], dtype=np.float64))
    tokens = float(np.sum([s["tokens"] for s in per_batch], dtype=np.float64))
    if tokens == 0:
        raise DataError("the evaluation split has no target tokens; check config.data.eval_split.")
    loss = nll / tokens
    return {
        "eval/loss": loss,
        # exp overflows past a loss of ~709.8 nats (a diverged model); perplexity is then inf, not a crash.
        "eval/perplexity": math.exp(loss) if loss < _MAX_EXP_ARG else math.inf,
        "eval/bits_per_byte": nll / (num_bytes * math.log(2)),
        "eval/tokens": tokens,
        "eval/bytes": float(num_bytes),
    }


def combine(results: dict[str, dict[str, float]], prefix: str = "eval/") -> dict[str, float]:
    """Several held-out sets' results -> per-set keys (`eval/<name>/loss`, ...), their total (`eval/loss`:
    nats per token over all sets' tokens; bits/byte over all their bytes) and their mean (`eval/mean/loss`,
    `eval/mean/bits_per_byte`: each set counts once whatever its size, as Paloma averages its domains, so a
    big set does not drown the small ones). One set: its keys unchanged."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    out, nll, tokens, nbytes = {}, 0.0, 0, 0  # counts stay ints (exact, printed as counts) when each set's are
    for name, r in results.items():
        out.update({f"{prefix}{name}/{k.removeprefix(prefix)}": v for k, v in r.items()})
        nll += r[f"{prefix}loss"] * r[f"{prefix}tokens"]
        tokens += r[f"{prefix}tokens"]
        nbytes += r[f"{prefix}bytes"]
    loss = nll / tokens
    out.update({
        f"{prefix}loss": loss,
        f"{prefix}perplexity": math.exp(loss) if loss < _MAX_EXP_ARG else math.inf,
        f"{prefix}bits_per_byte": nll / (nbytes * math.log(2)),
        f"{prefix}tokens": tokens,
        f"{prefix}bytes": nbytes,
    })
    for k in ("loss", "bits_per_byte"):
        out[f"{prefix}mean/{k}"] = math.fsum(r[prefix + k] for r in results.values()) / len(results)
    return out


def response_metrics(result: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The loss, perplexity and bits/byte of `result` again as response_loss, response_perplexity,
    response_bits_per_byte: what an SFT evaluation with data.loss_on="responses" scores (its held-out
    completions / assistant turns, never prompts), named so in metrics.jsonl, TensorBoard and eval_ppl."""
    return {f"{prefix}response_{k}": result[prefix + k] for k in ("loss", "perplexity", "bits_per_byte")}


def _progress_bar(total: int | None, desc: str) -> tqdm:
    # As the train loop's bar (hooks.Progress): every second on a terminal, once a minute in a log file.
    interval = 1.0 if sys.stderr.isatty() else 60.0
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=interval)


# ---------------------------------------------------------------------- scoring a model
def make_eval_step(model_config: ModelConfig, mesh: Mesh, rules: sharding.RuleSet):
    """The pure eval step: (params, batch) -> {"nll_sum", "tokens"}, summed over the global batch.

    Sums rather than means so that an eval loop can add batches of any size and divide once.
    """
    model = Llama(for_platform(model_config, sharding.mesh_platform(mesh)))

    def eval_step(params, batch):
        with sharding.activation_context(mesh, rules.activations):
            sums = batch_loss_sums(model, params, batch)
        return {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}

    return eval_step


def jit_eval_step(model_config: ModelConfig, mesh: Mesh, rules: sharding.RuleSet, param_shardings):
    """`make_eval_step` jitted for params placed by `param_shardings` and batches split over the mesh's
    data x fsdp axes (TrainProgram.eval_step, and what `perplexity` runs)."""
    return jax.jit(
        make_eval_step(model_config, mesh, rules),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )


def perplexity(
    params, model_config: ModelConfig, eval_data, *, mesh: Mesh, rules: sharding.RuleSet, progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Score `eval_data` (a data.EvalData) with params placed on `mesh`; `progress`: a bar over the batches,
    labelled `desc`.

    Returns {"loss" (nats per scored token), "perplexity", "bits_per_byte", "tokens", "bytes"}.
    """
    sharding.check_batch_fits_mesh(eval_data.batch_size, 1, mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    eval_step = jit_eval_step(model_config, mesh, rules, param_shardings)
    rows = sharding.process_batch_slice(mesh, eval_data.batch_size)
    result = evaluate(
        eval_step,
        lambda b: sharding.shard_batch(b, mesh),
        params,
        eval_data.batches(rows=rows),
        eval_data.num_bytes,
        progress=progress,
        num_batches=eval_data.num_batches,
        desc=desc,
    )
    out = {k.removeprefix("eval/"): v for k, v in result.items()}
    # The exact host-side counts (evaluate's are f32 sums, exact only up to 2**24).
    out["tokens"], out["bytes"] = int(eval_data.num_tokens), int(eval_data.num_bytes)
    return out


# ---------------------------------------------------------------------- a workdir on a dataset or a file
DEFAULT_MAX_SEQ_LEN = 2048  # the window when neither --seq_len nor the workdir's config gives one


def workdir_data_config(
    experiment: dict, tokenizer, overrides: dict | None = None, split: str | None = None,
    set_files: dict[str, str] | None = None,
) -> DataConfig:
    """The data config to evaluate on: the workdir's config.data <- `overrides` (flat "FIELD" or
    "data.FIELD" keys) <- `split` (the TFDS eval_split) <- `set_files` ({name: globs}, more held-out sets,
    as data.eval_sets entries). An imported workdir has no data config; it gets DataConfig's defaults, with
    BOS/EOS only where its tokenizer has them."""
    if "data" in experiment:
        d = dict(experiment["data"])
    else:
        d = {"add_bos": tokenizer.bos_id is not None, "add_eos": tokenizer.eos_id is not None}
    d.update({k.removeprefix("data."): v for k, v in (overrides or {}).items()})
    if split:
        if d.get("train_files"):
            raise DataError(
                "split (--split) names a TFDS split, but this data config reads local files (data.train_files); "
                "use a text file or data.eval_files instead."
            )
        d["eval_split"] = split
    if set_files:
        d["eval_sets"] = {**d.get("eval_sets", {}), **{name: {"files": g} for name, g in set_files.items()}}
    return DataConfig.from_dict(d)


def evaluate_workdir(
    workdir_path,
    *,
    text_file: str | None = None,
    split: str | None = None,
    data_overrides: dict | None = None,
    sets: list[str] | None = None,
    set_files: dict[str, str] | None = None,
    seq_len: int = 0,
    stride: int = 0,
    batch_size: int = 0,
    step: int | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Loss, perplexity and bits/byte of a workdir's model (what `experiments.eval_ppl` prints).

    Data: `text_file` (one document), else every held-out set of the workdir's config.data (each source's
    and each data.eval_sets entry; with `data_overrides` and `split` applied, see workdir_data_config), plus
    `set_files` ({name: globs}), or only the sets `sets` names. seq_len 0: the workdir's seq_len, else
    min(max_seq_len, 2048). batch_size 0: the workdir's eval batch size (else one row per batch shard),
    rounded up to a multiple of the mesh's data*fsdp. mesh: default all devices, data parallel. Shows a
    progress bar over the eval batches on stderr (main process).

    Several sets: the result holds their total (see `combine`), eval_ppl's flat `NAME/loss`... keys and
    `mean/loss`, `mean/bits_per_byte`, and "sets": {name: {"data", "documents", "loss", ...}}.
    """
    docs = text_file_documents(text_file) if text_file else None  # a missing file fails before any loading
    mesh = inference_mesh(data=-1) if mesh is None else mesh
    model_config, params, tokenizer, experiment = load_workdir(workdir_path, mesh, step=step)
    d = workdir_data_config(experiment, tokenizer, data_overrides, split, set_files)
    defaulted = not seq_len and not experiment.get("seq_len")  # an imported workdir: nothing to go by
    seq_len = seq_len or int(experiment.get("seq_len", 0)) or min(model_config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    if seq_len > model_config.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}.")
    shards = sharding.batch_shards(mesh)
    if not batch_size:
        batch_size = int(d.eval_batch_size or experiment.get("batch_size", 0) or shards)
        batch_size = -(-batch_size // shards) * shards
    if defaulted:
        # Perplexity depends on the window (more context, lower loss): say which one this number is for.
        log.warning("%s records no training seq_len (an imported checkpoint): scoring windows of seq_len=%d "
                    "(min(max_seq_len, %d)) in batches of %d; pass --seq_len=N to compare with an evaluation "
                    "at another length.", workdir_path, seq_len, DEFAULT_MAX_SEQ_LEN, batch_size)
    if sets:  # the named sets, and the ad-hoc ones given beside them
        sets = [*sets, *(n for n in set_files or {} if n not in sets)]
    named = {"text_file": docs} if docs is not None else held_out_documents(d, sets)
    results, names = {}, {}
    for name, set_docs in named.items():
        eval_data = eval_windows(set_docs, tokenizer, d, seq_len=seq_len, batch_size=batch_size, stride=stride)
        # A long text takes minutes: show a bar (the train loop's eval hook does not; it has its own bar).
        r = perplexity(params, model_config, eval_data, mesh=mesh, rules=workdir_rules(experiment), progress=True,
                       desc="eval" if len(named) == 1 else f"eval {name}")
        results[name] = {f"eval/{k}": v for k, v in r.items()}
        names[name] = set_docs.name
    result = {k.removeprefix("eval/"): v for k, v in combine(results).items()}
    result["documents"] = sum(len(docs) for docs in named.values())
    if len(results) > 1:  # several held-out sets: each, and their total and mean above
        result["sets"] = {n: {"data": names[n], "documents": len(named[n]),
                              **{k.removeprefix("eval/"): v for k, v in r.items()}} for n, r in results.items()}
    if d.format == "sft" and d.loss_on == "responses" and not text_file:
        result.update(response_metrics(result))  # only held-out responses were scored: say so by name
    if d.exact_match_records and not text_file:
        exact = ExactMatch.from_config(d, tokenizer, max_seq_len=model_config.max_seq_len, experiment=experiment)
        scores = exact(params, model_config, batch_size=batch_size)
        result.update({k.removeprefix("eval/"): v for k, v in scores.items()})
    result.update(
        data=" + ".join(names.values()), seq_len=seq_len, stride=stride, packing=d.packing, batch_size=batch_size,
        step=checkpoint.latest_step(workdir_path) if step is None else step,
    )
    return result
