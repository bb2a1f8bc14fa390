"""Time to first step with jax's persistent compilation cache (on by default, experiments/cli.py): the first
run of a config, a second run of the same config, and the same config with another seed (a sweep's next run).

    python -m benchmarks.compile_cache                    # configs/shakespeare.py's model, byte tokenizer
    python -m benchmarks.compile_cache --quick            # smoke run: configs/tiny.py, no seed run

Each run is `experiments.train` in a fresh interpreter and a fresh workdir, one step on local text (the
tokenizer is `byte`, so no tokenizer training is timed), all runs sharing one new, empty cache dir
(JAX_COMPILATION_CACHE_DIR). Timed: the command from launch to exit (start-up, data, compile, one step),
and, from jax's own log (JAX_LOG_COMPILES), the seconds the train step took to compile or to load from the
cache, the seconds of every program compiled or loaded, and the cache hits. There is no peer: the first
run is the baseline. The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# jax's own log lines (jax/_src/dispatch.py and compiler.py), printed at WARNING under JAX_LOG_COMPILES.
_COMPILED = re.compile(r"Finished XLA compilation of jit\((\w+)\) in ([\d.]+) sec")
_HIT = "Persistent compilation cache hit for"


def run(config: str, workdir: str, cache: str, data: tuple[str, str], extra: list[str]) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_LOG_COMPILES": "1"}
    cmd = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}",
           "--config.num_steps=1", "--config.log_every=1", "--config.eval_every=0", "--config.checkpoint_every=0",
           "--config.data.tokenizer=byte", f"--config.data.train_files={data[0]}", f"--config.data.eval_files={data[1]}",
           *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    compiles = [(name, float(s)) for name, s in _COMPILED.findall(r.stderr)]
    return {
        "wall_s": wall,
        "train_step_s": sum(s for name, s in compiles if name == "train_step"),
        "all_programs_s": sum(s for _, s in compiles),
        "programs": len(compiles),
        "cache_hits": r.stderr.count(_HIT),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shakespeare.py")
    p.add_argument("--text", default=os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
                   help="training text (default: the CI's tiny-shakespeare; a synthetic corpus where it is missing)")
    p.add_argument("--quick", action="store_true", help="smoke run: configs/tiny.py, first and second run only")
    a = p.parse_args(argv)
    if a.quick:
        a.config = "configs/tiny.py"
    info = common.machine()
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.exists(a.text):
            with open(a.text, encoding="utf-8") as f:
                text = f.read()
        else:
            text = "to be or not to be, that is the question.\n" * 20000
        data = (os.path.join(tmp, "train.txt"), os.path.join(tmp, "eval.txt"))
        for path, part in zip(data, (text[:-20000], text[-20000:])):  # held-out text apart, as training requires
            with open(path, "w", encoding="utf-8") as f:
                f.write(part)
        cache = os.path.join(tmp, "jax_compilation_cache")
        runs = [("first run (empty cache)", []), ("second run, same config", [])]
        if not a.quick:
            runs.append(("same config, --config.seed=1", ["--config.seed=1"]))
        res = {}
        for i, (name, extra) in enumerate(runs):
            res[name] = run(a.config, os.path.join(tmp, f"run{i}"), cache, data, extra)
            print(f"  {name}: {res[name]}", flush=True)
        entries = len(os.listdir(cache))
    common.print_table(
        [[name, r["wall_s"], r["train_step_s"], r["all_programs_s"], r["programs"], r["cache_hits"]]
         for name, r in res.items()],
        ["run", "launch to exit s", "train step compile/load s", "all programs s", "programs", "cache hits"],
    )
    first, second = res[runs[0][0]], res[runs[1][0]]
    print(f"second run: {second['wall_s']:.1f} s against {first['wall_s']:.1f} s; train step "
          f"{second['train_step_s']:.2f} s against {first['train_step_s']:.2f} s; {entries} cache entries")
    figures = {"config": a.config, "cache_entries": entries, "load_1min_at_start": info["load_1min_at_start"]}
    for key, (name, _) in zip(("first", "second", "seed1"), runs):
        figures |= {f"{key}_{k}": v for k, v in res[name].items()}
    common.emit_json(figures)


if __name__ == "__main__":
    main()
