"""Named held-out sets (data.eval_sets): validation, each set held out and scored as if alone, exact counts."""

import json

import numpy as np
import pytest

from llama_jax import data, errors

TEXTS = {
    "prose": ["Ünïcödé prose, with a few multibyte characters — and dashes.\n", "A second document.\n"],
    "code": ["def f(x):\n    return x + 1\n", "", "print('hi')\n"],
}


@pytest.fixture
def files(tmp_path):
    """A training file, its held-out file, and two more held-out sets: prose (.jsonl) and code (.txt files)."""
    (tmp_path / "train.txt").write_text("To be, or not to be: that is the question.\n" * 50, encoding="utf-8")
    (tmp_path / "eval.txt").write_text("Whether 'tis nobler in the mind to suffer\n" * 5, encoding="utf-8")
    with open(tmp_path / "prose.jsonl", "w", encoding="utf-8") as f:
        for t in TEXTS["prose"]:
            f.write(json.dumps({"body": t}) + "\n")
    (tmp_path / "code").mkdir()
    for i, t in enumerate(TEXTS["code"]):
        (tmp_path / "code" / f"{i}.py").write_text(t, encoding="utf-8")
    return tmp_path


def config(root, **options):
    eval_sets = {"prose": {"files": str(root / "prose.jsonl"), "text_key": "body"},
                 "code": {"files": str(root / "code" / "*.py")}}
    return data.DataConfig(train_files=str(root / "train.txt"), eval_files=str(root / "eval.txt"),
                           eval_sets=eval_sets, **options)


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_each_set_is_scored_as_if_alone_with_exact_bytes(files, packing):
    cfg = config(files, packing=packing)
    sets = data.eval_sets(cfg, data.ByteTokenizer(), seq_len=16, batch_size=4)
    assert list(sets) == ["files", "code", "prose"]  # the source's own, then data.eval_sets in name order
    for name, texts in TEXTS.items():
        alone = data.eval_windows(data.Documents.from_texts(texts), data.ByteTokenizer(), cfg, seq_len=16,
                                  batch_size=4)
        nbytes = sum(len(t.encode()) for t in texts)
        assert (sets[name].num_tokens, sets[name].num_bytes) == (nbytes + len(texts), nbytes)  # + one EOS each
        assert (alone.num_tokens, alone.num_bytes) == (sets[name].num_tokens, sets[name].num_bytes)
        for a, b in zip(sets[name].batches(0, 1), alone.batches(0, 1), strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
    own = (files / "eval.txt").read_text()
    assert sets["files"].num_bytes == len(own.encode())
    documents = data.held_out_documents(cfg)
    assert list(documents) == list(sets) and [len(d) for d in documents.values()] == [1, 3, 2]
    assert list(data.source_documents(cfg, "eval")) == ["files"]  # the sources' own only
    assert list(data.held_out_documents(cfg, ["prose", "files"])) == ["prose", "files"]
    with pytest.raises(errors.DataError, match=r"no held-out set named \['wiki'\]; this config has \['files', "
                                               r"'code', 'prose'\]"):
        data.held_out_documents(cfg, ["wiki"])


def test_a_set_never_feeds_training(files):
    cfg = config(files)
    td = data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=16, batch_size=4, seed=0)
    alone = data.TrainData.from_config(cfg.replace(eval_sets={}), data.ByteTokenizer(), seq_len=16, batch_size=4,
                                       seed=0)
    assert td.fingerprint == alone.fingerprint  # adding held-out sets does not change the training data
    for step in range(3):
        for k, v in td.batch_for_step(step, 0, 1).items():
            np.testing.assert_array_equal(v, alone.batch_for_step(step, 0, 1)[k], err_msg=k)


def test_a_training_file_as_a_held_out_set_is_a_leak(files):
    cfg = data.DataConfig(train_files=str(files / "train.txt"), eval_files=str(files / "eval.txt"),
                          eval_sets={"oops": {"files": str(files / "*.txt")}})
    with pytest.raises(errors.DataError, match=r"data.eval_sets.oops are also training files: \[.*train.txt'\]"):
        data.eval_sets(cfg, data.ByteTokenizer(), seq_len=16, batch_size=4)


def test_a_tfds_set_is_checked_against_the_train_split(tfds_data_dir, tfds_manual_dir):
    where = {"data_dir": str(tfds_data_dir), "manual_dir": str(tfds_manual_dir)}
    data.tfds_builder("tiny_shakespeare", **where)
    bad = data.DataConfig(**where, train_split="train+test", eval_sets={"test": {"split": "test"}})
    with pytest.raises(errors.DataError, match=r"data.eval_sets.test.split 'test' overlaps train split 'train\+test' "
                                               r"\(examples 0..0 of 'test'\)"):
        data.check_no_leak(bad)
    cfg = data.DataConfig(**where, eval_sets={"test": {"split": "test"}})
    sets = data.eval_sets(cfg, data.ByteTokenizer(), seq_len=128, batch_size=4)
    test_text = next(iter(data.tfds_documents("tiny_shakespeare", "test", **where)))
    assert list(sets) == ["tiny_shakespeare", "test"]
    assert sets["test"].num_bytes == len(test_text.encode()) and sets["test"].num_tokens == sets["test"].num_bytes + 1


@pytest.mark.parametrize("sets, message", [
    ({"x": {}}, r"data.eval_sets.x must give either files .* or a TFDS split .*, not neither"),
    ({"x": {"files": "a.txt", "split": "test"}}, r"data.eval_sets.x must give either .* not both"),
    ({"x": {"files": "a.txt", "tfds_name": "c4"}}, r"data.eval_sets.x must give either .* not both"),
    ({"x": {"tfds_name": "c4"}}, r"data.eval_sets.x names tfds_name='c4': give its split too"),
    ({"x": {"file": "a.txt"}}, r"unknown field\(s\) \['file'\] in data.eval_sets.x; a held-out set sets \['files'"),
    ({"a/b": {"files": "a.txt"}}, r"set name 'a/b' may hold only letters, digits, _ . - .*; rename it"),
    ({"mean": {"files": "a.txt"}}, r"set name 'mean' .* may not be mean or total"),
    ({"tiny_shakespeare": {"split": "test"}}, r"data.eval_sets.tiny_shakespeare: 'tiny_shakespeare' is already a "
                                              r"source's name .*; give the set another name"),
])
def test_bad_sets_are_one_clear_error(sets, message):
    with pytest.raises(errors.ConfigError, match=message):
        data.DataConfig(eval_sets=sets)


def test_a_set_inherits_where_and_how_to_read_from_the_section():
    cfg = data.DataConfig(data_dir="/tfds", manual_dir="/manual", text_key="content",
                          eval_sets={"test": {"split": "test"}, "web": {"files": "w/*.jsonl", "text_key": "t"}})
    test, web = sorted(cfg.eval_set_configs(), key=lambda c: c.name)
    assert (test.tfds_name, test.eval_split, test.data_dir, test.manual_dir, test.text_key) == (
        "tiny_shakespeare", "test", "/tfds", "/manual", "content")
    assert (web.eval_files, web.text_key, web.train_files, web.train_split, web.weight) == ("w/*.jsonl", "t", "", "", 0)


def test_a_set_is_read_through_the_token_cache(files):
    """With data.cache_dir a set is tokenized once into CACHE/NAME/eval and scores the same rows."""
    cache = files / "cache"
    cached = data.eval_sets(config(files, cache_dir=str(cache)), data.ByteTokenizer(), seq_len=16, batch_size=4)
    plain = data.eval_sets(config(files), data.ByteTokenizer(), seq_len=16, batch_size=4)
    assert sorted(p.name for p in cache.iterdir()) == ["code", "files", "prose"]
    assert (cache / "prose" / "eval").is_dir() and not (cache / "prose" / "train").exists()
    for name, ev in plain.items():
        assert (cached[name].num_tokens, cached[name].num_bytes) == (ev.num_tokens, ev.num_bytes)
        for a, b in zip(cached[name].batches(0, 1), ev.batches(0, 1), strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
