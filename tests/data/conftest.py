"""Fixtures of the data tests: a small HF tokenizer with the control tokens chat templates write."""

import json
import pathlib

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Added (special) tokens of the templates under test: ChatML, Llama-3, and <s> / </s> as BOS / EOS.
CHAT_SPECIALS = [
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory, shakespeare_path) -> pathlib.Path:
    """A tokenizer dir as HF models ship one, offline: a byte-level BPE tokenizer.json (360 ids; <s>=0 BOS,
    </s>=1 EOS, the chat control tokens 2..7) trained on 30,000 characters of tiny-shakespeare, and a
    tokenizer_config.json naming BOS/EOS with no chat template. Read-only: copy it to add a template."""
    d = tmp_path_factory.mktemp("chat_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=CHAT_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([shakespeare_path.read_text(encoding="utf-8")[:30000]], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d
