"""The README's Python snippets run, and every `python -m experiments.*` command in it parses exactly as
written: its flags exist, and its --config file loads with every --config.* override applied (absl's
--only_check_args stops before it runs).
The main job and the test command themselves run in .ci/run; the benchmarks' --quick runs in
tests/test_benchmarks.py. Commands with placeholders for the reader's own files (configs/X.py) are skipped."""

import re
import shlex

import pytest

from tests.helpers import REPO, run_module


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0]
            for part in line.split("&&"):
                m = re.search(r"python -m (experiments\.\S+.*)", part)
                if m:
                    command = re.sub(r"\s*>.*$", "", m.group(1))  # drop a redirect (the pod command)
                    command = re.sub(r"\[[^\]]*\]", "", command).strip().rstrip('"')  # optional [--flags]
                    commands.append(" ".join(command.split()))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_we_expect():
    scripts = {c.split()[0] for c in COMMANDS}
    assert {"experiments.main_job", "experiments.train", "experiments.eval_ppl", "experiments.sample",
            "experiments.sweep", "experiments.convert_hf", "experiments.train_tokenizer"} <= scripts


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if "configs/X.py" not in c], ids=lambda c: c[:60])
def test_readme_command_parses_as_written(command):
    r = run_module(*shlex.split(command), "--only_check_args", timeout=120)
    assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"


def test_readme_python_examples_run():
    """The README's Python snippets (the model API) run as written."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
