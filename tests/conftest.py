"""Test setup: the CPU with 8 emulated devices (set before jax is imported) and the shared tiny-shakespeare data."""

import itertools
import logging
import os
import pathlib
import shutil
import socket

# 8 emulated devices share 2 cores: on a loaded machine a collective's 8 threads can take longer than
# XLA:CPU's default 40 s to meet, and it then aborts the process (seen in a sweep's eval step).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# With libtpu installed (the `tpu` extra, for the planner tests) jax would otherwise probe for a TPU: the
# suite runs on the CPU, and compiles for TPU topologies only as ahead-of-time targets (tools/tpu.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llama_jax.model import init_params, preset
from llama_jax.tools import hf
from tests.helpers import SHAKESPEARE, load_config, train_config


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_in_a_temp_dir(tmp_path_factory):
    """The commands the tests run in subprocesses (experiments.*) keep jax's persistent compilation cache,
    which experiments/cli.py turns on by default in ~/.cache, in this session's temp dir: the suite never
    writes to the user's home. In-process tests keep jax's default (no persistent cache): jax read
    JAX_COMPILATION_CACHE_DIR when it was imported above."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_compilation_cache"))


@pytest.fixture(scope="session")
def shakespeare_path() -> pathlib.Path:
    assert SHAKESPEARE.exists(), f"tests read tiny-shakespeare from {SHAKESPEARE} (the shared/ beside the repo)"
    return SHAKESPEARE


@pytest.fixture(scope="session")
def tfds_manual_dir(tmp_path_factory, shakespeare_path) -> pathlib.Path:
    """A TFDS manual dir holding tiny-shakespeare as `input.txt`, TFDS's registered file name."""
    d = tmp_path_factory.mktemp("tfds_manual")
    shutil.copy(shakespeare_path, d / "input.txt")
    return d


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> pathlib.Path:
    """One TFDS data dir for the whole session, so tiny_shakespeare is built once."""
    return tmp_path_factory.mktemp("tfds_data")


@pytest.fixture(scope="session")
def trained_tiny_workdir(tmp_path_factory, shakespeare_path) -> pathlib.Path:
    """A workdir trained in-process for 20 steps of configs/tiny.py (byte tokenizer, seq_len 64; ~15 s), on
    local files so no TFDS build is needed: data.train_files = all of tiny-shakespeare but its last 20,000
    characters, data.eval_files = those (`<dir>/data/{train,eval}.txt`). Read-only: copy it to modify it."""
    root = tmp_path_factory.mktemp("trained_tiny")
    text = shakespeare_path.read_text(encoding="utf-8")
    (root / "data").mkdir()
    (root / "data" / "train.txt").write_text(text[:-20000], encoding="utf-8")
    (root / "data" / "eval.txt").write_text(text[-20000:], encoding="utf-8")
    config = load_config("tiny")
    config.data.train_files = str(root / "data" / "train.txt")
    config.data.eval_files = str(root / "data" / "eval.txt")
    config.num_steps, config.eval_every, config.checkpoint_every = 20, 0, 0
    config.optimizer.lr, config.optimizer.warmup_steps = 1e-2, 2  # learns more than unigram stats in 20 steps
    train_config(config, root / "workdir")
    return root / "workdir"


@pytest.fixture(scope="session")
def hf_tiny_workdir(tmp_path_factory, shakespeare_path) -> pathlib.Path:
    """A workdir imported with llama_jax.tools.hf.import_to_workdir from an HF checkpoint written by save_hf_llama:
    the "tiny" preset with random weights scaled x8 (peaked, context-dependent predictions) and a byte-level
    BPE tokenizer.json (300 ids; <s>=0 is BOS, </s>=1 is EOS) trained on tiny-shakespeare. Read-only."""
    root = tmp_path_factory.mktemp("hf_tiny")
    cfg = preset("tiny")
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, init_params(cfg, jax.random.key(0)))
    hf.save_hf_llama(cfg, params, root / "hf", extra_config={"bos_token_id": 0, "eos_token_id": 1})
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([shakespeare_path.read_text(encoding="utf-8")[:50000]], trainer)
    tok.save(str(root / "hf" / "tokenizer.json"))
    hf.import_to_workdir(root / "hf", root / "workdir")
    return root / "workdir"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A Google Cloud Storage API on localhost (gcp-storage-emulator, in memory), for the whole session: sets
    STORAGE_EMULATOR_HOST, which gcsfs (and so every gs:// path here, subprocesses too) then talks to.
    Yields a function that makes a fresh bucket and returns its gs:// URL."""
    import gcsfs
    from gcp_storage_emulator.server import create_server

    # gcsfs warns on every bucket that it cannot ask an emulator (no credentials) for the bucket's type.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    gcsfs.GCSFileSystem.clear_instance_cache()
    count = itertools.count()

    def bucket() -> str:
        name = f"bucket{next(count)}"
        gcsfs.GCSFileSystem().mkdir(name)
        return f"gs://{name}"

    yield bucket
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
