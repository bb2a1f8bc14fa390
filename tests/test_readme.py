"""The README's Python snippets run, and every `python -m experiments.*` command in it parses exactly as
written: its flags exist, and its --config file loads with every --config.* override applied (absl's
--only_check_args stops before it runs).
The main job and the test command themselves run in .ci/run; the benchmarks' --quick runs in
tests/test_benchmarks.py. Commands with placeholders for the reader's own files (configs/X.py) are skipped."""

import re
import shlex

import pytest

from tests.helpers import REPO, load_config, run_module


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


def _flags(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in args:
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _reads_and_writes(args: list[str]) -> tuple[list[str], list[str]]:
    """The /tmp dirs a README command reads (init_from, the workdir it evaluates, samples or exports, the
    data dir of the config file it trains) and those it writes (a workdir it trains or imports, a task's
    out_dir, an exported HF dir)."""
    script, f = args[0].removeprefix("experiments."), _flags(args[1:])
    exporting = script == "convert_hf" and "--to_hf" in args
    reads = f.get("config.init_from", []) + [v.removeprefix("init_from=") for v in f.get("set", [])
                                             if v.startswith("init_from=")]
    if script in ("eval_ppl", "sample", "inspect_data") or exporting:
        reads += f.get("workdir", [])
    for config in f.get("config", []):
        stem = re.fullmatch(r"configs/(\w+)\.py", config)
        if (stem and (REPO / config).exists() and script in ("main_job", "train", "sweep", "inspect_data")
                and "config.data.train_files" not in f):  # configs/X.py is the reader's own
            data = load_config(stem.group(1)).data
            reads += [p.rsplit("/", 1)[0] for p in (data.train_files, data.eval_files) if isinstance(p, str)]
    writes = f.get("hf_dir", []) if exporting else []
    if script in ("main_job", "train", "sweep") or (script == "convert_hf" and not exporting):
        writes += f.get("workdir", [])
    writes += f.get("out_dir", []) if script == "make_task" else []
    return sorted({p for p in reads if p.startswith("/tmp/")}), writes


def test_readme_commands_come_after_the_commands_whose_output_they_read():
    """Read top to bottom, every /tmp workdir or data dir a command reads was written by a command above it
    (the LoRA example trains on make_task's /tmp/task_add, from the base the main job trains)."""
    written: set[str] = set()
    missing = []
    for command in COMMANDS:
        reads, writes = _reads_and_writes(shlex.split(command))
        missing += [f"{path} (read by: {command[:90]})" for path in reads if path not in written]
        written.update(writes)
    assert not missing, "\n".join(missing)


def test_readme_python_examples_run():
    """The README's Python snippets (the model API) run as written."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
