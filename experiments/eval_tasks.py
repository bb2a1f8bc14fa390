"""Downstream tasks of lm-evaluation-harness (lm_eval 0.4.x, `pip install -e ".[eval]"`) on a workdir's model.

    # the shipped offline tasks (llama_jax/inference/tasks: multiple choice, perplexity, generation)
    python -m experiments.eval_tasks --workdir=DIR --tasks=llama_jax_tiny_mc,llama_jax_tiny_ppl
    # lm_eval's own tasks (their datasets download from the Hugging Face Hub), 5-shot, 200 documents each
    python -m experiments.eval_tasks --workdir=DIR --tasks=hellaswag,arc_easy --num_fewshot=5 --limit=200
    # offline: the *_local variants read the task's files from --task_data_dir
    python -m experiments.eval_tasks --workdir=DIR --tasks=arc_easy_local --task_data_dir=TASK_DATA_DIR

Prints lm_eval's table and writes its results as JSON (--output, default DIR/lm_eval.json); the last line
is JSON of the scalars, `lm_eval/<task>/<metric>`. A task whose data cannot be downloaded fails with one line
naming its *_local variant. Params are data-parallel over all devices by default (--mesh_fsdp /
--mesh_tensor shard them); on several processes, process 0 drives lm_eval and the others follow. The logic
is llama_jax.inference.harness; this file only parses flags.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from experiments import cli
from llama_jax import distributed
from llama_jax.train.metrics import json_line

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to evaluate (from training or convert_hf).", required=True)
_TASKS = flags.DEFINE_list("tasks", None, "lm_eval task names, comma-separated.", required=True)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
_LIMIT = flags.DEFINE_integer("limit", None, "Documents per task (default: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Tokens per scoring step, in rows of max_length "
                                  "(loglikelihood packs shorter rows: more of them).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Row length and context limit in tokens (default: "
                                   "min(max_seq_len, 2048)); longer contexts are left-truncated.")
_TASK_DATA_DIR = flags.DEFINE_string("task_data_dir", None, "Directory the *_local tasks read their files from.")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "Directory of more task YAMLs (lm_eval's include_path).")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON path (default: WORKDIR/lm_eval.json).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    logging.getLogger().setLevel(logging.WARNING)
    distributed.maybe_initialize_distributed()
    from llama_jax.inference import HarnessLM, metrics_of, results_json, run_tasks

    lm = HarnessLM.from_workdir(_WORKDIR.value, mesh=cli.mesh(default_data=-1), step=_STEP.value,
                                batch_size=_BATCH_SIZE.value, max_length=_MAX_LENGTH.value)
    results = run_tasks(lm, _TASKS.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
                        include_path=_INCLUDE_PATH.value, data_dir=_TASK_DATA_DIR.value)
    if distributed.is_main_process():
        from lm_eval.utils import make_table

        print(make_table(results))
        output = _OUTPUT.value or os.path.join(_WORKDIR.value, "lm_eval.json")
        with open(output, "w", encoding="utf-8") as f:
            f.write(results_json(results))
        print(json_line({**metrics_of(results), "output": output}), flush=True)


if __name__ == "__main__":
    cli.run(main)
