"""Sampling: cached greedy == repeated full forwards, top-k/top-p sets, batching, EOS, seeding."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.data import ByteTokenizer, train_sentencepiece
from llama_jax.errors import ConfigError
from llama_jax.inference import generate, sample_logits, top_p_mask
from llama_jax.inference.sampling import encode_prompt
from llama_jax.model import Llama, init_params, preset, stack_layers

CFG = preset("tiny")


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, jax.random.key(0))
    # Larger-than-init weights make the model's predictions peaked and position-dependent.
    return jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, p)


def _greedy_by_full_forward(params, prompt, n):
    # Right-padding to a fixed length is harmless under a causal mask and compiles the forward once.
    forward = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t))
    tokens = list(prompt)
    for _ in range(n):
        padded = jnp.array([tokens + [0] * (len(prompt) + n - len(tokens))])
        tokens.append(int(jnp.argmax(forward(params, padded)[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


def test_cached_greedy_equals_argmax_of_full_forwards(params):
    prompt = [3, 17, 42, 99, 5]
    got = generate(params, CFG, [prompt], max_new_tokens=20)[0]
    assert got == _greedy_by_full_forward(params, prompt, 20)
    assert len(set(got)) > 1


def test_scan_layout_params_decode_like_per_layer_params(params):
    """Scan-layout params are decoded layer by layer: same greedy tokens and same sampled tokens."""
    scan_cfg = CFG.replace(scan_layers=True)
    prompts = [[3, 17, 42], [8, 1, 5, 9, 2]]
    for kw in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 4}):
        want = generate(params, CFG, prompts, max_new_tokens=10, **kw)
        assert generate(stack_layers(params), scan_cfg, prompts, max_new_tokens=10, **kw) == want


def test_top_k_1_equals_greedy(params):
    prompt = [[1, 2, 3, 4]]
    greedy = generate(params, CFG, prompt, max_new_tokens=12)
    topk1 = generate(params, CFG, prompt, max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert topk1 == greedy


@pytest.mark.parametrize(
    "top_p, kept", [(0.5, {0}), (0.51, {0, 1}), (0.7, {0, 1}), (0.71, {0, 1, 2}), (0.96, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_exactly_the_nucleus(top_p, kept):
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    perm = np.array([3, 0, 4, 1, 2])  # shuffled vocab order: the mask must not depend on it
    logits = jnp.log(jnp.asarray(probs[perm]))[None]
    mask = np.asarray(top_p_mask(logits, top_p))[0]
    assert {int(perm[i]) for i in np.flatnonzero(mask)} == kept


def test_top_p_samples_only_from_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4000))
    tokens = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=0, top_p=0.71))
    counts = np.bincount(tokens, minlength=5)
    assert counts[3] == counts[4] == 0
    # Renormalised nucleus: 0.5/0.85, 0.2/0.85, 0.15/0.85.
    np.testing.assert_allclose(counts[:3] / 4000, np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.03)


def test_mixed_prompt_lengths_match_running_alone(params):
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100, 50]]
    batched = generate(params, CFG, prompts, max_new_tokens=10)
    for prompt, row in zip(prompts, batched):
        assert generate(params, CFG, [prompt], max_new_tokens=10)[0] == row


def test_each_row_stops_at_eos(params):
    prompts = [[3, 17, 42], [9, 8, 7, 6]]
    free = generate(params, CFG, prompts, max_new_tokens=16)
    eos = free[0][4]
    first = free[0].index(eos)
    got = generate(params, CFG, prompts, max_new_tokens=16, eos_id=eos)
    assert got[0] == free[0][: first + 1]
    want_1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert got[1] == want_1


def test_sampling_is_seeded(params):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = generate(params, CFG, [[1, 2, 3]], seed=1, **kw)
    assert a == generate(params, CFG, [[1, 2, 3]], seed=1, **kw)
    assert a != generate(params, CFG, [[1, 2, 3]], seed=2, **kw)


def test_bad_sampling_arguments_are_named(params):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(params, CFG, [[1]], max_new_tokens=CFG.max_seq_len)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, CFG, [[1]], max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="BOS"):
        generate(params, CFG, [[]], max_new_tokens=4)


def test_prompt_characters_the_tokenizer_cannot_encode_are_warned(tmp_path, caplog):
    """Without byte fallback 'ü' silently becomes <unk>; encode_prompt (sample_text's) names it instead."""
    ascii_only = train_sentencepiece(
        ["the quick brown fox jumps over the lazy dog.\n" * 50], tmp_path, vocab_size=60, byte_fallback=False
    )
    with caplog.at_level(logging.WARNING):
        encode_prompt(ascii_only, "the lazy fox")
        encode_prompt(ByteTokenizer(), "the lazy füx")  # bytes encode anything
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        ids = encode_prompt(ascii_only, "the lazy füx")
    assert 0 in ids  # <unk>: the character really is lost
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "'ü' (U+00FC)" in record.getMessage() and "byte fallback" in record.getMessage()
    assert "'x'" not in record.getMessage()  # only the lost characters are named


def test_max_new_tokens_below_one_is_a_clear_error():
    params = init_params(CFG, jax.random.key(0))
    for n in (0, -3):
        with pytest.raises(ConfigError, match=rf"max_new_tokens={n} must be >= 1"):
            generate(params, CFG, [[1, 2, 3]], max_new_tokens=n)
