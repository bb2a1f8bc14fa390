"""Input pipeline: exact epochs, packing, resume, multi-host slices, held-out eval byte counts, bad input."""

import hashlib
import json
import pathlib

import jax
import numpy as np
import pytest

from llama_jax import data, errors, sharding
from llama_jax.data import tokenizer as tk
from llama_jax.experiment import Experiment, base_config

VALIDATION_BYTES = 55_770  # tiny_shakespeare's validation split (ASCII, so also its characters)


class IntTokenizer(tk.Tokenizer):
    """Text "7 8 9" -> ids 10 11 12: every content token of a test corpus is unique, so a dropped or
    duplicated token cannot hide behind an identical one."""

    bos_id, eos_id, pad_id = 0, 1, 2

    @property
    def vocab_size(self):
        return 1 << 20

    def encode(self, text):
        return [int(w) + 3 for w in text.split()]

    def decode(self, ids):
        return " ".join(str(i - 3) for i in ids if i >= 3)

    def save(self, directory):
        raise NotImplementedError

    def fingerprint(self):
        return "int"


def int_docs(doc_lengths):
    """Documents "0 1 2", "3 4", ... (consecutive integers across documents)."""
    docs, k = [], 0
    for n in doc_lengths:
        docs.append(" ".join(str(k + i) for i in range(n)))
        k += n
    return data.Documents.from_texts(docs, "ints")


def int_train(doc_lengths, *, seq_len, batch_size, seed=0, **options):
    return data.TrainData.from_documents(int_docs(doc_lengths), IntTokenizer(), data.DataConfig(**options),
                                         seq_len=seq_len, batch_size=batch_size, seed=seed)


def int_stream(doc_lengths, **options):
    return data.tokenize(int_docs(doc_lengths), IntTokenizer(), **options)


def config(tmp_path=None, **data_overrides):
    c = base_config("tiny")
    c.model.vocab_size = 384
    c.batch_size, c.seq_len, c.seed = 4, 32, 0
    for k, v in data_overrides.items():
        setattr(c.data, k, v)
    return c


def train_data(c, tokenizer=None):
    """TrainData of an experiment ConfigDict, with its tokenizer checked against the model as training does."""
    exp = Experiment.from_config(c)
    tokenizer = tokenizer or data.load_tokenizer(exp.data.tokenizer)
    data.check_vocab(tokenizer, exp.model.vocab_size)
    loop = exp.loop
    return data.TrainData.from_config(exp.data, tokenizer, seq_len=loop.seq_len, batch_size=loop.batch_size,
                                      seed=loop.seed)


def eval_data(c, tokenizer=None):
    exp = Experiment.from_config(c)
    tokenizer = tokenizer or data.load_tokenizer(exp.data.tokenizer)
    return data.EvalData.from_config(exp.data, tokenizer, seq_len=exp.loop.seq_len, batch_size=exp.eval_batch_size)


@pytest.fixture(scope="session")
def tfds_cfg(tfds_data_dir, tfds_manual_dir):
    """A config reading tiny_shakespeare from the session's TFDS dir (built once, offline)."""
    c = config(data_dir=str(tfds_data_dir), manual_dir=str(tfds_manual_dir))
    data.tfds_builder("tiny_shakespeare", c.data.data_dir, c.data.manual_dir)
    return c


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, shakespeare_path):
    return tk.train_sentencepiece(
        [shakespeare_path.read_text()[:30000]], tmp_path_factory.mktemp("sp"), vocab_size=600
    )


def flat_rows(train, steps):
    """All rows of steps 0..steps-1 in global sample order, as one batch dict."""
    batches = [train.batch_for_step(s, 0, 1) for s in range(steps)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------- epochs


# Shards of 2 documents, shuffled 2 at a time (windows of 2 shards), or one shard of all documents.
SHARDINGS = [{}, dict(shard_docs=2, shuffle_shards=2)]


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_every_token_is_a_target_exactly_once_per_epoch(packing, sharding):
    lengths = [5, 1, 40, 0, 17, 9, 3]
    train = int_train(lengths, seq_len=8, batch_size=3, seed=1, packing=packing, **sharding)
    src = train.sources["docs"]
    assert len(src.shards) == (1 if not sharding else 4) and len(src.windows) == (1 if not sharding else 2)
    expected = []
    for shard in src.shards:
        w = shard.stream()
        tokens = np.asarray(w.tokens)
        # concat: all but the shard's first token; packed: all but each document's first (its BOS).
        expected.append(tokens[1:] if packing == "concat" else np.delete(tokens, w.doc_starts[:-1]))
    expected = np.sort(np.concatenate(expected))
    R = train.rows_per_epoch
    got = flat_rows(train, steps=R + 1)  # 3R + 3 rows: a bit more than 3 epochs
    pairs = np.concatenate([train.rows_for_step(s, 0, 1) for s in range(R + 1)])
    for e in range(3):
        sl = slice(e * R, (e + 1) * R)
        mask = got["loss_mask"][sl] > 0
        targets = got["targets"][sl][mask]
        assert np.array_equal(np.sort(targets), expected)
        content = targets[targets >= 3]
        assert len(np.unique(content)) == len(content) == sum(lengths)  # every content token once
        # Targets are the next token after inputs: inside a segment, inputs[t+1] == targets[t].
        same_seg = (got["segment_ids"][sl][:, 1:] == got["segment_ids"][sl][:, :-1]) & mask[:, 1:]
        assert np.array_equal(got["inputs"][sl][:, 1:][same_seg], got["targets"][sl][:, :-1][same_seg])
        # Each epoch reads every (window, row) once.
        assert len({tuple(p) for p in pairs[sl]}) == R
    # The order differs between epochs, and with the seed.
    assert not np.array_equal(pairs[:R], pairs[R : 2 * R])
    other = int_train(lengths, seq_len=8, batch_size=3, seed=2, packing=packing, **sharding)
    assert not np.array_equal(
        np.concatenate([other.rows_for_step(s, 0, 1) for s in range(R // 3)]), pairs[: R // 3 * 3]
    )


def test_rows_per_epoch_and_the_epoch_layout():
    train = int_train([100], seq_len=10, batch_size=4)  # 102 tokens: 101 targets
    assert train.rows_per_epoch == 11  # ceil(101 / 10); the last row has 1 target and 9 padded positions
    assert train.steps_per_epoch == 11 / 4
    rows = np.concatenate([train.rows_for_step(s, 0, 1)[:, 2] for s in range(11)])  # 44 = 4 epochs exactly
    for e in range(4):
        assert sorted(rows[e * 11 : (e + 1) * 11]) == list(range(11))
    stream, window_rows = train.sources["docs"].shard(0)
    last = data.gather(stream.tokens, window_rows, np.array([10]), pad_id=2)
    assert last["loss_mask"][0].tolist() == [1] + [0] * 9
    assert last["segment_ids"][0].tolist() == [1] + [0] * 9


def test_packed_segments_positions_and_padding():
    stream = int_stream([3, 2, 20, 1])  # docs of 5, 4, 22, 3 tokens with BOS and EOS
    rows = data.build_rows(stream, seq_len=8, packing="packed")
    b = data.gather(stream.tokens, rows, np.arange(rows.num_rows), pad_id=2)
    tokens = np.asarray(stream.tokens)
    doc_of = np.searchsorted(stream.doc_starts, np.arange(len(tokens)), side="right") - 1
    for r in range(rows.num_rows):
        seg, pos, mask = b["segment_ids"][r], b["positions"][r], b["loss_mask"][r]
        real = seg > 0
        assert np.array_equal(mask > 0, real)  # padding: segment 0 and loss_mask 0
        assert np.all(b["inputs"][r][~real] == 2) and np.all(pos[~real] == 0)
        for s in np.unique(seg[real]):
            cols = np.flatnonzero(seg == s)
            assert np.array_equal(pos[cols], np.arange(len(cols)))  # positions restart per segment
            # A segment's targets all come from one document.
            src = [np.flatnonzero(tokens == t)[0] for t in b["targets"][r, cols] if t >= 3]
            assert len({doc_of[i] for i in src}) <= 1
    # First row: doc0 (4 targets) + doc1 (3 targets) fit 8 positions; doc2 is cut into pieces of 8.
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert b["inputs"][0, :4].tolist() == [0, 3, 4, 5] and b["targets"][0, :4].tolist() == [3, 4, 5, 1]


# ---------------------------------------------------------------------------------------------- resume


def _hash(batch):
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_resume_replays_the_same_batches_across_an_epoch_boundary(sharding):
    lengths = [7, 30, 12, 4, 25]
    opts = dict(seq_len=6, batch_size=3, seed=5, packing="packed", **sharding)
    train = int_train(lengths, **opts)
    n = 15
    with train.iterator(0) as it:
        straight = [_hash(next(it)) for _ in range(n)]
    boundary = int(np.ceil(train.rows_per_epoch / 3))
    assert 3 < boundary < n - 3  # steps 0..14 cross an epoch boundary
    for k in (2, boundary - 1, boundary, boundary + 2):
        with int_train(lengths, **opts).iterator(0, prefetch=0) as it:
            for _ in range(k):
                next(it)
            state = json.loads(json.dumps(it.state()))  # what the checkpoint's JSON item stores
        assert state["step"] == k
        with int_train(lengths, **opts).iterator(state) as resumed:
            assert [_hash(next(resumed)) for _ in range(n - k)] == straight[k:]
        assert _hash(int_train(lengths, **opts).batch_for_step(k)) == straight[k]  # a pure function of k


def test_resume_with_a_different_data_config_is_refused():
    a = int_train([40], seq_len=6, batch_size=2)
    b = int_train([40], seq_len=6, batch_size=4)
    with pytest.raises(errors.DataError, match="different data config"):
        b.iterator(a.iterator(3).state())
    assert b.iterator(3).step == 3  # an int resumes regardless


# ---------------------------------------------------------------------------------------------- multi-host


@pytest.mark.parametrize("sharding", [{}, dict(shard_docs=1, shuffle_shards=1)])
def test_two_hosts_read_disjoint_rows_that_make_the_global_batch(sharding):
    train = int_train([50, 20, 33], seq_len=8, batch_size=4, seed=3, packing="packed", **sharding)
    for step in (0, 5, 17):
        whole = train.batch_for_step(step, 0, 1)
        parts = [train.batch_for_step(step, p, 2) for p in range(2)]
        ids = [{tuple(r) for r in train.rows_for_step(step, p, 2)} for p in range(2)]
        assert not ids[0] & ids[1]
        for k in whole:
            assert parts[0][k].shape == (2, 8)
            assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
        assert np.array_equal(train.batch_for_step(step, rows=slice(2, 4))["inputs"], parts[1]["inputs"])
    with pytest.raises(errors.DataError, match="divisible"):
        train.batch_for_step(0, 0, 3)


def test_two_hosts_eval():
    ev = data.eval_windows(int_docs([50, 20, 33]), IntTokenizer(), seq_len=8, batch_size=4)
    one = list(ev.batches(0, 1))
    two = [list(ev.batches(p, 2)) for p in range(2)]
    assert len(two[0]) == len(two[1]) == len(one)  # every host runs the same number of eval steps
    for i, whole in enumerate(one):
        for k in whole:
            assert np.array_equal(np.concatenate([two[0][i][k], two[1][i][k]]), whole[k])


def test_batches_become_global_arrays_on_emulated_devices():
    train = int_train([60], seq_len=4, batch_size=8)
    local = train.batch_for_step(1)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    g = sharding.shard_batch(local, mesh)
    assert g["inputs"].shape == (8, 4) and len(g["inputs"].sharding.device_set) == len(jax.devices())
    assert np.array_equal(np.asarray(g["targets"]), local["targets"])


# ---------------------------------------------------------------------------------------------- eval


def test_eval_covers_the_validation_split_once_with_exact_bytes(tfds_cfg, shakespeare_path):
    c = tfds_cfg.copy_and_resolve_references()
    c.batch_size, c.seq_len = 16, 128
    ev = eval_data(c)
    assert ev.num_bytes == VALIDATION_BYTES
    assert ev.num_tokens == VALIDATION_BYTES + 1  # every byte and the EOS; BOS is never scored
    batches = list(ev.batches(0, 1))
    num_rows = -(-(VALIDATION_BYTES + 1) // 128)  # BOS text EOS: 55,771 targets in rows of 128
    assert len(batches) == ev.num_batches == -(-num_rows // 16)
    mask = np.concatenate([b["loss_mask"] for b in batches]) > 0
    targets = np.concatenate([b["targets"] for b in batches])[mask]
    assert int(mask.sum()) == ev.num_tokens
    assert sum(int(b["target_bytes"].sum()) for b in batches) == VALIDATION_BYTES
    # In order, no shuffling: the scored bytes are the split's text.
    text = bytes(targets[targets < 256].astype(np.uint8)).decode()
    full = shakespeare_path.read_text()
    assert len(text) == VALIDATION_BYTES and text in full
    assert targets[-1] == 257
    assert batches[-1]["loss_mask"][-1].sum() == 0  # the last batch is padded with empty rows


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_eval_bytes_without_bos_exclude_the_first_token(tfds_cfg, packing):
    c = tfds_cfg.copy_and_resolve_references()
    c.data.add_bos, c.data.packing = False, packing
    ev = eval_data(c)
    assert ev.num_bytes == VALIDATION_BYTES - 1  # the first byte has no context: not scored
    assert ev.num_tokens == VALIDATION_BYTES  # the other bytes and the EOS


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_eval_bytes_with_a_bpe_tokenizer(tfds_cfg, sp_tokenizer, packing):
    c = tfds_cfg.copy_and_resolve_references()
    c.data.packing, c.model.vocab_size = packing, 640
    ev = eval_data(c, sp_tokenizer)
    assert ev.num_bytes == VALIDATION_BYTES
    batches = list(ev.batches())
    assert sum(int(b["target_bytes"].sum()) for b in batches) == VALIDATION_BYTES
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    assert ev.num_tokens == len(targets) < 0.7 * VALIDATION_BYTES  # subwords, not bytes
    assert len(sp_tokenizer.decode(targets.tolist()).encode()) == VALIDATION_BYTES


def test_bytes_are_exact_for_multibyte_text_and_many_documents(tmp_path):
    docs = ["héllo wörld", "", "日本語のテキスト", "plain ascii", "🙂🙃"]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": "x" * 50}) for _ in range(3)))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    for packing in ("concat", "packed"):
        c = config(train_files=str(tmp_path / "train.jsonl"), eval_files=str(tmp_path / "eval.jsonl"))
        c.seq_len, c.data.packing = 5, packing
        ev = eval_data(c)
        assert ev.num_bytes == sum(len(d.encode()) for d in docs)
        # Scored: every byte and every EOS; never a BOS (it follows an EOS by construction).
        assert ev.num_tokens == ev.num_bytes + len(docs)
        scored = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in ev.batches(0, 1)])
        assert 256 not in scored and np.sum(scored == 257) == len(docs)
        assert sum(int(b["target_bytes"].sum()) for b in ev.batches(0, 1)) == ev.num_bytes


# ---------------------------------------------------------------------------------------------- sources


def test_tiny_shakespeare_train_split_through_the_token_cache(tfds_cfg, tmp_path):
    c = tfds_cfg.copy_and_resolve_references()
    in_memory = train_data(c)
    c.data.cache_dir = str(tmp_path / "cache")
    train = train_data(c)  # builds the cache
    stream, _ = train.sources["tiny_shakespeare"].shard(0)
    assert stream.num_docs == 1 and isinstance(stream.tokens, data.TokenFile)  # read by range, not loaded
    n = len(stream.tokens)
    assert train.rows_per_epoch == -(-(n - 1) // c.seq_len) > 30_000
    cached = train_data(c)  # second time: read back from the cache
    for step in (0, 123):
        assert _hash(cached.batch_for_step(step)) == _hash(train.batch_for_step(step))
        assert _hash(in_memory.batch_for_step(step)) == _hash(train.batch_for_step(step))
    assert train.batch_for_step(0)["inputs"].shape == (c.batch_size, c.seq_len)


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("one whole document\nwith lines")
    (tmp_path / "b.txt").write_text("another")
    (tmp_path / "e.jsonl").write_text('{"body": "held out"}\n\n{"body": "docs"}\n')
    c = config(train_files=str(tmp_path / "*.txt"), eval_files=str(tmp_path / "e.jsonl"), text_key="body")
    c.seq_len = 4
    train = train_data(c)
    assert [s.shard(i)[0].doc_bytes.tolist() for s in train.sources.values() for i in (0, 1)] == [[29], [7]]
    ev = eval_data(c)
    assert ev.stream.num_docs == 2 and ev.num_bytes == len("held out") + len("docs")


def test_local_files_train_without_tfds(tmp_path):
    """Local files need no TensorFlow Datasets: the package imports and batches text with TFDS missing (a
    GPU image with jax and flax but no TFDS, as on the H200 the GPU config was measured on)."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "train.txt").write_text("to be or not to be " * 50)
    (tmp_path / "eval.txt").write_text("that is the question")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow_datasets"] = None  # any import of it raises ImportError
        from llama_jax import data
        from llama_jax.experiment import Experiment, base_config
        import llama_jax.train
        c = base_config("tiny")
        c.seq_len, c.batch_size = 16, 2
        c.data.train_files, c.data.eval_files = {str(tmp_path / "train.txt")!r}, {str(tmp_path / "eval.txt")!r}
        exp = Experiment.from_config(c)
        tok = data.load_tokenizer(exp.data.tokenizer)
        batch = data.TrainData.from_config(exp.data, tok, seq_len=16, batch_size=2, seed=0).batch_for_step(0)
        assert batch["inputs"].shape == (2, 16)
        assert "tensorflow_datasets" not in [m for m, v in sys.modules.items() if v is not None]
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[2])


def test_split_slices_and_leak_check(tfds_cfg):
    c = tfds_cfg.copy_and_resolve_references()
    c.data.train_split, c.data.eval_split = "train+test", "validation"
    assert len(train_data(c).sources["tiny_shakespeare"].shards) == 1  # train and test: 2 documents
    assert data.documents_for_role(Experiment.from_config(c).data, "train").num_docs == 2
    c.data.eval_split = "test"
    with pytest.raises(errors.DataError, match="overlaps train split"):
        eval_data(c)


# ---------------------------------------------------------------------------------------------- bad input


def test_vocab_mismatch_is_reported_before_reading(tfds_cfg):
    c = tfds_cfg.copy_and_resolve_references()
    c.model.vocab_size = 256
    with pytest.raises(errors.TokenizerError, match="--config.model.vocab_size=259"):
        train_data(c)


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(errors.DataError, match="Did you mean: tiny_shakespeare"):
        train_data(config(tfds_name="tiny_shakespear"))


def test_missing_text_key_lists_features(tfds_cfg):
    c = tfds_cfg.copy_and_resolve_references()
    c.data.text_key = "content"
    with pytest.raises(errors.DataError, match=r"features are \['text'\]"):
        train_data(c)


def test_bad_and_empty_splits(tfds_cfg):
    c = tfds_cfg.copy_and_resolve_references()
    c.data.train_split = "trian"
    with pytest.raises(errors.DataError, match="Available splits: .*'train'"):
        train_data(c)
    c.data.train_split = "train[:0]"
    with pytest.raises(errors.DataError, match="is empty"):
        train_data(c)


def test_manual_dir_without_input_txt(tmp_path):
    (tmp_path / "manual").mkdir()
    c = config(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    with pytest.raises(errors.DataError, match="has no input.txt: copy .*input.txt"):
        train_data(c)


def test_local_file_errors(tmp_path):
    with pytest.raises(errors.DataError, match="no file matches"):
        train_data(config(train_files=str(tmp_path / "nope.txt"), eval_files=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "e.txt").write_text("some held-out text")
    with pytest.raises(errors.DataError, match="has no text"):
        train_data(config(train_files=str(tmp_path / "empty.txt"), eval_files=str(tmp_path / "e.txt")))
    (tmp_path / "t.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(errors.DataError, match=r"no field 'text'; its fields are \['content'\]"):
        train_data(config(train_files=str(tmp_path / "t.jsonl"), eval_files=str(tmp_path / "e.txt")))
    with pytest.raises(errors.DataError, match="eval_files"):
        eval_data(config(train_files=str(tmp_path / "e.txt")))
    with pytest.raises(errors.DataError, match="eval files are also training files"):
        eval_data(config(train_files=str(tmp_path / "*.txt"), eval_files=str(tmp_path / "e.txt")))


def test_bad_packing_and_missing_special_tokens(tmp_path):
    (tmp_path / "t.txt").write_text("text " * 20)
    (tmp_path / "e.txt").write_text("held out")
    files = dict(train_files=str(tmp_path / "t.txt"), eval_files=str(tmp_path / "e.txt"))
    with pytest.raises(errors.ConfigError, match="data.packing='greedy' is not one of"):
        train_data(config(packing="greedy", **files))

    class NoSpecials(IntTokenizer):
        bos_id = eos_id = pad_id = None

    c = config(**files)
    c.model.vocab_size = NoSpecials().vocab_size
    with pytest.raises(errors.DataError, match="add_bos=False"):
        train_data(c, NoSpecials())


def test_text_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))  # é is the lone byte 0xe9
    with pytest.raises(errors.DataError, match=r"latin1\.txt is not valid UTF-8: byte 0xe9 at byte offset 3"):
        data.file_documents(str(tmp_path / "latin1.txt"))
    # In a .jsonl file the offset counts from the start of the file, not of the line.
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(errors.DataError, match=r"d\.jsonl is not valid UTF-8: byte 0xe9 at byte offset 28"):
        data.file_documents(str(tmp_path / "d.jsonl"))


def test_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n\n{"text": "cut off\n{"text": "fine"}\n')
    with pytest.raises(errors.DataError, match=r"d\.jsonl:3: not valid JSON"):
        data.file_documents(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n["text", "x"]\n')
    with pytest.raises(errors.DataError, match=r"d\.jsonl:2: is an array, not a JSON object"):
        data.file_documents(str(tmp_path / "d.jsonl"))


@pytest.mark.parametrize("value, found", [("3", "a number"), ('["a", "b"]', "an array"), ("null", "null")])
def test_jsonl_text_field_that_is_not_a_string(tmp_path, value, found):
    (tmp_path / "d.jsonl").write_text(f'{{"body": "ok"}}\n{{"body": {value}}}\n')
    with pytest.raises(errors.DataError, match=rf"d\.jsonl:2: field 'body' is {found}, not a string"):
        data.file_documents(str(tmp_path / "d.jsonl"), text_key="body")


def test_an_eval_file_that_links_to_a_training_file_is_a_leak(tmp_path):
    (tmp_path / "train.txt").write_text("some training text " * 10)
    (tmp_path / "eval.txt").symlink_to(tmp_path / "train.txt")
    with pytest.raises(errors.DataError, match="eval files are also training files"):
        eval_data(config(train_files=str(tmp_path / "train.txt"), eval_files=str(tmp_path / "eval.txt")))


def test_a_tfds_build_says_what_it_is_doing(tmp_path, tfds_manual_dir, caplog):
    """Online, TFDS retries downloads for minutes; the project says first what it is building and the fix."""
    with caplog.at_level("INFO", logger="llama_jax"):
        data.tfds_builder("tiny_shakespeare", str(tmp_path / "tfds"), str(tfds_manual_dir))
    assert f"building TFDS dataset tiny_shakespeare/1.0.0 into {tmp_path / 'tfds'}" in caplog.text
    assert f"from {tfds_manual_dir}" in caplog.text
