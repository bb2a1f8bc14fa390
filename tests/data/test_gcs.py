"""A real bucket API (the GCS emulator on localhost, tests/conftest.py): shards and the token cache on gs://,
a mixture of a bucket source and a local one trained end to end, and a bucket without credentials."""

import http.server
import json
import os
import shutil
import threading

import gcsfs
import numpy as np
import pytest

from llama_jax import data, errors
from llama_jax.experiment import base_config
from llama_jax.inference import evaluate_workdir
from tests.data.test_files import write_shard
from tests.helpers import train_config


def local_corpus(tmp_path):
    """web: 3 parquet shards + held-out; books: 2 .jsonl.zst shards + held-out."""
    d = tmp_path / "corpus"
    (d / "web").mkdir(parents=True)
    (d / "books").mkdir()
    for i in range(3):
        write_shard(d / "web" / f"part-{i}.parquet", [f"web page {i}.{j} " + "link " * (j % 9) for j in range(30)])
    write_shard(d / "web" / "heldout.parquet", ["a held-out web page", "and another one"])
    for i in range(2):
        write_shard(d / "books" / f"b{i}.jsonl.zst", [f"chapter {i}.{j} " + "once upon " * (j % 5) for j in range(20)])
    write_shard(d / "books" / "heldout.jsonl", ["the end of a book"])
    return d


def mixture_config(web: str, books: str, cache_dir: str):
    c = base_config("tiny")
    c.model.vocab_size = 384
    c.batch_size, c.seq_len, c.num_steps, c.eval_every, c.checkpoint_every, c.log_every = 8, 32, 4, 2, 2, 2
    c.data.sources = {
        "web": {"train_files": f"{web}/part-*.parquet", "eval_files": f"{web}/heldout.parquet", "weight": 0.75},
        "books": {"train_files": f"{books}/b*.jsonl.zst", "eval_files": f"{books}/heldout.jsonl", "weight": 0.25},
    }
    c.data.cache_dir, c.data.mixture_block = cache_dir, 8
    return c


@pytest.mark.slow
def test_train_from_bucket_shards_and_a_bucket_cache(tmp_path, gcs_emulator):
    d = local_corpus(tmp_path)
    bucket = gcs_emulator()
    fs = gcsfs.GCSFileSystem()
    fs.put(str(d / "web"), f"{bucket}/web", recursive=True)
    c = mixture_config(f"{bucket}/web", str(d / "books"), f"{bucket}/cache")
    metrics = train_config(c, tmp_path / "run")
    assert metrics["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/loss" in r][-1]
    for name in ("web", "books"):
        assert ev[f"eval/{name}/loss"] > 0 and ev[f"eval/{name}/bits_per_byte"] > 0
    total = (ev["eval/web/loss"] * ev["eval/web/tokens"] + ev["eval/books/loss"] * ev["eval/books/tokens"]) / (
        ev["eval/web/tokens"] + ev["eval/books/tokens"])
    assert ev["eval/loss"] == pytest.approx(total, rel=1e-9)
    assert ev["eval/web/bytes"] == len("a held-out web page") + len("and another one")
    logged = [r for r in rows if "data/web/tokens" in r][-1]
    assert logged["data/web/tokens"] == 3 * logged["data/books/tokens"] == 4 * 6 * 32  # 6 of 8 rows a step
    assert logged["data/books/epochs"] > 0
    # experiments.eval_ppl's function scores each source's held-out set as the training run did.
    result = evaluate_workdir(tmp_path / "run")
    assert sorted(result["sets"]) == ["books", "web"]
    for key in ("loss", "bits_per_byte", "tokens"):
        assert result[key] == pytest.approx(ev[f"eval/{key}"], rel=1e-5)
        assert result["sets"]["web"][key] == pytest.approx(ev[f"eval/web/{key}"], rel=1e-5)
    # The caches live in the bucket, one per source and role.
    for name, shards in (("web", 3), ("books", 2)):
        assert len(fs.glob(f"{bucket}/cache/{name}/train/shard-*.done.json")) == shards
        assert fs.exists(f"{bucket}/cache/{name}/eval/manifest.json")
    # Reading the bucket gives exactly what the same shards give from local disk.
    tok = data.ByteTokenizer()
    remote = data.DataConfig.from_dict(c.data.to_dict())
    local = remote.replace(sources={**remote.sources, "web": {**remote.sources["web"],
                           "train_files": str(d / "web" / "part-*.parquet"),
                           "eval_files": str(d / "web" / "heldout.parquet")}}, cache_dir="")
    a = data.TrainData.from_config(remote, tok, seq_len=32, batch_size=8, seed=0)
    b = data.TrainData.from_config(local, tok, seq_len=32, batch_size=8, seed=0)
    for step in range(6):
        x, y = a.batch_for_step(step, 0, 1), b.batch_for_step(step, 0, 1)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert isinstance(a.sources["web"].shard(0)[0].tokens, data.TokenFile)  # read from the bucket by range


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have storage.objects.list "
                                     "access to the Google Cloud Storage bucket."}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # gcsfs gave up on the request: fine
            pass

    do_GET = do_POST = do_PUT = _deny

    def log_message(self, *args):
        pass


def test_a_bucket_without_credentials_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        cfg = data.DataConfig(train_files="gs://private/corpus/*.parquet", eval_files="gs://private/heldout.jsonl")
        with pytest.raises(errors.DataError, match=r"no access to gs://private/corpus/\*\.parquet .*"
                                                    r"gcloud auth application-default login.*GOOGLE_APPLICATION_CREDENTIALS"):
            data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=8, batch_size=2, seed=0)
        with pytest.raises(errors.DataError, match=r"no access to gs://private/one\.parquet .*gcloud auth"):
            data.file_documents("gs://private/one.parquet")  # not "no file matches": it may exist
        (tmp_path / "t.txt").write_text("local text")
        (tmp_path / "e.txt").write_text("held out")
        cfg = data.DataConfig(train_files=str(tmp_path / "t.txt"), eval_files=str(tmp_path / "e.txt"),
                              cache_dir="gs://private/cache")
        with pytest.raises(errors.DataError, match=r"data.cache_dir: no access to gs://private/cache/files/train/"
                                                    r"manifest\.json .*gcloud auth"):
            data.TrainData.from_config(cfg, data.ByteTokenizer(), seq_len=8, batch_size=2, seed=0)
    finally:
        server.shutdown()
        gcsfs.GCSFileSystem.clear_instance_cache()


def test_a_local_cache_survives_a_moved_corpus_only_if_nothing_changed(tmp_path):
    """The cache records each shard's size and mtime; a copy with new mtimes is another corpus to it."""
    d = local_corpus(tmp_path)
    c = data.DataConfig.from_dict(mixture_config(str(d / "web"), str(d / "books"), str(tmp_path / "c")).data.to_dict())
    data.TrainData.from_config(c, data.ByteTokenizer(), seq_len=32, batch_size=8, seed=0)
    shutil.copy(d / "books" / "b0.jsonl.zst", tmp_path / "b0")
    os.replace(tmp_path / "b0", d / "books" / "b0.jsonl.zst")  # same bytes, a new mtime
    with pytest.raises(errors.DataError, match=r"b0\.jsonl\.zst changed after the token cache"):
        data.TrainData.from_config(c, data.ByteTokenizer(), seq_len=32, batch_size=8, seed=0)
