"""Test setup: 8 emulated CPU devices (set before jax is imported) and the shared tiny-shakespeare data."""

import os
import pathlib
import shutil

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


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
