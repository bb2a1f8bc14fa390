"""What `pip install -e ".[...]"` brings: the test extra pulls no PyTorch (PyPI's Linux wheel is a multi-GB CUDA
build wherever no CPU wheel is pinned); PyTorch comes only with the extra named for it."""

import re
import tomllib

from tests.helpers import REPO


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_test_extra_pulls_no_torch_and_the_torch_extra_says_what_it_brings():
    extras = _extras()
    assert "torch" not in _names(extras["test"])
    assert _names(extras["torch"]) == {"torch", "accelerate"}  # accelerate: lm_eval's hf backend, the reference
    assert _names(extras["eval"]) == {"lm_eval"} and "torch" not in _names(extras["eval"])
    # The README's test command and CI's are the same one, with the extra that brings the HF tests' reference.
    command = 'pip install -e ".[test,tpu,torch,eval]" && python -m pytest -q'
    assert command in (REPO / "README.md").read_text() and command in (REPO / ".ci" / "run").read_text()
