"""Chat templates: rendering equals transformers' apply_chat_template; assistant spans and token masks equal
transformers' own assistant mask ({% generation %} tags); templates found as HF finds them; bad templates
refused, naming the template and the turn."""

import json
import shutil

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from llama_jax import errors
from llama_jax.data import ByteTokenizer, chat, load_tokenizer, sft, train_sentencepiece

# SmolLM2-Instruct's template: ChatML with a default system prompt when the conversation has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Zephyr-style: one statement per line (exercises trim_blocks / lstrip_blocks: the line break after a block tag
# goes, the one after an expression stays, so the generation prompt is "<|assistant|>\n"); eos_token ends turns.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# Mistral-Instruct-v0.1's: no generation prompt at all (the user turn ends with [/INST]); raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# The same templates with transformers' {% generation %} tags around what the model should learn to write:
# transformers' return_assistant_tokens_mask then gives an independent reference mask.
TAGGED = {
    "chatml": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "smollm2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "zephyr": """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '' }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}""",
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
        "{% endgeneration %}{{ ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{% endif %}{% endfor %}"
    ),
}
TEMPLATES = {
    "chatml": chat.CHATML,
    "llama3": chat.LLAMA3,
    "smollm2": SMOLLM2,
    "zephyr": ZEPHYR,
    "mistral": MISTRAL,
}

SYSTEM = {"role": "system", "content": "Thou art a player, brief and bold."}
CONVERSATIONS = {
    "one_turn": [
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A king, my lord."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Speak, what news?"},
        {
            "role": "assistant",
            "content": "  The queen is dead.\n",
        },  # spaces and a newline the template may trim
        {"role": "user", "content": "How?"},
        {"role": "assistant", "content": "By <s> her own hand & {{ fate }}."},  # looks like a token / Jinja
    ],
    "system": [
        SYSTEM,
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "Hamlet."},
    ],
    "ends_with_user": [
        SYSTEM,
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "I."},
        {"role": "user", "content": "And then?"},
    ],
}
CASES = [
    (t, c)
    for t in TEMPLATES
    for c in CONVERSATIONS
    if not (t == "mistral" and c in ("system", "ends_with_user"))
]


@pytest.fixture(scope="module")
def hf_tok(chat_tokenizer_dir):
    return PreTrainedTokenizerFast(
        tokenizer_file=str(chat_tokenizer_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def ours(chat_tokenizer_dir):
    return load_tokenizer(str(chat_tokenizer_dir))


def template(ours, name, source=None):
    return chat.ChatTemplate(
        name, source or TEMPLATES[name], tuple(sorted(ours.special_token_strings().items()))
    )


@pytest.mark.parametrize("name, conv", CASES)
@pytest.mark.parametrize("gen", [False, True], ids=["no_gen_prompt", "gen_prompt"])
def test_render_equals_transformers(hf_tok, ours, name, conv, gen):
    messages = CONVERSATIONS[conv]
    want = hf_tok.apply_chat_template(
        messages, chat_template=TEMPLATES[name], tokenize=False, add_generation_prompt=gen
    )
    assert template(ours, name).render(messages, gen) == want
    # The tagged variant renders the same text (our environment knows the generation tag).
    assert template(ours, name, TAGGED[name]).render(messages, gen) == want


@pytest.mark.parametrize("name, conv", CASES)
def test_tokens_and_mask_equal_transformers_assistant_mask(hf_tok, ours, name, conv):
    """Token by token: our ids are transformers' apply_chat_template ids, and our trained mask is its
    assistant mask from the {% generation %}-tagged template (computed by another method: char offsets of
    the tagged blocks), shifted to targets: a record's first token is never a target."""
    messages = CONVERSATIONS[conv]
    ref = hf_tok.apply_chat_template(
        messages,
        chat_template=TAGGED[name],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, trained, merged = sft.Formatter(ours, template=template(ours, name)).encode(
        "rec", {"messages": messages}
    )
    assert ids.tolist() == list(ref["input_ids"]) and not merged
    assert trained.tolist() == [bool(m) for m in ref["assistant_masks"]]
    assert trained.sum() > 0
    # And in words: the trained tokens decode to the assistant turns' text and end-of-turn tokens.
    text = "".join(hf_tok.decode([int(i)]) for i in ids[trained])
    ends = {
        "chatml": "<|im_end|>",
        "smollm2": "<|im_end|>",
        "llama3": "<|eot_id|>",
        "zephyr": "</s>",
        "mistral": "</s>",
    }
    for m in (m for m in messages if m["role"] == "assistant"):
        assert m["content"].strip() in text
    assert text.count(ends[name]) == sum(m["role"] == "assistant" for m in messages)


def test_spans_exclude_headers_and_include_end_of_turn(ours):
    messages = CONVERSATIONS["multi_turn"]
    full, spans = chat.assistant_spans(template(ours, "chatml"), messages)
    assert [full[a:b] for a, b in spans] == [
        "  The queen is dead.\n<|im_end|>",
        "By <s> her own hand & {{ fate }}.<|im_end|>",
    ]
    full, spans = chat.assistant_spans(template(ours, "llama3"), messages)
    assert full.startswith("<s><|start_header_id|>user<|end_header_id|>\n\nSpeak, what news?<|eot_id|>")
    assert [full[a:b] for a, b in spans] == [
        "The queen is dead.<|eot_id|>",
        "By <s> her own hand & {{ fate }}.<|eot_id|>",
    ]
    full, spans = chat.assistant_spans(template(ours, "zephyr"), messages)
    assert [full[a:b] for a, b in spans] == [
        "  The queen is dead.\n</s>",
        "By <s> her own hand & {{ fate }}.</s>",
    ]


def test_template_control_tokens_are_one_token_but_content_text_is_encoded_as_hf_does(ours, hf_tok):
    # encode() (pretraining text) keeps a literal control token as text; encode_chat() makes it the token,
    # as transformers' apply_chat_template(tokenize=True) does.
    text = "<|im_start|>user\nHi<|im_end|>"
    assert ours.encode(text) != ours.encode_chat(text)
    assert ours.encode_chat(text) == hf_tok.encode(text, add_special_tokens=False)
    assert ours.encode_chat(text)[0] == 2 and ours.encode_chat(text)[-1] == 3


def test_template_found_as_transformers_finds_it(tmp_path, chat_tokenizer_dir, ours):
    d = tmp_path / "tok"
    shutil.copytree(chat_tokenizer_dir, d)
    assert (
        chat.load_template("", str(d)) is None
    )  # no template: a chat record will ask for data.chat_template
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": SMOLLM2}))
    t = chat.load_template("", str(d / "tokenizer.json"), ours.special_token_strings())
    assert t.source == SMOLLM2 and t.name == str(d / "tokenizer_config.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **cfg,
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": ZEPHYR},
                ],
            }
        )
    )
    assert chat.load_template("", str(d)).source == ZEPHYR
    (d / "chat_template.jinja").write_text(MISTRAL)  # transformers prefers the .jinja file
    assert chat.load_template("", str(d)).source == MISTRAL
    assert chat.load_template("chatml", str(d)).source == chat.CHATML  # a name overrides the tokenizer's
    assert chat.load_template(str(d / "chat_template.jinja"), "byte").source == MISTRAL
    with pytest.raises(
        errors.ConfigError,
        match=r"data.chat_template='chatm' is neither a shipped template \(\['chatml', 'llama3'\]\)",
    ):
        chat.load_template("chatm", str(d))
    (d / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "chat_template": [{"name": "a", "template": "x"}]})
    )
    (d / "chat_template.jinja").unlink()
    with pytest.raises(
        errors.ConfigError, match=r"several chat templates, \['a'\], and none named 'default'"
    ):
        chat.load_template("", str(d))


def test_bad_templates_are_refused_naming_template_and_turn(ours):
    conv = CONVERSATIONS["multi_turn"]
    with pytest.raises(
        errors.ConfigError, match=r"chat template bad.jinja does not compile: .*template line 1"
    ):
        chat.ChatTemplate("bad.jinja", "{% for m in messages %}{{ m['content'] }")
    # Renders the last turn differently (as reasoning templates do): the header is not a prefix of the turn.
    last_differs = chat.CHATML.replace("'<|im_end|>'", "('<|im_end|>' if not loop.last else '<|end|>')")
    with pytest.raises(
        errors.DataError,
        match=r"rec.jsonl:3: chat template last cannot mark assistant turn 1 "
        r"\(message 1 of 4\): the rendering up to its header \(messages\[:1\] "
        r"with add_generation_prompt\) is not a prefix .* at character 36",
    ):
        chat.assistant_spans(chat.ChatTemplate("last", last_differs), conv, where="rec.jsonl:3")
    # Earlier text that depends on later turns: a turn's rendering is not a prefix of the whole conversation's.
    later = "{% if messages | length > 3 %}[long]{% endif %}" + chat.CHATML
    with pytest.raises(
        errors.DataError,
        match=r"turn 1 \(message 1 of 4\): rendering messages\[:2\] is not a "
        r"prefix of rendering the whole conversation",
    ):
        chat.assistant_spans(chat.ChatTemplate("later", later), conv)
    # Text before the content of the turn (a thinking block): the header cannot be told from the content.
    think = chat.CHATML.replace(
        "'\n' + message['content']",
        "'\n' + ('<think></think>' if message['role'] == 'assistant' else '') + message['content']",
    )
    assert think != chat.CHATML
    with pytest.raises(
        errors.DataError, match=r"cannot mark assistant turn 1 .* does not begin with its content"
    ):
        chat.assistant_spans(chat.ChatTemplate("think", think), conv)
    # A generation prompt that is not how the template starts an assistant turn.
    wrong_gen = chat.CHATML.replace(
        "'<|im_start|>assistant\n' }}{% endif %}", "'<|im_start|>bot\n' }}{% endif %}"
    )
    assert wrong_gen != chat.CHATML
    with pytest.raises(
        errors.DataError, match=r"add_generation_prompt\) is not a prefix of the rendering with "
    ):
        chat.assistant_spans(chat.ChatTemplate("wrong_gen", wrong_gen), conv)
    # The template's own raise_exception: the Jinja error and the template's name.
    with pytest.raises(
        errors.DataError,
        match=r"rec.jsonl:9: chat template mistral failed to render the first 3 "
        r"message\(s\): TemplateError: Conversation roles must alternate",
    ):
        chat.assistant_spans(template(ours, "mistral"), CONVERSATIONS["system"], where="rec.jsonl:9")


def test_tojson_and_namespace_as_transformers(hf_tok, ours):
    src = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m | tojson }}{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    messages = [{"role": "user", "content": "<tag> & 'quote' é"}, {"role": "assistant", "content": "ok"}]
    assert template(ours, "x", src).render(messages) == hf_tok.apply_chat_template(
        messages, chat_template=src, tokenize=False
    )
    assert np.char.count(template(ours, "x", src).render(messages), "<tag>") == 1  # not HTML-escaped


def test_sentencepiece_and_byte_tokenizers_encode_chat_text(tmp_path, shakespeare_path):
    sp = train_sentencepiece([shakespeare_path.read_text(encoding="utf-8")[:20000]], tmp_path, vocab_size=400)
    assert sp.special_token_strings() == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    assert sp.encode("<s>") != [sp.bos_id]  # pretraining text: a literal "<s>" stays text
    assert sp.encode_chat("<s>Who art thou?</s><s>") == [
        sp.bos_id,
        *sp.encode("Who art thou?"),
        sp.eos_id,
        sp.bos_id,
    ]
    byte = ByteTokenizer()
    assert byte.special_token_strings() == {} and byte.encode_chat("<|im_end|>") == list(b"<|im_end|>")
