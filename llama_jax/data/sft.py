"""Supervised fine-tuning records -> a token stream with a per-token loss mask (data.format="sft").

Records, one JSON object per line of the .jsonl files `data.train_files` / `data.eval_files` name (both
kinds may be mixed):

  {"prompt": "...", "completion": "..."}   tokens [BOS] prompt completion [EOS] (data.add_bos / add_eos);
                                            trained: the completion and the EOS (so the model learns to stop).
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                                            rendered with the chat template (llama_jax/data/chat.py), which
                                            writes any BOS/EOS itself (add_bos / add_eos do not apply);
                                            trained: each assistant turn's content and end-of-turn token,
                                            never a role header, generation prompt, system or user text.

`data.loss_on="all"` trains every token instead (an ablation); the tokens are the same either way, only the
mask changes. Tokens are encoded segment by segment (the text between assistant spans, each span), so every
token lies wholly inside or outside a span and the mask is exact by construction; the template's control
tokens ("<|im_end|>") become their ids as in HF's apply_chat_template. A record whose segments tokenize
differently than its whole text at once (a merge across a turn boundary) is counted in the log line; its
tokens follow the boundaries, as a prompt rendered up to the assistant header does at inference.

Too long: a record of more than seq_len + 1 tokens (one packed row holds seq_len + 1 tokens: seq_len
inputs, seq_len targets) is truncated to its first seq_len + 1 tokens (the prompt kept, the end of the
response cut) and counted; one with no trained token left within them (its prompt fills the row) is dropped
and counted. Each record is then one segment of a packed row (segment ids, positions from 0), so
conversations never attend into each other. One log line per split (or window) gives the counts.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from llama_jax.data import chat
from llama_jax.data.config import DataConfig
from llama_jax.data.files import JSON_TYPES
from llama_jax.data.sources import Documents, Source
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.data.tokens import TokenStream, stream_dtype
from llama_jax.errors import DataError

log = logging.getLogger(__name__)

_TYPES = {**JSON_TYPES, str: "a string"}


def _kind(v) -> str:
    return _TYPES.get(type(v), type(v).__name__)


def check_record(where: str, record: dict) -> str:
    """ "chat" or "prompt" for a well-formed record; otherwise a DataError at `where` (path:line)."""
    if "messages" in record:
        _check_messages(where, record["messages"])
        return "chat"
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f'{where}: "{key}" is {_kind(record[key])}, not a string.')
        return "prompt"
    raise DataError(
        f'{where}: an SFT record has "messages", or "prompt" and "completion"; this one has '
        f"fields {sorted(record)}."
    )


def _check_messages(where: str, messages) -> None:
    """A DataError at `where` unless `messages` is a non-empty list of {role, content} with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where}: "messages" is {_kind(messages)}{" (empty)" if messages == [] else ""}; '
            'it must be a non-empty array of {"role": ..., "content": ...} objects.'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is {_kind(m)}, not an object with role and content.")
        if m.get("role") not in chat.ROLES:
            raise DataError(
                f"{where}: message {i} has role {m.get('role')!r}; the roles are {chat.ROLES}. Fix "
                "the record (tool turns are not supported)."
            )
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: message {i} ({m['role']}) has content {_kind(m.get('content'))}, not a "
                "string (content blocks and missing content are not supported)."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so nothing to train on; add one or "
            "remove the record."
        )


class Formatter:
    """Record -> (tokens, trained): the ids of a record and, per token, whether it is a trained target."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        template: chat.ChatTemplate | None,
        loss_on: str = "responses",
        add_bos: bool = True,
        add_eos: bool = True,
    ):
        self.tokenizer, self.template, self.loss_on = tokenizer, template, loss_on
        self.add_bos, self.add_eos = add_bos, add_eos

    @classmethod
    def from_config(cls, data: DataConfig, tokenizer: Tokenizer) -> Formatter:
        template = chat.load_template(data.chat_template, data.tokenizer, tokenizer.special_token_strings())
        return cls(
            tokenizer, template=template, loss_on=data.loss_on, add_bos=data.add_bos, add_eos=data.add_eos
        )

    @property
    def fingerprint(self) -> str:
        t = self.template.fingerprint if self.template else "none"
        return f"sft|{self.loss_on}|{t}|{self.add_bos}|{self.add_eos}"

    def segments(self, where: str, record: dict) -> list[tuple[str, bool]]:
        """The record's text as (text, is a response) pieces; chat records via chat.assistant_spans."""
        if check_record(where, record) == "prompt":
            tok = self.tokenizer
            for flag, tid, what in ((self.add_bos, tok.bos_id, "BOS"), (self.add_eos, tok.eos_id, "EOS")):
                if flag and tid is None:
                    raise DataError(
                        f"{where}: the tokenizer has no {what} token for a prompt/completion record; set "
                        f"--config.data.add_{what.lower()}=False or use a tokenizer that has one."
                    )
            return [(record["prompt"], False), (record["completion"], True)]
        if self.template is None:
            raise DataError(
                f'{where} is a chat record ("messages"), but the tokenizer ({self.tokenizer!r}) ships no '
                "chat template: set --config.data.chat_template to a name in llama_jax.data.chat.TEMPLATES "
                f"({sorted(chat.TEMPLATES)}) or a .jinja file."
            )
        text, spans = chat.assistant_spans(self.template, record["messages"], where=where)
        out, pos = [], 0
        for start, end in spans:
            out += [(text[pos:start], False), (text[start:end], True)]
            pos = end
        return [(t, r) for t, r in out + [(text[pos:], False)] if t]

    def encode(self, where: str, record: dict) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ids (n,) int64, trained (n,) bool, whether segment-wise tokens differ from the whole text's)."""
        pieces = self.segments(where, record)
        is_chat = "messages" in record
        encode = self.tokenizer.encode_chat if is_chat else self.tokenizer.encode
        ids: list[int] = []
        trained: list[bool] = []
        if not is_chat and self.add_bos:
            ids, trained = [self.tokenizer.bos_id], [False]
        for text, response in pieces:
            part = encode(text)
            ids += part
            trained += [response] * len(part)
        if not is_chat and self.add_eos:
            ids.append(self.tokenizer.eos_id)
            trained.append(True)  # the completion's end: the model learns to stop
        merged = is_chat and len(pieces) > 1 and encode("".join(t for t, _ in pieces)) != ids
        trained_arr = np.asarray(trained, bool)
        if self.loss_on == "all":
            trained_arr[:] = True
        if len(trained_arr):
            trained_arr[0] = False  # a record's first token is never a target (nothing precedes it)
        return np.asarray(ids, np.int64), trained_arr, merged


@dataclasses.dataclass
class Stats:
    """What tokenize_records did to a split (or window): the numbers of its log line."""

    records: int = 0
    truncated: int = 0  # kept, but longer than seq_len + 1 tokens: cut to that
    dropped: int = 0  # left out: no trained token within the first seq_len + 1
    merged: int = 0  # segment-wise tokens differ from the whole text's (kept; see the module docstring)
    targets: int = 0  # target tokens of the kept records (each but its first token)
    trained: int = 0  # of which trained (loss_mask 1)

    def line(self, name: str, seq_len: int) -> str:
        frac = self.trained / max(self.targets, 1)
        return (
            f"sft {name}: {self.records} records, {self.truncated} truncated to seq_len+1={seq_len + 1} "
            f"tokens, {self.dropped} dropped (no trained token within them), {self.merged} tokenized "
            f"differently at a turn boundary than as one text; {self.trained} of {self.targets} target "
            f"tokens trained ({frac:.1%})"
        )


def tokenize_records(
    docs: Documents, formatter: Formatter, *, seq_len: int, lo: int = 0, hi: int | None = None
) -> tuple[TokenStream, Stats]:
    """Records lo..hi-1 of `docs` as one TokenStream (document d = record d's tokens, no BOS/EOS added
    around it; `trained` marks trained targets; doc_bytes = UTF-8 bytes of the decoded text of the record's
    trained tokens, what eval bits-per-byte counts), truncated or dropped per the policy above."""
    hi = len(docs) if hi is None else hi
    tok = formatter.tokenizer
    dtype = stream_dtype(tok)
    stats = Stats()
    parts, masks, lengths, nbytes = [], [], [], []
    for where, record in docs.read(lo, hi):
        stats.records += 1
        ids, trained, merged = formatter.encode(where, record)
        cut = len(ids) > seq_len + 1
        ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        if not trained.any():
            stats.dropped += 1
            continue
        stats.truncated += cut
        stats.merged += merged
        stats.targets += len(ids) - 1
        stats.trained += int(trained.sum())
        parts.append(ids.astype(dtype))
        masks.append(trained)
        lengths.append(len(ids))
        nbytes.append(len(tok.decode(ids[trained].tolist()).encode("utf-8")))
    log.info(
        "%s",
        stats.line(
            f"{docs.name} records {lo}..{hi - 1}" if (lo, hi) != (0, len(docs)) else docs.name, seq_len
        ),
    )
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    stream = TokenStream(
        tokens,
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
        np.asarray(nbytes, np.int64),
        add_bos=False,
        add_eos=False,
        trained=np.concatenate(masks) if masks else np.zeros(0, bool),
    )
    return stream, stats


def tokenize_source(source: Source, formatter: Formatter, *, seq_len: int) -> TokenStream:
    """A record source's one shard (source_for_role with data.format="sft") as one TokenStream, in memory:
    SFT records are tokenized each run, with their loss masks."""
    records = list(source.shards[0].read())
    docs = Documents(source.description, source.key, len(records), lambda lo, hi: iter(records[lo:hi]))
    return tokenize_records(docs, formatter, seq_len=seq_len)[0]
