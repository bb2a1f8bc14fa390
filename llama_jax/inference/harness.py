"""lm-evaluation-harness (lm_eval 0.4.x, `pip install -e ".[eval]"`) on a workdir's model, sharded on a mesh.

    lm = HarnessLM.from_workdir(DIR, mesh=mesh)
    results = run_tasks(lm, ["llama_jax_tiny_mc"], num_fewshot=0)   # process 0: lm_eval's results dict

All three request types run on the sharded params:
  loglikelihood          (context, continuation) token pairs packed into fixed-shape rows with segment ids
                         (several requests per row, attention never crosses them, padding is never
                         scored), so one compiled step serves a whole task; only continuation tokens are
                         scored. Rows are the smallest power of two (>= MIN_ROW) that holds the longest
                         request, and a step holds batch_size * max_length tokens. A context too long for max_length is left-truncated as lm_eval's `hf`
                         backend does.
  loglikelihood_rolling  the perplexity machinery's disjoint windows (llama_jax.data.eval_windows, what
                         eval_ppl scores) over each text, with the workdir's data options but no EOS (lm_eval
                         scores the text alone): it equals eval_ppl --config.data.add_eos=False on the same
                         text and window length. It matches lm_eval's `hf` backend only when the text fits
                         one window (hf's windows overlap by one token of context; these restart), and only
                         when BOS is the tokenizer's prefix token.
  generate_until         the jitted sampler (sampling.generate), greedy unless the task sets do_sample,
                         stopping at EOS, cut at the task's `until` strings (applied to the text afterwards:
                         the sampler stops on token ids) and capped at max_gen_toks.

Token conventions follow lm_eval's `hf` backend, so its scores are ours: contexts are encoded without BOS
unless `add_bos` (default: the workdir's data.add_bos when it was trained here, False for an imported model,
as hf's add_bos_token), and an empty context is the prefix token (BOS, else EOS).

Several processes (a pod): process 0 drives lm_eval; every other process runs `follow()`, receiving each
batch process 0 computes (multihost_utils.broadcast_one_to_all) and computing it alongside, until process 0's
`close()`. `run_tasks` does both. lm_eval is imported only here, so importing llama_jax.inference (and
training without eval_tasks) works without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.data import Documents, eval_windows
from llama_jax.errors import ConfigError, DataError
from llama_jax.inference.load import inference_mesh, load_workdir, workdir_rules
from llama_jax.inference.perplexity import workdir_data_config
from llama_jax.inference.sampling import continuation_text, cut_at, generate, stop_ids, truncate_at
from llama_jax.model import Llama, ModelConfig, for_platform

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # the optional extra: one line naming the fix
    raise ConfigError('lm-evaluation-harness is not installed: pip install -e ".[eval]" (lm_eval 0.4.x).') from e

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # the context limit when the model allows it (lm_eval's hf backend's default too)
# Shortest packed row: loglikelihood rows are the smallest power of two >= the longest request (at least this,
# at most max_length), since attention over a row costs its length per token even where segments mask it.
MIN_ROW = 128
# Messages from process 0 to the followers: a fixed-size int header, then the arrays it announces.
_STOP, _SCORE, _GENERATE = 0, 1, 2
_HEADER = 8
_SCORE_KEYS = ("inputs", "targets", "positions", "segment_ids")


# ---------------------------------------------------------------------- packing
def pack(lengths: Sequence[int], row_len: int) -> list[tuple[int, int]]:
    """(row, column) of each piece of `lengths` (each <= row_len) packed into rows of `row_len`: first fit
    decreasing (longest first, each into the first row with room), within 22% of the fewest rows possible."""
    free = np.zeros(0, np.int64)  # [rows]: room left in each row
    out: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        fits = np.flatnonzero(free >= lengths[i])
        row = int(fits[0]) if len(fits) else len(free)
        if row == len(free):
            free = np.append(free, row_len)
        out[i] = (row, row_len - int(free[row]))
        free[row] -= lengths[i]
    return out


def request_tokens(context: Sequence[int], continuation: Sequence[int], max_length: int):
    """(inputs, targets) of one request, left-truncated to max_length as lm_eval's hf backend does; the last
    len(continuation) targets are the continuation."""
    whole = list(context) + list(continuation)
    if not continuation:
        raise DataError("a loglikelihood request has an empty continuation: nothing to score.")
    if len(continuation) > max_length:
        raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}; raise "
                          "--max_length (up to the model's max_seq_len).")
    whole = whole[-(max_length + 1):]
    return whole[:-1], whole[1:]


def empty_rows(batch: int, row_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((batch, row_len), np.int32) for k in _SCORE_KEYS}


# ---------------------------------------------------------------------- the adapter
class HarnessLM(TemplateLM):
    """lm_eval's LM over a llama_jax model: params placed on `mesh`, one jitted scoring step."""

    def __init__(self, params, model_config: ModelConfig, tokenizer, *, mesh: Mesh, rules: sharding.RuleSet,
                 experiment: dict | None = None, batch_size: int = 8, max_length: int = 0,
                 add_bos: bool | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.params, self.model_config, self.tokenizer, self.mesh = params, model_config, tokenizer, mesh
        self.experiment = experiment or {}
        self.max_length = max_length or min(model_config.max_seq_len, DEFAULT_MAX_LENGTH)
        if self.max_length > model_config.max_seq_len:
            raise ConfigError(f"max_length={self.max_length} exceeds the model's max_seq_len="
                              f"{model_config.max_seq_len}; lower --max_length.")
        self._shards = sharding.batch_shards(mesh)
        self.batch_size = max(int(batch_size), 1)  # rows of max_length per step: the step's token budget
        self.add_bos = bool(self.experiment.get("data", {}).get("add_bos", False)) if add_bos is None else add_bos
        self.max_gen_toks = max_gen_toks
        self.stops = stop_ids(tokenizer, self.experiment)
        if not self.stops:
            raise ConfigError("the tokenizer has no EOS token, which lm_eval needs (end of text, the empty-context "
                              "prefix); use a tokenizer with one.")
        self.traces = 0  # how often the scoring step was traced (compiled): once per row shape
        self._score = self._jit_score(rules)
        self._multi = jax.process_count() > 1

    @classmethod
    def from_workdir(cls, workdir, *, mesh: Mesh | None = None, step: int | None = None, **kw) -> HarnessLM:
        """The adapter over a workdir (trained or imported), params on `mesh` (default: every device, data
        parallel); keyword arguments as __init__'s."""
        mesh = inference_mesh(data=-1) if mesh is None else mesh
        model_config, params, tokenizer, experiment = load_workdir(workdir, mesh, step=step)
        return cls(params, model_config, tokenizer, mesh=mesh, rules=workdir_rules(experiment),
                   experiment=experiment, **kw)

    def _jit_score(self, rules):
        model = Llama(for_platform(self.model_config, sharding.mesh_platform(self.mesh)))
        mesh = self.mesh

        def score(params, batch):
            self.traces += 1  # runs only while tracing
            with sharding.activation_context(mesh, rules.activations):
                logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"])  # [batch, seq, vocab]
            logits = logits.astype(jnp.float32)
            target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]  # [batch, seq]
            logprob = target - jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
            greedy = jnp.argmax(logits, axis=-1) == batch["targets"]  # [batch, seq]
            return logprob, greedy

        param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        return jax.jit(score, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                       out_shardings=NamedSharding(mesh, P()))

    # ------------------------------------------------------------------ what lm_eval asks of a TemplateLM
    @property
    def eot_token_id(self) -> int:
        return self.stops[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.fingerprint()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        return [self.tokenizer.bos_id, *ids] if bos and self.tokenizer.bos_id is not None else ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pieces = [request_tokens(ctx, cont, self.max_length) for _, ctx, cont in requests]
        longest = max((len(inp) for inp, _ in pieces), default=1)
        row_len = min(self.max_length, max(MIN_ROW, 1 << (longest - 1).bit_length()))
        where = pack([len(inp) for inp, _ in pieces], row_len)
        num_rows = max(r for r, _ in where) + 1 if where else 0
        rows = empty_rows(num_rows, row_len)
        for i, ((inp, tgt), (r, c)) in enumerate(zip(pieces, where)):
            n = len(inp)
            rows["inputs"][r, c:c + n], rows["targets"][r, c:c + n] = inp, tgt
            rows["positions"][r, c:c + n] = np.arange(n)
            rows["segment_ids"][r, c:c + n] = i + 1  # distinct per row: only the same request attends to itself
        logprob, greedy = self._score_rows(rows)
        out = []
        for (inp, _), (r, c), (_, _, cont) in zip(pieces, where, requests):
            end = c + len(inp)  # the continuation is the last len(cont) targets of the piece
            span = slice(end - len(cont), end)
            out.append((float(np.sum(logprob[r, span], dtype=np.float64)), bool(np.all(greedy[r, span]))))
            self.cache_hook.add_partial("loglikelihood", requests[len(out) - 1][0], out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        options = workdir_data_config(self.experiment, self.tokenizer, {"add_eos": False})
        out = []
        for (text,) in [req.args for req in requests]:
            try:
                ev = eval_windows(Documents.from_texts([text]), self.tokenizer, options, seq_len=self.max_length,
                                  batch_size=self._shards)
            except DataError:  # no target: the empty text has log-likelihood 0
                out.append(0.0)
                continue
            rows = {k: np.concatenate([b[k] for b in ev.batches()]) for k in (*_SCORE_KEYS, "loss_mask")}
            mask = rows.pop("loss_mask").astype(bool)
            logprob, _ = self._score_rows({k: v.astype(np.int32) for k, v in rows.items()})
            out.append(float(np.sum(logprob[mask], dtype=np.float64)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in [req.args for req in requests]:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            new = truncate_at(self._generate(prompt, max_new, temperature), self.stops)
            out.append(cut_at(continuation_text(self.tokenizer, prompt, new), until))
            self.cache_hook.add_partial("generate_until", (context, kwargs), out[-1])
        return out

    # ------------------------------------------------------------------ the computations (every process)
    def _score_rows(self, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-position (target logprob, is greedy) of `rows` [n, width], in steps of a fixed number of rows:
        batch_size * max_length tokens, a multiple of the mesh's batch shards (one compile per width)."""
        (n, width), per_step = rows["inputs"].shape, self.rows_per_step(rows["inputs"].shape[1])
        logprob, greedy = np.zeros((n, width), np.float32), np.zeros((n, width), bool)
        for lo in range(0, n, per_step):
            batch = empty_rows(per_step, width)
            for k in _SCORE_KEYS:
                part = rows[k][lo:lo + per_step]
                batch[k][:len(part)] = part
            lp, g = self._step(batch)
            logprob[lo:lo + per_step], greedy[lo:lo + per_step] = lp[:n - lo], g[:n - lo]
        return logprob, greedy

    def rows_per_step(self, width: int) -> int:
        rows = max(self.batch_size * self.max_length // width, 1)
        return -(-rows // self._shards) * self._shards

    def _step(self, batch: dict[str, np.ndarray]):
        if self._multi:
            self._send(_SCORE, *batch["inputs"].shape)
            batch = multihost_utils.broadcast_one_to_all(batch)
        return self._run_step(batch)

    def _run_step(self, batch: dict[str, np.ndarray]):
        mine = sharding.process_batch_slice(self.mesh, len(batch["inputs"]))
        local = {k: np.asarray(v)[mine] for k, v in batch.items()}
        return jax.device_get(self._score(self.params, sharding.shard_batch(local, self.mesh)))

    def _generate(self, prompt: list[int], max_new: int, temperature: float) -> list[int]:
        if self._multi:
            self._send(_GENERATE, len(prompt), max_new, int(temperature * 1e6))
            prompt = multihost_utils.broadcast_one_to_all(np.asarray(prompt, np.int32)).tolist()
        return generate(self.params, self.model_config, [prompt], max_new_tokens=max_new,
                        temperature=temperature, eos_id=self.stops)[0]

    def _send(self, *header: int) -> None:
        multihost_utils.broadcast_one_to_all(np.array([*header, *[0] * (_HEADER - len(header))], np.int32))

    def follow(self) -> None:
        """On a process other than 0: compute what process 0 computes, until its close()."""
        while True:
            header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.int32)).tolist()
            if header[0] == _STOP:
                return
            if header[0] == _SCORE:
                self._run_step(multihost_utils.broadcast_one_to_all(empty_rows(header[1], header[2])))
            else:
                prompt = multihost_utils.broadcast_one_to_all(np.zeros(header[1], np.int32)).tolist()
                generate(self.params, self.model_config, [prompt], max_new_tokens=header[2],
                         temperature=header[3] / 1e6, eos_id=self.stops)

    def close(self) -> None:
        """On process 0: end the followers' loops."""
        if self._multi:
            self._send(_STOP)


# ---------------------------------------------------------------------- running tasks
def tasks_dir() -> str:
    """The shipped task YAMLs (llama_jax/inference/tasks): the offline tiny tasks and *_local variants."""
    import pathlib

    return str(pathlib.Path(__file__).parent / "tasks")


def run_tasks(lm: HarnessLM, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
              include_path: str | None = None, data_dir: str | None = None) -> dict[str, Any] | None:
    """lm_eval's simple_evaluate of `tasks` on process 0 (its results dict), `lm.follow()` on the others
    (None). The shipped tasks and `include_path`'s are known by name; `data_dir` is where the shipped
    *_local tasks read their files."""
    if jax.process_index() != 0:
        lm.follow()
        return None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [tasks_dir(), *([include_path] if include_path else [])]
    try:
        manager = TaskManager(include_path=paths, metadata={"data_dir": data_dir} if data_dir else None)
        missing = [t for t in tasks if not manager.match_tasks([t])]
        if missing:
            raise ConfigError(f"unknown lm_eval task(s) {missing}; `python -m lm_eval ls tasks` lists lm_eval's, "
                              f"and {tasks_dir()} holds the shipped offline ones.")
        return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                               task_manager=manager, log_samples=False)
    except FileNotFoundError as e:  # a *_local task's files (tasks/utils.py says where they belong)
        raise DataError(str(e)) from e
    except (ConnectionError, OSError) as e:
        raise DataError(download_hint(tasks, e)) from e
    finally:
        lm.close()


def download_hint(tasks: Sequence[str], error: Exception) -> str:
    """The one line for a task whose dataset could not be downloaded: the *_local variants, or the HF cache."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"task(s) {', '.join(tasks)} could not download their data ({first}); offline, run a shipped *_local "
            "variant (hellaswag_local, arc_easy_local) with its files in --task_data_dir (README.md, \"Downstream "
            "tasks\", says which), or copy a Hugging Face datasets cache here and set HF_DATASETS_OFFLINE=1.")


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """lm_eval's results as flat scalars `lm_eval/<task>/<metric>` (a non-default filter appended:
    `exact_match_strict-match`); what the train loop's hook logs and the CLI's JSON holds."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name, filt = key.split(",", 1)
            out[f"lm_eval/{task}/{name if filt == 'none' else f'{name}_{filt}'}"] = float(value)
    return out


def results_json(results: dict[str, Any]) -> str:
    """The JSON of lm_eval's results (configs and versions included; values it cannot encode as strings)."""
    keep = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples") if k in results}
    return json.dumps(keep, indent=1, default=str)
