"""House rules that a linter holds: no function in llama_jax/ over McCabe complexity 10 (ruff's C901), and the
project's lint config selects that rule, so `ruff check` keeps it."""

import subprocess
import sys
import tomllib

import pytest

from tests.helpers import REPO

pytest.importorskip("ruff", reason="the lint tests run ruff: pip install -e '.[test]'")


def test_no_function_in_the_package_is_over_complexity_10():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format=concise",
                        "llama_jax"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lint = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert "C901" in lint["select"] and lint["mccabe"]["max-complexity"] == 10
