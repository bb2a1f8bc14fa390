"""Chat with a workdir: convert_hf keeps the chat template, the chat prompt is transformers'
apply_chat_template ids, generation stops at the template's end-of-turn token, and held-out exact match
(the eval hook and eval_ppl) scores greedy answers, on a model rigged to answer "Hi<|im_end|>" to a chat
and "Ok</s>" to a prompt ending in "=".

Rigged model: every attention and MLP output projection is zero, so the residual stream at a position is the
embedding of its token; token t's embedding is one-hot in dimension k(t) and the LM head row k holds the
next token, so greedy decoding follows a fixed chain: the chat prompt's last token -> "H" -> "i" -> <|im_end|>,
"=" -> "O" -> "k" -> </s>; every other token -> id 0 (<s>).
"""

import json
import shutil

import jax
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from llama_jax import checkpoint, data, errors
from llama_jax.data import chat
from llama_jax.experiment import Experiment
from llama_jax.inference import (
    chat_reply,
    chat_stops,
    encode_chat_prompt,
    evaluate_workdir,
    generate,
    load_chat_template,
    load_workdir,
)
from llama_jax.inference.exact_match import ExactMatch
from llama_jax.model import init_params, preset
from llama_jax.tools import hf
from llama_jax.train import read_metrics, train
from tests.data.conftest import chat_tokenizer_dir  # noqa: F401  (the fixture, shared with tests/data)
from tests.helpers import load_config, run_module

USER = [{"role": "user", "content": "Who art thou?"}]
PROMPT = "Say it ="


def rigged_params(cfg, tok, chat_last: int):
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(0)))  # writable copies
    for name in params:
        if name.startswith("layers_"):
            params[name]["attn"]["o_proj"]["kernel"][:] = 0
            params[name]["mlp"]["down_proj"]["kernel"][:] = 0
    params["final_norm"]["scale"][:] = 1
    emb, head = params["embed"]["embedding"], params["lm_head"]["kernel"]
    emb[:] = 0
    emb[:, 0] = 1  # k(t) = 0 for every token not in a chain: predicts id 0
    head[:] = 0
    (h,), (i,), (o,), (k,) = tok.encode("H"), tok.encode("i"), tok.encode("O"), tok.encode("k")
    im_end = tok.special_tokens()["<|im_end|>"]
    eq = tok.encode(PROMPT)[-1]
    chain = [(chat_last, h), (h, i), (i, im_end), (eq, o), (o, k), (k, tok.eos_id)]
    assert len({a for a, _ in chain}) == len(chain)  # each token one link
    for dim, (a, b) in enumerate(chain, start=1):
        emb[a] = 0
        emb[a, dim] = 1
        head[dim, b] = 1
    return params


@pytest.fixture(scope="module")
def chat_workdirs(tmp_path_factory, chat_tokenizer_dir):  # noqa: F811
    """Two imported workdirs of the rigged model: one whose HF dir has the ChatML template in
    tokenizer_config.json (transformers < 4.43), one with it as chat_template.jinja (newer)."""
    root = tmp_path_factory.mktemp("chat")
    tok = data.load_tokenizer(str(chat_tokenizer_dir))
    cfg = preset("tiny")
    chat_last = tok.encode_chat("<|im_start|>assistant\n")[-1]  # the generation prompt's last token
    params = rigged_params(cfg, tok, chat_last)
    out = {}
    for kind in ("config", "jinja"):
        hf_dir = root / f"hf_{kind}"
        hf.save_hf_llama(cfg, params, hf_dir, extra_config={"bos_token_id": 0, "eos_token_id": 1})
        shutil.copy(chat_tokenizer_dir / "tokenizer.json", hf_dir)
        tok_config = json.loads((chat_tokenizer_dir / "tokenizer_config.json").read_text())
        if kind == "config":
            tok_config["chat_template"] = chat.CHATML
        else:
            (hf_dir / "chat_template.jinja").write_text(chat.CHATML)
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
        hf.import_to_workdir(hf_dir, root / kind)
        out[kind] = root / kind
    return out


def test_convert_hf_keeps_the_chat_template(chat_workdirs):
    for kind, workdir in chat_workdirs.items():
        tok_dir = workdir / "tokenizer"
        where, source = chat.template_in_dir(str(tok_dir))
        assert source == chat.CHATML
        assert where.endswith("tokenizer_config.json" if kind == "config" else "chat_template.jinja")
        tokenizer = data.load_tokenizer(str(tok_dir))
        assert load_chat_template(workdir, tokenizer).source == chat.CHATML
    # A workdir without one names the flag that supplies one; the flag works there too.
    with pytest.raises(errors.ConfigError, match=r"has no chat template .*--chat_template=NAME \(chatml, llama3\)"):
        load_chat_template(chat_workdirs["config"].parent / "none", data.ByteTokenizer())
    assert load_chat_template(chat_workdirs["config"].parent / "none", data.ByteTokenizer(), "llama3").source == chat.LLAMA3


def test_a_template_whose_control_tokens_the_tokenizer_lacks_is_warned_about_by_name(chat_workdirs, caplog):
    tokenizer = data.load_tokenizer(str(chat_workdirs["jinja"] / "tokenizer"))  # has ChatML's tokens
    with caplog.at_level("WARNING", logger="llama_jax"):
        load_chat_template(chat_workdirs["jinja"], tokenizer, "chatml")
    assert "control tokens" not in caplog.text
    with caplog.at_level("WARNING", logger="llama_jax"):
        load_chat_template(chat_workdirs["jinja"], data.ByteTokenizer(), "chatml")
        load_chat_template(chat_workdirs["jinja"], data.ByteTokenizer(), "llama3")  # no bos_token: renders later
    assert ("chat template 'chatml' (llama_jax.data.chat.TEMPLATES) writes control tokens that the tokenizer does not "
            "have as special tokens: ['<|im_end|>', '<|im_start|>']. Each is encoded as 10 ordinary tokens") in caplog.text
    assert caplog.text.count("control tokens") == 1


@pytest.mark.parametrize("messages", [USER, [{"role": "system", "content": "Be brief."}, *USER,
                                              {"role": "assistant", "content": "A king."},
                                              {"role": "user", "content": "Truly?"}]])
def test_chat_prompt_ids_equal_transformers(chat_workdirs, messages):
    tok_dir = chat_workdirs["jinja"] / "tokenizer"
    ours = data.load_tokenizer(str(tok_dir))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    want = hf_tok.apply_chat_template(messages, chat_template=(tok_dir / "chat_template.jinja").read_text(),
                                      add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    got = encode_chat_prompt(ours, load_chat_template(chat_workdirs["jinja"], ours), messages)
    assert got == list(want)
    header = ours.encode_chat("<|im_start|>assistant\n")  # the generation prompt ends the prompt
    assert got[-len(header):] == header and ours.piece(header[0]) == "<|im_start|>"


def test_chat_reply_stops_at_end_of_turn(chat_workdirs):
    workdir = chat_workdirs["config"]
    model_config, params, tokenizer, experiment = load_workdir(workdir)
    template = load_chat_template(workdir, tokenizer)
    im_end = tokenizer.special_tokens()["<|im_end|>"]
    stops, texts = chat_stops(tokenizer, template, experiment)
    assert stops == [im_end, tokenizer.eos_id] and texts == []
    reply, ids = chat_reply(params, model_config, tokenizer, experiment, template, USER, max_new_tokens=20)
    assert reply == "Hi" and [tokenizer.piece(i) for i in ids] == ["H", "i"]
    # The decode loop itself ended at <|im_end|> (3 tokens, not 20): generate is given every stop id.
    prompt = encode_chat_prompt(tokenizer, template, USER)
    assert generate(params, model_config, [prompt], max_new_tokens=20, eos_id=stops)[0][-1] == im_end
    assert len(generate(params, model_config, [prompt], max_new_tokens=20, eos_id=stops)[0]) == 3
    # Only EOS as the stop: the model runs past <|im_end|> (it then predicts <s> forever) to the limit.
    assert len(generate(params, model_config, [prompt], max_new_tokens=20, eos_id=tokenizer.eos_id)[0]) == 20
    # The byte tokenizer has no <|im_end|> token: the end of turn is a stop text, cut after generation.
    byte = data.ByteTokenizer()
    byte_template = chat.ChatTemplate("chatml", chat.CHATML)
    assert chat_stops(byte, byte_template, {}) == ([byte.eos_id], ["<|im_end|>"])


@pytest.mark.slow
def test_sample_cli_chat(chat_workdirs, tmp_path):
    workdir = chat_workdirs["jinja"]
    r = run_module("experiments.sample", f"--workdir={workdir}", "--chat", "--prompt=Who art thou?",
                   "--temperature=0", "--max_new_tokens=20", timeout=300, check=True)
    assert r.stdout == "Hi\n"  # the reply alone: no prompt, no template text
    (tmp_path / "m.json").write_text(json.dumps([*USER, {"role": "assistant", "content": "A king."},
                                                 {"role": "user", "content": "Truly?"}]))
    r = run_module("experiments.sample", f"--workdir={workdir}", f"--messages={tmp_path / 'm.json'}",
                   "--temperature=0", "--max_new_tokens=20", "--chat_template=chatml", timeout=300, check=True)
    assert r.stdout == "Hi\n"
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "bot", "content": "x"}]))
    r = run_module("experiments.sample", f"--workdir={workdir}", f"--messages={tmp_path / 'bad.json'}", timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "sample: --messages=" in r.stderr and "message 0 is {'role': 'bot'" in r.stderr


RIGHT = [
    {"messages": [*USER, {"role": "assistant", "content": "Hi"}]},
    {"messages": [*USER, {"role": "assistant", "content": "A king."}, {"role": "user", "content": "Truly?"},
                  {"role": "assistant", "content": " Hi\n"}]},  # the last turn is the reference; stripped
    {"prompt": PROMPT, "completion": "Ok"},
]
WRONG = [
    {"messages": [*USER, {"role": "assistant", "content": "Ho"}]},
    {"messages": [*USER, {"role": "assistant", "content": "Hi there"}]},  # the model stops after "Hi"
    {"prompt": PROMPT, "completion": "Ok!"},
]


def _sft_data(tmp_path, workdir, eval_records, **fields):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_records))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RIGHT * 4))
    return data.DataConfig(format="sft", packing="packed", tokenizer=str(workdir / "tokenizer"),
                           train_files=str(tmp_path / "train.jsonl"), eval_files=str(tmp_path / "eval.jsonl"),
                           **fields)


def test_exact_match(chat_workdirs, tmp_path):
    workdir = chat_workdirs["config"]
    model_config, params, tokenizer, _ = load_workdir(workdir)
    for records, want in ((RIGHT, 1.0), (WRONG, 0.0), (RIGHT + WRONG, 0.5)):
        d = _sft_data(tmp_path, workdir, records, exact_match_records=len(records))
        exact = ExactMatch.from_config(d, tokenizer, max_seq_len=model_config.max_seq_len)
        assert exact(params, model_config, batch_size=2) == {
            "eval/exact_match": want, "eval/exact_match_records": float(len(records))}
    assert [r[1] for r in exact.results] == ["Hi", "Hi", "Ok", "Hi", "Hi", "Ok"]
    # The cap: only the first N records.
    d = _sft_data(tmp_path, workdir, WRONG + RIGHT, exact_match_records=2)
    assert ExactMatch.from_config(d, tokenizer, max_seq_len=128)(params, model_config)["eval/exact_match"] == 0.0
    # Off by default, and only for SFT records.
    assert data.DataConfig().exact_match_records == 0
    with pytest.raises(errors.ConfigError, match="data.exact_match_records needs records with reference answers"):
        data.DataConfig(exact_match_records=3)


@pytest.mark.slow
def test_fine_tune_keeps_template_and_evaluates_responses_and_exact_match(chat_workdirs, tmp_path):
    """init_from the imported chat workdir with the stock tiny config (model and tokenizer from the source),
    lr 0 so the rigged params stay: the eval hook logs eval/response_* and eval/exact_match 1.0 on RIGHT;
    the fine-tuned workdir keeps the ChatML template (its HF tokenizer_config.json is rewritten without
    it), so chat sampling works on it; eval_ppl reports the same."""
    src = chat_workdirs["config"]
    d = _sft_data(tmp_path, src, RIGHT, exact_match_records=3)
    c = load_config("tiny")
    c.data.update({k: v for k, v in d.to_dict().items() if k != "tokenizer"})  # the tokenizer: the source's
    c.init_from, c.optimizer.lr = str(src), 0.0
    c.num_steps, c.eval_every, c.checkpoint_every, c.log_every = 1, 1, 0, 1
    train(Experiment.from_config(c), tmp_path / "ft")
    rows = [r for r in read_metrics(tmp_path / "ft") if "eval/loss" in r]
    assert rows[-1]["eval/exact_match"] == 1.0 and rows[-1]["eval/exact_match_records"] == 3
    assert rows[-1]["eval/response_loss"] == rows[-1]["eval/loss"]
    assert (tmp_path / "ft" / "tokenizer" / "chat_template.jinja").read_text() == chat.CHATML
    assert checkpoint.read_config(tmp_path / "ft")["data"]["tokenizer"] == str(src / "tokenizer")
    model_config, params, tokenizer, experiment = load_workdir(tmp_path / "ft")
    template = load_chat_template(tmp_path / "ft", tokenizer)
    assert chat_reply(params, model_config, tokenizer, experiment, template, USER, max_new_tokens=8)[0] == "Hi"
    result = evaluate_workdir(tmp_path / "ft")
    assert (result["exact_match"], result["exact_match_records"]) == (1.0, 3)
    assert result["response_loss"] == result["loss"] == pytest.approx(rows[-1]["eval/loss"], rel=1e-5)
