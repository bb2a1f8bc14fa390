"""The README's Python snippets run, and every `python -m experiments.*` command in it parses exactly as
written: its flags exist, and its --config file loads with every --config.* override applied (absl's
--only_check_args stops before it runs).
The main job and the test command themselves run in .ci/run; the benchmarks' --quick runs in
tests/test_benchmarks.py. Commands with placeholders for the reader's own files (configs/X.py) are skipped."""

import pathlib
import re
import shlex
import subprocess

import pytest

from tests.helpers import REPO, load_config, run_module


def readme_shell_steps() -> list[str]:
    """Every command of the README's bash blocks, in reading order: continuations joined, comments and
    optional [--flags] dropped, `a && b` split into a and b."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    steps = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s)#\s", line)[0]
            for part in line.split("&&"):
                part = re.sub(r"\[[^\]]*\]", "", part)
                if part.strip():
                    steps.append(" ".join(part.split()))
    return steps


def readme_commands() -> list[str]:
    """The `python -m experiments.*` commands of readme_shell_steps(), from the module name on."""
    commands = []
    for step in readme_shell_steps():
        m = re.search(r"python -m (experiments\.\S+.*)", step)
        if m:
            commands.append(re.sub(r"\s*>.*$", "", m.group(1)).strip().rstrip('"'))  # a redirect (the pod's)
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
    if script in ("eval_ppl", "eval_tasks", "sample", "inspect_data") or exporting:
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


# Flags that make a README command quick; a flag the command already sets keeps its value, or the smaller
# number (the ablation sweep's num_steps=200 becomes 4).
_QUICK = {
    "experiments.main_job": ["--config.num_steps=4", "--config.eval_every=4", "--max_new_tokens=8"],
    "experiments.train": ["--config.num_steps=4", "--config.eval_every=4"],
    "experiments.sweep": ["--seeds=1", "--set=num_steps=4", "--set=eval_every=4"],
    "experiments.sample": ["--max_new_tokens=8"],
    "experiments.eval_tasks": ["--limit=4"],
    "experiments.make_task": ["--num_train=64", "--num_eval=16"],
}
# The reader's own files and machines (an HF dir, a bucket, a pod), which a test cannot stand in for.
_ELSEWHERE = re.compile(r"(?:^|[=\s'\"])/(?!tmp/)|gs://|\b[A-Z][A-Z0-9_]*(?:DIR|BUCKET)\b|BUCKET|configs/X\.py")
# Compiles an 8B model for a 128-chip slice (minutes); tests/tools/test_plan.py covers those plans.
_SLOW = re.compile(r"experiments\.plan .*--config=configs/llama")


def _quick(args: list[str]) -> list[str]:
    args = list(args)
    for flag in _QUICK.get(args[0], []):
        key, value = flag.rsplit("=", 1)
        same = [i for i, a in enumerate(args) if a.rsplit("=", 1)[0] == key]
        if not same:
            args.append(flag)
        for i in same:
            given = args[i].rsplit("=", 1)[1]
            if given.isdigit():
                args[i] = f"{key}={min(int(given), int(value))}"
    return args


def _runs_here(step: str) -> bool:
    """A step the test runs: an experiments command or the mkdir/cp that prepare its data, naming only /tmp,
    the repo and ../shared, and files that exist (not the reader's train.jsonl or book.txt)."""
    if not re.match(r"(python -m experiments\.|mkdir |cp )", step) or _ELSEWHERE.search(step) or _SLOW.search(step):
        return False
    config = re.search(r"--config=configs/(\w+)\.py", step)
    if config and "gs://" in str(load_config(config.group(1)).data):  # its corpus is on the reader's bucket
        return False
    named = re.findall(r"--\w[\w.]*=['\"]?([\w./-]+\.(?:txt|json|jsonl|model))\b", step)
    return all(p.startswith("/tmp/") or (REPO / p).exists() for p in named)


def _tmp_fields(config, prefix="config") -> dict[str, str]:
    """`--config.X` flag -> value for every string field of a config that names a /tmp path (a config file's own
    defaults, e.g. configs/sft_task.py's /tmp/task_add), so that the test can move them with the command's."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_tmp_fields(value, f"{prefix}.{key}"))
        elif isinstance(value, str) and "/tmp/" in value:
            out[f"--{prefix}.{key}"] = value
    return out


def _moved(args: list[str], tmp_path) -> list[str]:
    """args with the /tmp paths of their config file's own fields moved into tmp_path, as the command's are."""
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=configs/")), None)
    fields = _tmp_fields(load_config(pathlib.Path(config).stem)) if config else {}
    if args[0] == "experiments.sweep":  # it takes --set=FIELD=VALUE, not --config.FIELD=VALUE
        fields = {"--set=" + k.removeprefix("--config."): v for k, v in fields.items()}
    given = {a.rsplit("=", 1)[0] for a in args}
    return args + [f"{k}={v.replace('/tmp/', f'{tmp_path}/')}" for k, v in fields.items() if k not in given]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_with_tiny_step_counts(tmp_path, tfds_manual_dir, tfds_data_dir):
    """Every README command that needs nothing but this repo and ../shared runs, top to bottom as a reader
    runs them, with /tmp/ moved into the test's directory and tiny step counts: an example that stops
    working fails here. TFDS's tiny_shakespeare is prepared first, as it is for a reader online."""
    from llama_jax.data import tfds_builder

    tfds_builder("tiny_shakespeare", str(tfds_data_dir), str(tfds_manual_dir))
    env = {"TFDS_DATA_DIR": str(tfds_data_dir), "XLA_FLAGS": ""}  # one CPU device, as a reader runs it
    ran: list[str] = []
    for step in readme_shell_steps():
        if not _runs_here(step) or step in ran:
            continue
        ran.append(step)
        here = step.replace("/tmp/", f"{tmp_path}/")
        if step.startswith(("mkdir ", "cp ")):
            subprocess.run(here, shell=True, cwd=REPO, check=True)
            continue
        args = _moved(_quick(shlex.split(here.removeprefix("python -m "))), tmp_path)
        r = run_module(*args, timeout=600, env=env)
        assert r.returncode == 0, f"README: {step}\nran as: {' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    scripts = {s.split()[2] for s in ran if s.startswith("python")}
    assert {"experiments.main_job", "experiments.train", "experiments.sweep", "experiments.eval_ppl",
            "experiments.sample", "experiments.convert_hf", "experiments.make_task"} <= scripts, scripts
