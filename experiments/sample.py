"""Continue a prompt with a workdir's model, or answer a chat.

    python -m experiments.sample --workdir=DIR --prompt="ROMEO:" --max_new_tokens=200
    python -m experiments.sample --workdir=DIR --prompt="ROMEO:" --temperature=0          # greedy
    python -m experiments.sample --workdir=DIR --prompt="..." --temperature=0.8 --top_k=50 --top_p=0.95 --seed=1
    python -m experiments.sample --workdir=DIR --prompt="..." --mesh_tensor=8             # shard a big model
    # chat: one user turn, or a conversation (a JSON list of {"role", "content"}), with DIR's chat template
    python -m experiments.sample --workdir=DIR --chat --prompt="What is the capital of France?" --temperature=0
    python -m experiments.sample --workdir=DIR --messages=conversation.json --chat_template=chatml

Prints the prompt followed by the continuation (stdout; logs go to stderr). The prompt is encoded with
the tokenizer's BOS first (when it has one); generation stops at EOS (also at any `eos_token_id` of an
imported HF model's config) or after --max_new_tokens. DIR may come from training or from
`experiments.convert_hf`. Params are restored on one device by default; --mesh_data / --mesh_fsdp /
--mesh_tensor spread them over that many devices by the workdir's sharding rules. The KV cache is sized
by prompt + max_new_tokens, never by the model's max_seq_len.

Chat (--chat or --messages): the messages are rendered with DIR's chat template (DIR/tokenizer's
chat_template.jinja or tokenizer_config.json's, as convert_hf copies it and training writes it) or
--chat_template (a name in llama_jax.data.chat.TEMPLATES, or a .jinja file) with add_generation_prompt=True,
exactly as transformers' apply_chat_template; generation stops at the template's end-of-turn token
(<|im_end|>, <|eot_id|>, ...) as well as EOS, and only the assistant's reply is printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags

from experiments import cli
from llama_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir (from training or convert_hf).", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (may be empty: then only BOS is the prompt); "
                              "with --chat, the user's message.")
_CHAT = flags.DEFINE_bool("chat", False, "Treat --prompt as one user turn of a chat (the workdir's template).")
_MESSAGES = flags.DEFINE_string("messages", None, "A JSON file holding a list of {\"role\", \"content\"} "
                                "messages (roles system/user/assistant); the model writes the next assistant turn.")
_TEMPLATE = flags.DEFINE_string("chat_template", "", "Chat template: a name (chatml, llama3) or a .jinja file; "
                                "default: the workdir tokenizer's own.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the K most likely tokens; 0 disables.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, 0 < top_p <= 1; 1 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def _messages() -> list[dict] | None:
    """The conversation of --messages or --chat --prompt; None for plain continuation."""
    from llama_jax.inference import check_messages
    if _MESSAGES.value:
        if _CHAT.value and _PROMPT.value:
            raise ConfigError("give --messages=FILE or --chat --prompt=TEXT, not both.")
        path = os.path.expanduser(_MESSAGES.value)
        try:
            with open(path, encoding="utf-8") as f:
                messages = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--messages={_MESSAGES.value}: no such file.") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--messages={_MESSAGES.value}: not valid JSON ({e}).") from None
        return check_messages(messages, f"--messages={_MESSAGES.value}")
    if _CHAT.value:
        return [{"role": "user", "content": _PROMPT.value}]
    if _TEMPLATE.value:
        raise ConfigError("--chat_template applies to chats: add --chat (with --prompt) or --messages=FILE.")
    return None


def main(argv):
    # Imported here, not at the top: --help and a bad flag answer in a second, without loading the model,
    # checkpointing and data stacks (benchmarks/startup.py).
    from llama_jax import checkpoint
    from llama_jax.inference import chat_reply, load_chat_template, load_workdir, sample_text

    logging.getLogger().setLevel(logging.WARNING)
    messages = _messages()  # a bad flag or file fails before the params load
    mesh = cli.mesh(default_data=1)  # one device unless asked: decoding one prompt gains nothing from more
    model_config, params, tokenizer, experiment = load_workdir(_WORKDIR.value, mesh, step=_STEP.value)
    step = checkpoint.latest_step(_WORKDIR.value) if _STEP.value is None else _STEP.value
    steps = checkpoint.all_steps(_WORKDIR.value)
    checkpoint.check_finite(params, where=f"{_WORKDIR.value} step {step}",
                            advice=f"Sample an earlier checkpoint with --step=N (the steps are {steps}).")
    options = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                   top_p=_TOP_P.value, seed=_SEED.value)
    if messages is not None:
        template = load_chat_template(_WORKDIR.value, tokenizer, _TEMPLATE.value)
        reply, _ = chat_reply(params, model_config, tokenizer, experiment, template, messages, **options)
        sys.stdout.write(reply + "\n")
    else:
        text, _ = sample_text(params, model_config, tokenizer, experiment, _PROMPT.value, **options)
        sys.stdout.write(_PROMPT.value + text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
