"""Generation-based exact match on held-out SFT records (`data.exact_match_records=N`, data.format="sft").

For each of the first N records of the held-out files, greedy-decode the model's answer and compare it with
the record's, both stripped of surrounding whitespace:

  {"prompt": P, "completion": C}   prompt [BOS] P (as the SFT formatter encodes it); stops at EOS; reference C
  {"messages": [..., assistant A, ...]}   the messages before the last assistant turn, rendered with the chat
                                   template and add_generation_prompt=True (what `experiments.sample --chat`
                                   sends); stops at the template's end of turn or EOS; reference A's content

    eval/exact_match          fraction of the scored records whose answer equals the reference
    eval/exact_match_records  how many were scored (records whose prompt + answer budget exceeds the
                              model's max_seq_len are left out, and logged)

Each record may generate len(reference tokens) + SLACK tokens: enough for the reference, its stop token and
a different tokenization of the same text; an answer still going by then is not the reference. The train
loop's Evaluate hook logs these beside eval/loss; `experiments.eval_ppl --config.data.exact_match_records=N`
prints them for a workdir.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from llama_jax.data import DataConfig, Formatter, Tokenizer, check_record, documents_for_role
from llama_jax.errors import DataError
from llama_jax.inference.sampling import (
    chat_stops,
    continuation_text,
    cut_at,
    encode_chat_prompt,
    generate,
    truncate_at,
)
from llama_jax.model import ModelConfig

log = logging.getLogger(__name__)

SLACK = 8  # extra new tokens beyond the reference's own
_BUCKET = 16  # a batch's max_new_tokens is rounded up to this, so batches share compiled programs


@dataclasses.dataclass(frozen=True)
class Example:
    where: str  # path:line of the record
    prompt: list[int]
    reference: str
    max_new_tokens: int
    stops: tuple[int, ...]  # stop ids (EOS, end of turn)
    stop_texts: tuple[str, ...]  # end-of-turn texts that are no single token (cut after generation)


class ExactMatch:
    """The held-out examples, built once; `__call__(params, model_config)` scores a model on them."""

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, skipped: int = 0):
        self.examples, self.tokenizer, self.skipped = list(examples), tokenizer, skipped
        self.results: list[tuple[str, str, str, bool]] = []  # (where, answer, reference, match) of the last call

    @classmethod
    def from_config(
        cls, data: DataConfig, tokenizer: Tokenizer, *, max_seq_len: int, experiment: dict | None = None
    ) -> ExactMatch:
        """The first data.exact_match_records held-out records of `data`; `experiment` (a workdir's config
        dict) adds an imported model's eos_token_id to the stop ids."""
        docs = documents_for_role(data, "eval")
        formatter = Formatter.from_config(data, tokenizer)
        examples, skipped = [], 0
        for where, record in docs.read(0, min(data.exact_match_records, len(docs))):
            if check_record(where, record) == "prompt":
                prompt = ([tokenizer.bos_id] if data.add_bos and tokenizer.bos_id is not None else [])
                prompt += tokenizer.encode(record["prompt"])
                stops = [tokenizer.eos_id] if data.add_eos and tokenizer.eos_id is not None else []
                reference, stop_texts = record["completion"], []
            else:
                if formatter.template is None:
                    raise DataError(
                        f"{where} is a chat record, but the tokenizer ships no chat template: set "
                        "--config.data.chat_template (a name in llama_jax.data.chat.TEMPLATES or a .jinja file)."
                    )
                messages = record["messages"]
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                prompt = encode_chat_prompt(tokenizer, formatter.template, messages[:last])
                stops, stop_texts = chat_stops(tokenizer, formatter.template, experiment or {})
                reference = messages[last]["content"]
            budget = len(tokenizer.encode(reference)) + SLACK
            if len(prompt) + budget > max_seq_len:
                skipped += 1
                continue
            examples.append(Example(where, prompt, reference, budget, tuple(stops), tuple(stop_texts)))
        if skipped:
            log.warning("exact match: %d of %d held-out records left out: prompt + answer budget exceeds "
                        "max_seq_len=%d", skipped, skipped + len(examples), max_seq_len)
        return cls(examples, tokenizer, skipped)

    def __call__(self, params, model_config: ModelConfig, *, batch_size: int = 8) -> dict[str, float]:
        """{"eval/exact_match", "eval/exact_match_records"} of greedy answers (empty with no examples)."""
        if not self.examples:
            return {}
        answers: dict[int, list[int]] = {}
        # One stop set per generate call; within it, similar prompt lengths share a batch.
        order = sorted(range(len(self.examples)), key=lambda i: (self.examples[i].stops, len(self.examples[i].prompt)))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and self.examples[groups[-1][0]].stops == self.examples[i].stops:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            rows = [self.examples[i] for i in group]
            need = max(e.max_new_tokens for e in rows)
            room = model_config.max_seq_len - max(len(e.prompt) for e in rows)
            new_tokens = min(-(-need // _BUCKET) * _BUCKET, room)
            if new_tokens < need:  # one long prompt and one long answer: each alone fits
                outs = [self._generate(params, model_config, [e], e.max_new_tokens)[0] for e in rows]
            else:
                outs = self._generate(params, model_config, rows, new_tokens)
            answers.update(zip(group, outs))
        self.results = []
        for i, e in enumerate(self.examples):
            new = truncate_at(answers[i][: e.max_new_tokens], list(e.stops))  # its own budget: batch-independent
            text = cut_at(continuation_text(self.tokenizer, e.prompt, new), e.stop_texts)
            self.results.append((e.where, text, e.reference, text.strip() == e.reference.strip()))
        matches = sum(r[3] for r in self.results)
        return {"eval/exact_match": matches / len(self.examples), "eval/exact_match_records": float(len(self.examples))}

    @staticmethod
    def _generate(params, model_config, rows: Sequence[Example], max_new_tokens: int) -> list[list[int]]:
        return generate(params, model_config, [e.prompt for e in rows], max_new_tokens=max_new_tokens,
                        temperature=0.0, eos_id=list(rows[0].stops))
