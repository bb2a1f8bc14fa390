"""Fixtures of the training tests."""

import pytest


@pytest.fixture(scope="module")
def local_data(tmp_path_factory, shakespeare_path):
    """Local train / held-out text files cut from tiny-shakespeare (no TFDS build)."""
    root = tmp_path_factory.mktemp("loop_data")
    text = shakespeare_path.read_text(encoding="utf-8")
    (root / "train.txt").write_text(text[:200_000], encoding="utf-8")
    (root / "eval.txt").write_text(text[-5_000:], encoding="utf-8")
    return root
