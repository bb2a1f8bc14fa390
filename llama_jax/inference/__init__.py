"""Using a trained or imported workdir: load it onto a mesh, sample from it, score held-out text."""

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

__all__ = [
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
    "param_shardings",
    "perplexity",
    "sample_logits",
    "sample_text",
    "top_p_mask",
    "workdir_data_config",
    "workdir_rules",
]
