"""Using a trained or imported workdir: load it onto a mesh, sample from it, score held-out text, run
lm-evaluation-harness tasks (HarnessLM, run_tasks, metrics_of: imported on first use, so that lm_eval, an
optional extra, is needed only by whoever uses them)."""

from llama_jax import _lazy
from llama_jax.inference.load import (
    inference_mesh,
    load_chat_template,
    load_tokenizer_of,
    load_workdir,
    param_shardings,
    workdir_rules,
)
from llama_jax.inference.perplexity import (
    combine,
    evaluate,
    evaluate_workdir,
    jit_eval_step,
    make_eval_step,
    perplexity,
    workdir_data_config,
)
from llama_jax.inference.sampling import (
    chat_reply,
    chat_stops,
    check_messages,
    encode_chat_prompt,
    generate,
    sample_logits,
    sample_text,
    top_p_mask,
)

__getattr__, __dir__ = _lazy.exports(
    __name__, {"HarnessLM": "harness", "metrics_of": "harness", "results_json": "harness", "run_tasks": "harness"}
)

__all__ = [
    "HarnessLM",
    "chat_reply",
    "chat_stops",
    "check_messages",
    "combine",
    "encode_chat_prompt",
    "evaluate",
    "evaluate_workdir",
    "generate",
    "inference_mesh",
    "jit_eval_step",
    "load_chat_template",
    "load_tokenizer_of",
    "load_workdir",
    "make_eval_step",
    "metrics_of",
    "param_shardings",
    "perplexity",
    "results_json",
    "run_tasks",
    "sample_logits",
    "sample_text",
    "top_p_mask",
    "workdir_data_config",
    "workdir_rules",
]
