"""Tokenizers: round trips, special ids, save/load, vocab checks, SentencePiece training."""

import json

import pytest

from llama_jax.data import tokenizer as tk
from tests.helpers import run_module

SAMPLES = [
    "SPEAKER ONE:\nA line of verse, then a blank line.\n\n",
    "  leading spaces, trailing too  ",
    "héllo ☃ 日本語 — ünïcödé 🙂",
    "a literal <s> and </s> and <|endoftext|> stay text",
    "",
    "\n\n\nx",
]


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path):
    return shakespeare_path.read_text()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, shakespeare_text):
    d = tmp_path_factory.mktemp("sp")
    tk.train_sentencepiece([shakespeare_text[:20000]], d, vocab_size=800, model_type="bpe")
    return d


def _hf_bpe_json(texts, vocab_size=400, specials=("<s>", "</s>", "<pad>")) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def test_byte_tokenizer_ids_and_round_trip():
    t = tk.ByteTokenizer()
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (256, 257, 258, 259)
    assert t.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    for s in SAMPLES:
        assert t.decode(t.encode(s)) == s
    assert t.decode([t.bos_id, 72, 105, t.eos_id, t.pad_id]) == "Hi"
    assert t.encode_batch(SAMPLES) == [t.encode(s) for s in SAMPLES]
    assert [a.tolist() for a in t.encode_arrays(SAMPLES)] == [t.encode(s) for s in SAMPLES]


def test_byte_tokenizer_save_load(tmp_path):
    path = tk.ByteTokenizer().save(tmp_path)
    assert path.endswith("byte.json")
    assert isinstance(tk.load_tokenizer(str(tmp_path)), tk.ByteTokenizer)
    assert isinstance(tk.load_tokenizer("byte"), tk.ByteTokenizer)


def test_sentencepiece_trained_round_trip(sp_dir, shakespeare_text):
    t = tk.load_tokenizer(str(sp_dir))
    assert isinstance(t, tk.SentencePieceTokenizer)
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (800, 1, 2, 3)
    # Text beyond the 20 kB it was trained on, and characters it never saw (byte fallback).
    for s in SAMPLES + [shakespeare_text[50000:60000]]:
        ids = t.encode(s)
        assert t.bos_id not in ids and t.eos_id not in ids
        assert t.decode(ids) == s
    assert t.encode_batch(SAMPLES) == [t.encode(s) for s in SAMPLES]
    # Subword merges were learned: far fewer tokens than bytes.
    chunk = shakespeare_text[50000:60000]
    assert len(t.encode(chunk)) < 0.6 * len(chunk)
    assert t.decode([t.bos_id] + t.encode("Romeo") + [t.eos_id]) == "Romeo"


def test_sentencepiece_load_file_save_and_fingerprint(sp_dir, tmp_path):
    t = tk.load_tokenizer(str(sp_dir / "tokenizer.model"))
    t.save(tmp_path)
    t2 = tk.load_tokenizer(str(tmp_path))
    assert t2.fingerprint() == t.fingerprint() != tk.ByteTokenizer().fingerprint()
    assert t2.encode("To be, or not to be") == t.encode("To be, or not to be")


def test_sentencepiece_unigram_without_byte_fallback(tmp_path, shakespeare_text):
    t = tk.train_sentencepiece(
        [shakespeare_text[:20000]], tmp_path, vocab_size=300, model_type="unigram", byte_fallback=False
    )
    assert t.decode(t.encode(shakespeare_text[30000:31000])) == shakespeare_text[30000:31000]
    assert (tmp_path / "tokenizer.model").exists()


def test_train_sentencepiece_errors(tmp_path):
    with pytest.raises(tk.TokenizerError, match="empty"):
        tk.train_sentencepiece([], tmp_path)
    with pytest.raises(tk.TokenizerError, match="model_type"):
        tk.train_sentencepiece(["abc"], tmp_path, model_type="wordpiece")
    with pytest.raises(tk.TokenizerError, match="vocab"):
        tk.train_sentencepiece(["tiny text"], tmp_path, vocab_size=5000)


def test_sentence_chunks_keep_newlines_and_bound_length():
    text = "ab\ncd\n" * 10 + "x" * 50 + "\nend"
    chunks = list(tk.training_sentences([text], max_len=16))
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 16 for c in chunks)
    assert chunks[0] == "ab\ncd\nab\ncd\nab\n"  # whole lines up to 16 bytes, newlines kept
    assert "x" * 16 in chunks  # an over-long line is cut to fit
    wide = list(tk.training_sentences(["é" * 40], max_len=16))
    assert "".join(wide) == "é" * 40 and all(len(c.encode()) <= 16 for c in wide)


def test_hf_tokenizer_round_trip_and_specials(tmp_path, shakespeare_text):
    (tmp_path / "tokenizer.json").write_text(_hf_bpe_json([shakespeare_text[:20000]]))
    t = tk.load_tokenizer(str(tmp_path))
    assert isinstance(t, tk.HFTokenizer)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)  # found among added tokens
    assert t.vocab_size == 400
    for s in SAMPLES:
        ids = t.encode(s)
        assert t.bos_id not in ids and t.eos_id not in ids  # literal "<s>" is text
        assert t.decode(ids) == s
    assert t.encode_batch(SAMPLES) == [t.encode(s) for s in SAMPLES]
    assert t.decode([t.bos_id, *t.encode("hear me"), t.eos_id]) == "hear me"


def test_hf_tokenizer_specials_from_config_and_gpt2_style(tmp_path, shakespeare_text):
    a = tmp_path / "a"
    a.mkdir()
    (a / "tokenizer.json").write_text(_hf_bpe_json([shakespeare_text[:5000]], 300, ("<|x|>", "<|y|>", "<s>")))
    (a / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|x|>"}, "eos_token": "<|y|>", "pad_token": None})
    )
    t = tk.load_tokenizer(str(a))
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, None)
    t.save(tmp_path / "saved")
    assert (tk.load_tokenizer(str(tmp_path / "saved")).bos_id, t.eos_id) == (0, 1)

    b = tmp_path / "b"
    b.mkdir()
    (b / "tokenizer.json").write_text(_hf_bpe_json([shakespeare_text[:5000]], 300, ("<|endoftext|>",)))
    t = tk.load_tokenizer(str(b / "tokenizer.json"))
    assert t.bos_id == t.eos_id == 0 and t.pad_id is None


def test_directory_with_non_sentencepiece_model_falls_back_to_json(tmp_path, shakespeare_text):
    (tmp_path / "tokenizer.model").write_text("IHRlc3Q= 0\n")  # a tiktoken-style file
    (tmp_path / "tokenizer.json").write_text(_hf_bpe_json([shakespeare_text[:5000]], 300))
    assert isinstance(tk.load_tokenizer(str(tmp_path)), tk.HFTokenizer)
    with pytest.raises(tk.TokenizerError, match="tiktoken"):
        tk.load_tokenizer(str(tmp_path / "tokenizer.model"))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(tk.TokenizerError, match="not found"):
        tk.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(tk.TokenizerError, match="holds none of"):
        tk.load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(tk.TokenizerError, match="tokenizer.json"):
        tk.load_tokenizer(str(tmp_path / "bad.json"))


def test_check_vocab():
    tk.check_vocab(tk.ByteTokenizer(), 259)
    tk.check_vocab(tk.ByteTokenizer(), 512)  # padded model vocab is fine
    with pytest.raises(tk.TokenizerError, match=r"--config.model.vocab_size=259 \(or 384"):
        tk.check_vocab(tk.ByteTokenizer(), 256)


def test_train_tokenizer_command(tmp_path, shakespeare_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:20000])
    out = run_module(
        "experiments.train_tokenizer", f"--output_dir={tmp_path / 'tok'}", "--vocab_size=400",
        "--model_type=unigram", f"--text_file={corpus}", timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["vocab_size"] == 400 and summary["bytes_per_token"] > 1.2
    t = tk.load_tokenizer(str(tmp_path / "tok"))
    assert t.vocab_size == 400 and t.decode(t.encode(shakespeare_text[:500])) == shakespeare_text[:500]
