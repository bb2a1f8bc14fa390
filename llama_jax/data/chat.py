"""Chat templates, rendered as Hugging Face renders them, and the assistant spans of a rendered conversation.

A template is the Jinja source a model's tokenizer dir ships (`chat_template` in tokenizer_config.json, or
chat_template.jinja beside it) or one shipped here (`TEMPLATES`: "chatml", "llama3"), chosen with
`data.chat_template` (a name, a .jinja file, or "" for the tokenizer's own). It renders in the environment
transformers' `apply_chat_template` uses (transformers/utils/chat_template_utils.py,
`_compile_jinja_template`): a sandbox with trim_blocks and lstrip_blocks, loop controls, the `generation`
tag (rendered as its body), a `tojson` that does not HTML-escape, and `raise_exception`, `strftime_now`,
`dict`, `namespace`; the variables are `messages`, `add_generation_prompt`, `tools=None`, `documents=None`
and the tokenizer's special-token strings (`bos_token`, `eos_token`, ...).

Where the assistant turns are (`assistant_spans`): by rendering prefixes of the conversation, so any
template works that renders a conversation turn by turn. For assistant turn i,

    head = render(messages[:i], add_generation_prompt=True)    # ends with the assistant header
    upto = render(messages[:i + 1])                            # ends after the turn
    full = render(messages)

head must be a prefix of upto and upto a prefix of full; the turn is full[len(head):len(upto)] minus its
trailing whitespace (the separator before the next turn, which the model never generates: decoding stops
at the end-of-turn token), and it must begin with the message's content. So the span is the content and
the end-of-turn text (ChatML "Hi<|im_end|>", Llama-3 "Hi<|eot_id|>"), never the role header. A template
that breaks any of these (one that rewrites earlier turns once a later one exists, or puts text before the
content) is refused, naming the template and the turn: a wrong mask is never produced.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from etils import epath

from llama_jax.data.config import DataConfig
from llama_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# ChatML, as Qwen2 / SmolLM2 / OpenHermes ship it (SmolLM2 adds a default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template (Llama-3.1+ add a dated system header and tools around the same turns).
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}

ROLES = ("system", "user", "assistant")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body unchanged;
    spans come from prefix rendering, for every template alike."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '); transformers' does not, and templates expect that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore attributes (as transformers: no reaching CPython internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_Namespace,
        dict=lambda *a, **k: dict(*a, **k),
    )
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template; `name` says where it came from (for messages), `source` is the Jinja text."""

    name: str
    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # ("bos_token", "<s>"), ... passed to the template

    def __post_init__(self):
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"chat template {self.name} does not compile: {e.message} (template line {e.lineno}: "
                f"{_line(self.source, e.lineno)!r}). Fix it, or choose another with "
                f"--config.data.chat_template (one of {sorted(TEMPLATES)}, or a .jinja file)."
            ) from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.source, self.special_tokens]).encode()).hexdigest()[:16]

    def render(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, *, where: str = ""
    ) -> str:
        """The text of `messages` (dicts with role and content), as `apply_chat_template(tokenize=False)`."""
        # As transformers: keys whose value is None are dropped (templates handle a missing key, not None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **dict(self.special_tokens),
            )
        except Exception as e:  # a template is a program: raise_exception, undefined names, type errors
            gen = ", add_generation_prompt=True" if add_generation_prompt else ""
            raise DataError(
                f"{where + ': ' if where else ''}chat template {self.name} failed to render the first "
                f"{len(messages)} message(s){gen}: {type(e).__name__}: {e}. Fix the record, or choose a "
                "template that accepts it with --config.data.chat_template (one of "
                f"{sorted(TEMPLATES)}, or a .jinja file)."
            ) from None


def _line(source: str, lineno: int | None) -> str:
    lines = source.splitlines()
    return lines[lineno - 1][:120] if lineno and 0 < lineno <= len(lines) else ""


def assistant_spans(template: ChatTemplate, messages: Sequence[dict], *, where: str = "") -> tuple[str, list]:
    """(the rendered conversation, [(start, end) character span of each assistant turn]); module docstring."""
    full = template.render(messages, where=where)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = template.render(messages[:i], add_generation_prompt=True, where=where)
        upto = template.render(messages[: i + 1], where=where)
        refuse = functools.partial(_refuse, template, where, i, len(messages))
        for shorter, longer, what in (
            (head, upto, f"the rendering up to its header (messages[:{i}] with add_generation_prompt) is not a "
                         f"prefix of the rendering with the turn (messages[:{i + 1}])"),
            (upto, full, f"rendering messages[:{i + 1}] is not a prefix of rendering the whole conversation "
                         "(later turns change earlier text)"),
        ):
            if not longer.startswith(shorter):
                k = _common_prefix(shorter, longer)
                raise refuse(f"{what}; they differ at character {k}: {shorter[k : k + 40]!r} vs "
                             f"{longer[k : k + 40]!r}")
        start, turn = len(head), upto[len(head) :].rstrip()
        if spans and start < spans[-1][1]:
            raise refuse(f"its header ends at character {start}, inside the previous assistant turn")
        content = m["content"].strip()
        if not turn.lstrip().startswith(content):
            raise refuse(
                f"the text after its header, {turn[:60]!r}, does not begin with its content {content[:40]!r}"
            )
        spans.append((start, start + len(turn)))
    return full, spans


def _refuse(template: ChatTemplate, where: str, i: int, n: int, why: str) -> DataError:
    return DataError(
        f"{where + ': ' if where else ''}chat template {template.name} cannot mark assistant turn {i} "
        f"(message {i} of {n}): {why}. The loss mask would be wrong, so the record is refused; use a "
        "template that renders a conversation turn by turn (--config.data.chat_template, one of "
        f"{sorted(TEMPLATES)} or a .jinja file)."
    )


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def template_in_dir(directory: str) -> tuple[str, str] | None:
    """(where, Jinja source) of the chat template a tokenizer dir ships, as transformers finds it:
    chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a list of named templates
    of which "default" is used); None when there is none."""
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return jinja_file, f.read()
    config_file = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        value = json.load(f).get("chat_template")
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(
                f"{config_file} has several chat templates, {sorted(map(str, named))}, and none named "
                "'default'; write the one to use to a .jinja file and pass it as "
                "--config.data.chat_template."
            )
        return f"{config_file} (template 'default')", named["default"]
    return (config_file, value) if isinstance(value, str) and value else None


def load_template(
    spec: str, tokenizer_spec: str, special_tokens: dict[str, str] | None = None
) -> ChatTemplate | None:
    """The template `data.chat_template` names: a name in TEMPLATES, a .jinja file, or "" for the one in the
    tokenizer's dir (`data.tokenizer`, a dir or a file in it); None when "" and the tokenizer has none."""
    specials = tuple(sorted((special_tokens or {}).items()))
    if spec in TEMPLATES:
        return ChatTemplate(f"{spec!r} (llama_jax.data.chat.TEMPLATES)", TEMPLATES[spec], specials)
    if spec:
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise ConfigError(
                f"data.chat_template={spec!r} is neither a shipped template ({sorted(TEMPLATES)}) nor a "
                "file; give a name, a path to a .jinja file, or '' for the tokenizer's own template."
            )
        with open(path, encoding="utf-8") as f:
            return ChatTemplate(path, f.read(), specials)
    if not tokenizer_spec or tokenizer_spec == "byte" or tokenizer_spec.startswith("train:"):
        return None
    directory = tokenizer_spec if os.path.isdir(tokenizer_spec) else os.path.dirname(tokenizer_spec)
    found = template_in_dir(directory or ".")
    return None if found is None else ChatTemplate(found[0], found[1], specials)


_CONTROL_TOKEN = re.compile(r"<\|[^|<>\s]+\|>")  # "<|im_start|>", "<|eot_id|>": ChatML's and Llama-3's form


def missing_control_tokens(template: ChatTemplate, tokenizer) -> list[str]:
    """The control tokens ("<|im_start|>", "<|eot_id|>", ...) `template` writes that are no special token of
    `tokenizer`, sorted. Each is then several ordinary tokens: the model must learn it as text, and sampling
    cannot stop at an end-of-turn id."""
    messages = [{"role": role, "content": role[0]} for role in ("user", "assistant", "user")]
    try:
        text = template.render(messages, add_generation_prompt=True, where="the control-token probe")
    except DataError:  # a template that cannot render for this tokenizer says so, naming the record, when used
        return []
    return sorted(set(_CONTROL_TOKEN.findall(text)) - set(tokenizer.special_tokens()))


def warn_missing_control_tokens(template: ChatTemplate, tokenizer) -> None:
    """Log a warning naming the control tokens of `template` that `tokenizer` lacks (missing_control_tokens)."""
    missing = missing_control_tokens(template, tokenizer)
    if missing:
        log.warning(
            "chat template %s writes control tokens that the tokenizer does not have as special tokens: %s. Each "
            "is encoded as %d ordinary tokens or more, which the model must learn as text; use a tokenizer that "
            "has them (an HF tokenizer.json with them as added tokens) or a template whose tokens it has.",
            template.name, missing, min(len(tokenizer.encode(t)) for t in missing),
        )


_PROBE = "llama_jax end-of-turn probe"


def end_of_turn(template: ChatTemplate) -> str:
    """The text a template writes after an assistant message's content ("<|im_end|>", "<|eot_id|>", "</s>"):
    what a chat model emits to end its turn, so what sampling stops at. Found by rendering a probe turn
    (assistant_spans' span is the content and this text); "" when the template writes nothing there."""
    messages = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": _PROBE}]
    text, spans = assistant_spans(template, messages, where="the end-of-turn probe")
    turn = text[spans[0][0] : spans[0][1]].lstrip()
    return turn[len(_PROBE) :].strip()


def save_tokenizer(tokenizer, data: DataConfig, directory: str) -> ChatTemplate | None:
    """`tokenizer.save(directory)` (a workdir's tokenizer/), keeping the chat template the run uses
    (data.chat_template, else the tokenizer dir's own) as directory/chat_template.jinja: an HF tokenizer's
    save rewrites tokenizer_config.json without its template, and sampling with --chat reads it from there.
    A plain-text run whose tokenizer's template cannot be read saves the tokenizer alone."""
    try:  # read before saving: `directory` may be where data.tokenizer points (a resumed run's own)
        template = load_template(data.chat_template, data.tokenizer, tokenizer.special_token_strings())
    except ConfigError:
        if data.format == "sft":
            raise
        template = None
    tokenizer.save(directory)
    if template is not None:
        (epath.Path(directory) / "chat_template.jinja").write_text(template.source)  # gs:// too
    return template
