"""SFT data: prompt/completion and chat records -> packed rows whose loss_mask is exactly the responses;
records never attend into each other; truncation and dropping counted; bad input named by file and line;
training on it end to end, where the "tokens" metric is the number of trained targets."""

import json
import logging
import shutil

import numpy as np
import pytest

from llama_jax import data, errors
from llama_jax.data import chat, sft
from llama_jax.inference import evaluate_workdir
from tests.helpers import load_config, run_module, train_config

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A king, my lord."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Speak!"},
            {"role": "assistant", "content": "I will."},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": "Never."},
        ]
    },
]
PROMPTS = [
    {"prompt": "Question: what is two and two?\nAnswer:", "completion": " four"},
    {"prompt": "Name a play: ", "completion": "Hamlet, by Shakespeare."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def sft_config(tmp_path, records, eval_records=None, **data):
    cfg = dict(
        format="sft",
        packing="packed",
        tokenizer="byte",
        chat_template="chatml",
        train_files=write_jsonl(tmp_path / "train.jsonl", records),
        eval_files=write_jsonl(tmp_path / "eval.jsonl", eval_records or records[:1]),
    )
    return data_config(**{**cfg, **data})


def data_config(**fields):
    return data.DataConfig(**fields)


def byte_formatter(loss_on="responses", template="chatml"):
    tok = data.ByteTokenizer()
    return sft.Formatter(
        tok, template=chat.load_template(template, "byte", tok.special_token_strings()), loss_on=loss_on
    )


def test_prompt_completion_trains_the_completion_and_eos():
    ids, trained, _ = byte_formatter().encode("r", PROMPTS[0])
    p, c = PROMPTS[0]["prompt"].encode(), PROMPTS[0]["completion"].encode()
    assert ids.tolist() == [256, *p, *c, 257]  # BOS prompt completion EOS (byte ids are the bytes)
    assert trained.tolist() == [False] * (1 + len(p)) + [True] * (len(c) + 1)
    ids2, trained2, _ = byte_formatter("all").encode("r", PROMPTS[0])
    assert ids2.tolist() == ids.tolist()  # the ablation changes the mask only
    assert trained2.tolist() == [False] + [True] * (len(ids) - 1)  # every target


def test_chat_mask_is_the_assistant_text_byte_by_byte():
    # Byte tokenizer: token k is byte k of the rendering, so the mask must be exactly the assistant spans.
    record = CHAT[1]
    ids, trained, _ = byte_formatter().encode("r", record)
    text = bytes(ids.tolist()).decode()
    assert text == chat.ChatTemplate("c", chat.CHATML).render(record["messages"])
    want = np.zeros(len(text), bool)
    for span in ("I will.<|im_end|>", "Never.<|im_end|>"):
        start = text.index("assistant\n" + span) + len("assistant\n")
        want[start : start + len(span)] = True
    assert trained.tolist() == want.tolist()
    assert bytes(ids[trained].tolist()).decode() == "I will.<|im_end|>Never.<|im_end|>"


def test_packed_records_are_separate_segments_with_exact_masks(tmp_path):
    """Every record is one segment of one row: its tokens (inputs then the last target) are the record's
    tokens, positions restart at 0, loss_mask is its trained mask shifted onto the targets; a row holds
    several records with distinct segment ids, and attention (same segment id) never spans two."""
    records = (CHAT + PROMPTS) * 3
    cfg = sft_config(tmp_path, records)
    formatter = byte_formatter()
    want = [formatter.encode(f"r{i}", r)[:2] for i, r in enumerate(records)]
    lengths = [len(ids) for ids, _ in want]
    seq_len = 2 * max(lengths)  # rows hold two or more records
    td = data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=seq_len, batch_size=4, seed=0)
    num_rows = td.rows_per_epoch
    assert num_rows < len(records)
    seen = []
    for step in range(-(-num_rows // 4)):
        batch = td.batch_for_step(step, 0, 1)
        for r in range(4):
            if step * 4 + r >= num_rows:
                break
            seg = batch["segment_ids"][r]
            assert seg.max() >= 1 and (np.diff(seg[seg > 0]) >= 0).all()
            for s in np.unique(seg[seg > 0]):
                cols = np.flatnonzero(seg == s)
                assert (np.diff(cols) == 1).all() and (
                    batch["positions"][r, cols] == np.arange(len(cols))
                ).all()
                tokens = np.append(batch["inputs"][r, cols], batch["targets"][r, cols[-1]]).tolist()
                k = next(i for i, (ids, _) in enumerate(want) if ids.tolist() == tokens and i not in seen)
                seen.append(k)
                assert batch["loss_mask"][r, cols].tolist() == want[k][1][1:].astype(np.float32).tolist()
            assert (batch["loss_mask"][r, seg == 0] == 0).all()
    assert sorted(seen) == list(range(len(records)))  # each record once per epoch, whole


def test_truncation_and_dropping_are_counted_and_logged(tmp_path, caplog):
    long_answer = {"prompt": "Q: ", "completion": "a" * 100}  # 105 tokens: truncated, trains 60 targets
    long_prompt = {"prompt": "p" * 80, "completion": "b"}  # nothing trained within 65 tokens: dropped
    records = [PROMPTS[0], long_answer, long_prompt]
    docs = data.record_documents(write_jsonl(tmp_path / "t.jsonl", records))
    with caplog.at_level(logging.INFO, logger="llama_jax.data.sft"):
        stream, stats = sft.tokenize_records(docs, byte_formatter(), seq_len=64)
    assert (stats.records, stats.truncated, stats.dropped) == (3, 1, 1)
    assert stream.num_docs == 2 and np.diff(stream.doc_starts).tolist() == [
        len(b"Question: what is two and two?\nAnswer: four") + 2,
        65,
    ]
    kept = stream.tokens[stream.doc_starts[1] :].tolist()
    assert kept == [256, *b"Q: ", *b"a" * 61]  # the head: prompt kept, the answer's end (and EOS) cut
    assert stats.trained == len(b" four") + 1 + 61
    assert (
        "3 records, 1 truncated to seq_len+1=65 tokens, 1 dropped (no trained token within them)"
        in caplog.text
    )


def test_eval_scores_only_responses_with_exact_bytes(tmp_path):
    cfg = sft_config(tmp_path, CHAT + PROMPTS, eval_records=CHAT + PROMPTS[:1])
    ev = data.EvalData.from_config(cfg, data.ByteTokenizer(), seq_len=256, batch_size=2)
    responses = ["A king, my lord.<|im_end|>", "I will.<|im_end|>", "Never.<|im_end|>", " four"]
    assert ev.num_bytes == sum(len(r.encode()) for r in responses)  # the EOS is scored but holds no text
    assert ev.num_tokens == ev.num_bytes + 1
    batches = list(ev.batches(0, 1))
    assert sum(b["loss_mask"].sum() for b in batches) == ev.num_tokens
    assert sum(b["target_bytes"].sum() for b in batches) == ev.num_bytes


def test_chat_record_without_template_names_the_fix(tmp_path, chat_tokenizer_dir):
    cfg = sft_config(tmp_path, CHAT, tokenizer=str(chat_tokenizer_dir), chat_template="")
    with pytest.raises(
        errors.DataError,
        match=r"train.jsonl:1 is a chat record .* ships no chat template: set "
        r"--config.data.chat_template",
    ):
        data.TrainData.from_config(
            cfg, data.load_tokenizer(str(chat_tokenizer_dir)), seq_len=64, batch_size=2, seed=0
        )
    # Prompt/completion records need none.
    cfg = sft_config(tmp_path, PROMPTS, tokenizer=str(chat_tokenizer_dir), chat_template="")
    data.TrainData.from_config(
        cfg, data.load_tokenizer(str(chat_tokenizer_dir)), seq_len=64, batch_size=2, seed=0
    )


def test_a_merge_across_a_turn_boundary_is_counted_and_tokens_follow_the_boundary(
    tmp_path, chat_tokenizer_dir
):
    """A header that ends mid-word ("Quoth") followed by content "e ...": as one text BPE merges "h"+"e"
    across the boundary; segment-wise it cannot, so the mask stays exact, and the record is counted."""
    tok = data.load_tokenizer(str(chat_tokenizer_dir))
    src = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '\\n' }}{% else %}"
        "{{ 'Quoth' + m['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Quoth' }}{% endif %}"
    )
    template = chat.ChatTemplate("quoth", src, tuple(tok.special_token_strings().items()))
    record = {
        "messages": [
            {"role": "user", "content": "Speak."},
            {"role": "assistant", "content": "e king is dead."},
        ]
    }
    ids, trained, merged = sft.Formatter(tok, template=template).encode("r", record)
    assert merged and tok.encode_chat("Speak.\nQuothe king is dead.</s>\n") != ids.tolist()
    assert ids.tolist() == tok.encode_chat("Speak.\nQuoth") + tok.encode_chat(
        "e king is dead.</s>"
    ) + tok.encode("\n")
    assert (
        tok.decode(ids[trained].tolist()) == "e king is dead."
    )  # </s> is trained too, but decodes to nothing
    assert [tok.piece(i) for i in ids[trained]][-1] == "</s>"
    docs = data.record_documents(write_jsonl(tmp_path / "q.jsonl", [record, record]))
    assert sft.tokenize_records(docs, sft.Formatter(tok, template=template), seq_len=64)[1].merged == 2


BAD_RECORDS = [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', r"t.jsonl:2: not valid JSON"),
    (
        '\n\n["a"]\n',
        r"t.jsonl:3: is an array, not a JSON object; .* \"messages\", or \"prompt\" and \"completion\"",
    ),
    (
        '{"text": "x"}\n',
        r"t.jsonl:1: an SFT record has \"messages\", or \"prompt\" and \"completion\"; this one "
        r"has fields \['text'\]",
    ),
    ('{"prompt": "a", "completion": 3}\n', r"t.jsonl:1: \"completion\" is a number, not a string"),
    ('{"messages": []}\n', r"t.jsonl:1: \"messages\" is an array \(empty\)"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}\n',
        r"t.jsonl:1: message 1 has role 'tool'; the roles are \('system', 'user', 'assistant'\)",
    ),
    (
        '{"messages": [{"role": "user", "content": ["a"]}]}\n',
        r"t.jsonl:1: message 0 \(user\) has content an array",
    ),
    (
        '{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}\n',
        r"t.jsonl:1: the conversation has no assistant turn",
    ),
]


@pytest.mark.parametrize(
    "text, message", BAD_RECORDS, ids=[m.split(":")[1][:6] + str(i) for i, (_, m) in enumerate(BAD_RECORDS)]
)
def test_bad_records_name_file_and_line(tmp_path, text, message):
    (tmp_path / "t.jsonl").write_text(text)
    with pytest.raises(errors.DataError, match=message):
        sft.tokenize_records(data.record_documents(str(tmp_path / "t.jsonl")), byte_formatter(), seq_len=64)


def test_template_failure_names_record_and_template(tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
        "prompts here') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    cfg = sft_config(tmp_path, CHAT, chat_template=str(strict))
    with pytest.raises(
        errors.DataError,
        match=r"train.jsonl:1: chat template .*strict.jinja failed to render the "
        r"first 3 message\(s\): TemplateError: no system prompts here",
    ):
        data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=64, batch_size=2, seed=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(packing="concat"), r"data.format='sft' needs data.packing='packed'"),
        (dict(loss_on="prompt"), r"data.loss_on='prompt' is not one of \('responses', 'all'\)"),
        (dict(cache_dir="/tmp/x"), r"set data.cache_dir=''"),
        (dict(tokenizer="train:bpe:512"), r"not a newly trained one"),
        (dict(format="chat"), r"data.format='chat' is not one of \('text', 'sft'\)"),
    ],
)
def test_config_errors(tmp_path, fields, message):
    base = dict(format="sft", packing="packed", train_files="a.jsonl", eval_files="b.jsonl")
    with pytest.raises(errors.ConfigError, match=message):
        data.DataConfig(**{**base, **fields})


def test_non_jsonl_file_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(
        errors.DataError, match=r"a.txt: with data.format='sft', data files must be .jsonl files"
    ):
        data.record_documents(str(tmp_path / "a.txt"))


@pytest.mark.slow
def test_training_on_sft_data_counts_trained_tokens(tmp_path, chat_tokenizer_dir):
    """experiments.train's path: 4 steps on chat + prompt/completion records with an HF tokenizer and its own
    ChatML template; the logged train/tokens of each step is the loss_mask sum of that step's batch (the
    trained targets), and eval scores the held-out responses."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(chat_tokenizer_dir, tok_dir)
    cfg_json = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg_json, "chat_template": chat.CHATML}))
    c = load_config("tiny")
    c.data.update(
        format="sft",
        packing="packed",
        tokenizer=str(tok_dir),
        chat_template="",
        train_files=write_jsonl(tmp_path / "train.jsonl", (CHAT + PROMPTS) * 8),
        eval_files=write_jsonl(tmp_path / "eval.jsonl", CHAT),
    )
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every, c.batch_size, c.seq_len = 4, 1, 4, 0, 8, 128
    train_config(c, tmp_path / "w")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/tokens"] for r in rows if "train/tokens" in r}
    tokenizer = data.load_tokenizer(str(tok_dir))
    exp_data = data.DataConfig(**c.data.to_dict())
    td = data.TrainData.from_config(
        exp_data, tokenizer, seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed
    )
    for step in range(1, 5):  # metrics of step s are logged at s (after s steps): batch s - 1
        mask = td.batch_for_step(step - 1, 0, 1)["loss_mask"]
        assert logged[step] == mask.sum() > 0
    ev = data.EvalData.from_config(exp_data, tokenizer, seq_len=c.seq_len, batch_size=c.batch_size)
    assert [r["eval/tokens"] for r in rows if "eval/tokens" in r] == [ev.num_tokens]
    # experiments.eval_ppl on the workdir scores the same held-out responses.
    result = evaluate_workdir(tmp_path / "w")
    assert (result["tokens"], result["bytes"]) == (ev.num_tokens, ev.num_bytes)


def test_inspect_data_command(tmp_path):
    records = [CHAT[0], PROMPTS[0], {"prompt": "p" * 130, "completion": "b"}]
    args = [
        f"--config.data.train_files={write_jsonl(tmp_path / 'a.jsonl', records)}",
        f"--config.data.eval_files={write_jsonl(tmp_path / 'b.jsonl', PROMPTS)}",
    ]
    r = run_module(
        "experiments.inspect_data",
        "--config=configs/tiny.py",
        "--config.seq_len=128",
        "--config.data.format=sft",
        "--config.data.packing=packed",
        "--config.data.chat_template=chatml",
        *args,
        "--num_rows=2",
        timeout=120,
        check=True,
    )
    lines = r.stdout.splitlines()
    chat_len = len(chat.ChatTemplate("c", chat.CHATML).render(CHAT[0]["messages"]).encode())  # bytes = tokens
    assert lines[0].startswith("source 'files': ")
    assert lines[1] == f"row 0: 1 segment(s), {chat_len - 1} of 128 positions, 26 trained"
    assert lines[2].startswith(f"  seg 1 ({chat_len} tokens, 26 trained): <·|·i·m·_·s·t·a·r·t·|·>·s·y·s")
    assert "<|im_start|>assistant\\n⟦A king, my lord.<|im_end|>⟧\\n" in lines[2].replace("·", "")
    assert lines[3].startswith("row 1: 1 segment(s)") and lines[4].replace("·", "").endswith(
        "Answer:⟦ four<eos>⟧"
    )
    summary = json.loads(lines[-1])
    assert (summary["records"], summary["kept"], summary["truncated"], summary["dropped"]) == (3, 2, 0, 1)
    assert summary["trained"] == len("A king, my lord.<|im_end|>") + len(" four") + 1


def test_inspect_data_usage_error_is_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "bot"}]}\n')
    r = run_module(
        "experiments.inspect_data",
        "--config=configs/tiny.py",
        "--config.data.format=sft",
        "--config.data.packing=packed",
        f"--config.data.train_files={tmp_path}/a.jsonl",
        f"--config.data.eval_files={write_jsonl(tmp_path / 'b.jsonl', PROMPTS)}",
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"inspect_data: {tmp_path}/a.jsonl:2: message 0 has role 'bot'" in r.stderr


def test_inspect_data_readme_example_needs_no_model_override_for_a_real_tokenizer(tmp_path, shakespeare_path):
    """The README's inspect_data command with an HF tokenizer dir larger than the config's model vocab (tiny's
    384 rows; real tokenizers have tens of thousands of ids): a data-only tool shows the rows, and says in one
    warning what training with this config would refuse, instead of stopping for --config.model.vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([shakespeare_path.read_text(encoding="utf-8")[:60000]], trainer)
    (tmp_path / "hf").mkdir()
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    r = run_module(
        "experiments.inspect_data", "--config=configs/tiny.py", "--config.seq_len=128",
        "--config.data.format=sft", "--config.data.packing=packed", f"--config.data.tokenizer={tmp_path / 'hf'}",
        f"--config.data.train_files={write_jsonl(tmp_path / 'train.jsonl', PROMPTS)}",
        f"--config.data.eval_files={write_jsonl(tmp_path / 'eval.jsonl', PROMPTS[:1])}", "--num_rows=2",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[1].startswith("row 0: ") and json.loads(r.stdout.splitlines()[-1])["kept"] == 2
    assert "training with this config would stop here" in r.stderr and "--config.model.vocab_size=" in r.stderr
