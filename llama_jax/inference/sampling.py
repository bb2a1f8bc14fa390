"""Jitted batched sampling: prefill and the whole decode loop run inside one `jax.jit`.

Prompts of different lengths are left-padded into one [batch, prompt_len] array. Padding gets segment id
0 (so no real token attends to it) and each row's RoPE positions start at 0 at its first real token, so a
row's continuation is exactly what it would be alone. Decoding is a `lax.while_loop` over a KV cache that
exits as soon as every row has emitted EOS.

Decoding modes: greedy (`temperature=0`), temperature, top-k and top-p (nucleus), combinable; seeded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.data import Tokenizer, chat
from llama_jax.errors import ConfigError
from llama_jax.model import KVCache, Llama, ModelConfig, unstack_layers

log = logging.getLogger(__name__)

# Prompt arrays are padded up to a multiple of this, so nearby prompt lengths share one compiled program.
PROMPT_BUCKET = 64


def top_p_mask(logits, top_p):
    """Boolean mask [..., vocab] of the smallest set of most likely tokens whose probability reaches top_p.

    A token is kept if the probability mass of the tokens strictly more likely than it is < top_p, so the
    most likely token is always kept and ties at the boundary are kept together.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]  # [..., vocab], descending
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [..., vocab]
    # The smallest kept probability is the last sorted one whose preceding mass is below top_p.
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # [..., 1]
    threshold = jnp.take_along_axis(sorted_probs, n_keep - 1, axis=-1)  # [..., 1]
    return probs >= threshold


def sample_logits(logits, rng, *, temperature, top_k: int, top_p):
    """One token per row from logits [batch, vocab]. temperature 0 is greedy; top_k 0 and top_p 1 disable.

    temperature and top_p are traced (changing them does not recompile), so the branches are `lax.cond`s:
    greedy decoding never pays for the nucleus sort, nor sampling for it when top_p is 1.
    """
    logits = logits.astype(jnp.float32)

    def sample(logits):
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [batch, 1]
            logits = jnp.where(logits >= kth, logits, -jnp.inf)
        logits = jax.lax.cond(
            top_p < 1.0, lambda x: jnp.where(top_p_mask(x, top_p), x, -jnp.inf), lambda x: x, logits
        )
        return jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)

    token = jax.lax.cond(temperature > 0, sample, lambda x: jnp.argmax(x, axis=-1), logits)
    return token.astype(jnp.int32)


@functools.cache
def _jitted_generate(backend: str):
    # Region-based copy insertion lets XLA:CPU update the KV buffers carried by the decode loop in place;
    # without it every layer's buffers were copied each token (1.6x slower at batch 1, benchmarks/decode.py).
    # An XLA:CPU option, so only passed to the CPU compiler.
    options = {"xla_cpu_copy_insertion_use_region_analysis": True} if backend == "cpu" else None
    return jax.jit(_generate, static_argnames=("config", "max_new_tokens", "top_k"), compiler_options=options)


def _generate(params, prompt, prompt_lengths, rng, temperature, top_p, stop_ids, *, config: ModelConfig,
              max_new_tokens: int, top_k: int):
    """prompt: [batch, prompt_len] left-padded; stop_ids: [num_stops] (-1: none); returns (tokens
    [batch, max_new_tokens], num_generated [batch])."""
    eos_id = stop_ids[0]  # what a finished row's remaining slots hold
    if config.scan_layers:
        # Decode layer by layer: scanning would slice each layer's KV buffers out of one stacked array and
        # stack them back every token (2.8x slower at batch 8 on CPU). The per-layer weight slices are
        # taken once, before the loop.
        config = config.replace(scan_layers=False)
        params = unstack_layers(params)
    model = Llama(config)
    batch, prompt_len = prompt.shape
    slot = jnp.arange(prompt_len)
    pad = prompt_len - prompt_lengths[:, None]  # [batch, 1]
    segment_ids = (slot[None, :] >= pad).astype(jnp.int32)  # [batch, prompt_len]
    positions = jnp.maximum(slot[None, :] - pad, 0)  # [batch, prompt_len]
    cache = KVCache.init(config, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply({"params": params}, prompt, positions=positions, segment_ids=segment_ids, cache=cache)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, last_logits, cache, out, done, pos = state
        token = sample_logits(last_logits, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(done, eos_id, token)
        out = out.at[:, i].set(token)
        new_done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        logits, cache = model.apply({"params": params}, token[:, None], positions=pos[:, None], cache=cache)
        n_generated = jnp.where(done, 0, 1)
        return i + 1, logits[:, -1], cache, out, new_done, pos + n_generated

    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    state = (jnp.int32(0), logits[:, -1], cache, out, done, prompt_lengths.astype(jnp.int32))
    _, _, _, out, _, final_pos = jax.lax.while_loop(cond, body, state)
    return out, final_pos - prompt_lengths


def generate(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens; each row stops at EOS, or at
    any of several stop ids when `eos_id` is a list (a chat model's end-of-turn and EOS).

    Returns the new tokens per row, the stop token included when it was produced. Works with sharded
    params: jit follows their shardings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token; start it with the tokenizer's BOS id.")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1 (--max_new_tokens).")
    longest = max(len(p) for p in prompts)
    prompt_len = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    if longest + max_new_tokens > config.max_seq_len:
        raise ConfigError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len={config.max_seq_len}; shorten the prompt or lower --max_new_tokens."
        )
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
        raise ConfigError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}.")
    array = np.zeros((len(prompts), prompt_len), np.int32)
    for row, p in enumerate(prompts):
        array[row, prompt_len - len(p) :] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int | np.integer) else list(eos_id)
    out, n = _jitted_generate(jax.default_backend())(
        params, jnp.asarray(array), jnp.asarray(lengths), jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.asarray(stops or [-1], jnp.int32), config=config, max_new_tokens=max_new_tokens,
        top_k=top_k,
    )
    out, n = np.asarray(out), np.asarray(n)
    return [list(map(int, out[row, : n[row]])) for row in range(len(prompts))]


# ---------------------------------------------------------------------- text in, text out
def lost_characters(tokenizer: Tokenizer, text: str, ids: list[int]) -> list[str]:
    """The characters of `text` that do not come back from decode(ids), e.g. ones that became <unk>.

    Compared as sets, so that tokenizers that only normalise whitespace (a dummy prefix space, collapsed
    runs) are not reported."""
    decoded = tokenizer.decode(ids)
    return [] if decoded == text else sorted(set(text) - set(decoded))


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids with BOS first when the tokenizer has one; a warning names characters it loses."""
    ids = tokenizer.encode(prompt)
    lost = lost_characters(tokenizer, prompt, ids)
    if lost:
        # Not an error: sampling still works, but the model continues a different prompt than the one the
        # CLI prints, which silently skews what the user reads.
        log.warning(
            "the tokenizer cannot encode %s in the prompt: the model sees them as unknown tokens (<unk>). Use "
            "a tokenizer with byte fallback (experiments.train_tokenizer --byte_fallback, the default) or "
            "leave those characters out.",
            ", ".join(f"{c!r} (U+{ord(c):04X})" for c in lost),
        )
    if tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer has no BOS token: give a --prompt.")
    return ids


def stop_ids(tokenizer: Tokenizer, experiment: dict) -> list[int]:
    """EOS ids: the tokenizer's, then an imported model's config `eos_token_id` (an int or a list)."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    extra = experiment.get("source", {}).get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def truncate_at(ids: Iterable[int], stops: list[int]) -> list[int]:
    """`ids` up to (without) the first stop id."""
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(i)
    return out


def continuation_text(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt; decoded together with the prompt so that tokenizers that
    drop a leading space (SentencePiece) or merge bytes across the boundary come out right."""
    before = tokenizer.decode(prompt_ids)
    both = tokenizer.decode(prompt_ids + new_ids)
    return both[len(before):] if both.startswith(before) else tokenizer.decode(new_ids)


def sample_text(
    params, model_config, tokenizer: Tokenizer, experiment: dict, prompt: str, *, max_new_tokens: int,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
) -> tuple[str, list[int]]:
    """(continuation text, its token ids without the stop token) of `prompt`."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    stops = stop_ids(tokenizer, experiment)
    new = generate(
        params, model_config, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=stops, seed=seed,
    )[0]
    new = truncate_at(new, stops)
    return continuation_text(tokenizer, prompt_ids, new), new


# ---------------------------------------------------------------------- chat
def chat_stops(tokenizer: Tokenizer, template: chat.ChatTemplate, experiment: dict) -> tuple[list[int], list[str]]:
    """(stop ids, stop texts) of a chat reply. Ids: the template's end-of-turn token (chat.end_of_turn:
    <|im_end|>, <|eot_id|>, </s>), first, then the EOS ids of `stop_ids`. An end-of-turn that is no special
    token of the tokenizer (ChatML with the byte tokenizer: ten byte tokens) is a stop text instead: the
    reply is cut there after generation (generation itself then runs to max_new_tokens or EOS)."""
    ids, texts = stop_ids(tokenizer, experiment), []
    eot = chat.end_of_turn(template)
    if eot:
        specials = set(tokenizer.special_tokens().values())
        special = [i for i in tokenizer.encode_chat(eot) if i in specials]
        if special:
            ids = [special[0], *(i for i in ids if i != special[0])]
        else:
            texts.append(eot)
    return ids, texts


def encode_chat_prompt(tokenizer: Tokenizer, template: chat.ChatTemplate, messages: Sequence[dict]) -> list[int]:
    """The ids a chat model continues: `messages` rendered with add_generation_prompt=True (the assistant
    header last), control tokens as their ids; equal to transformers' apply_chat_template(messages,
    add_generation_prompt=True, tokenize=True). The template writes any BOS itself."""
    ids = tokenizer.encode_chat(template.render(messages, add_generation_prompt=True, where="the chat prompt"))
    if not ids:
        raise ConfigError(f"chat template {template.name} renders these messages as no text; give a --prompt.")
    return ids


def cut_at(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to (without) the first occurrence of any stop text."""
    cuts = [text.find(t) for t in stop_texts if t in text]
    return text[: min(cuts)] if cuts else text


def check_messages(messages, where: str) -> list[dict]:
    """`messages` if it is a non-empty list of {"role": system|user|assistant, "content": str}; else a
    ConfigError naming `where` and the message."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f'{where}: the messages must be a non-empty JSON list of {{"role", "content"}} objects.')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in chat.ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(
                f"{where}: message {i} is {m!r}; each must be {{\"role\": one of {list(chat.ROLES)}, \"content\": "
                "a string}."
            )
    return messages


def chat_reply(
    params, model_config, tokenizer: Tokenizer, experiment: dict, template: chat.ChatTemplate,
    messages: Sequence[dict], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0, seed: int = 0,
) -> tuple[str, list[int]]:
    """(the assistant's reply text, its token ids without the stop token) to `messages`, prompted with
    `template` (encode_chat_prompt) and stopped at its end of turn (chat_stops)."""
    prompt_ids = encode_chat_prompt(tokenizer, template, messages)
    stops, stop_texts = chat_stops(tokenizer, template, experiment)
    new = generate(
        params, model_config, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=stops, seed=seed,
    )[0]
    new = truncate_at(new, stops)
    return cut_at(continuation_text(tokenizer, prompt_ids, new), stop_texts), new
