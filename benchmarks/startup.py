"""Command start-up: how long a command takes before it does anything, in a fresh interpreter each time.

    python -m benchmarks.startup                         # this checkout, 3 runs of each command
    python -m benchmarks.startup --repo=/tmp/before      # another checkout (`git archive` of an older commit)
    python -m benchmarks.startup --quick                 # one run of each

Commands, each run from --repo's root with this interpreter: `import llama_jax.model`, `import llama_jax`,
`experiments.sample --help`, and `experiments.sample` / `experiments.eval_ppl` on a tiny imported workdir
(the tiny preset, random params, the byte tokenizer; written here, in the format every version reads), timed
to their first byte of output (stdout or stderr) and to their exit. Also which heavy modules
`import llama_jax.model` loads. There is no peer: compare two checkouts. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("tensorflow_datasets", "orbax.checkpoint", "jinja2")


def timed(cmd: list[str], cwd: str) -> tuple[float, float]:
    """(seconds to the first byte of output, seconds to exit) of `cmd`."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    for f in (p.stdout, p.stderr):
        sel.register(f, selectors.EVENT_READ)
    first, open_streams = None, 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif first is None:
                first = time.perf_counter() - t
    p.wait()
    end = time.perf_counter() - t
    if p.returncode not in (0, 1):  # absl's --help exits 1
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}")
    return (end if first is None else first), end


def tiny_workdir(root: pathlib.Path) -> tuple[str, str]:
    """An imported-style workdir (config.json with a model entry, params at step 0, byte tokenizer) and a text."""
    import jax

    from llama_jax import checkpoint
    from llama_jax.data.tokenizer import ByteTokenizer
    from llama_jax.model import init_params, preset

    cfg = preset("tiny")
    workdir = root / "workdir"
    checkpoint.write_config(workdir, {"model": cfg.to_dict()})
    checkpoint.save_params(workdir, init_params(cfg, jax.random.key(0)))
    ByteTokenizer().save(checkpoint.tokenizer_dir(workdir))
    text = root / "text.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20, encoding="utf-8")
    return str(workdir), str(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout whose commands are timed (default: this one)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one run of each command")
    a = p.parse_args(argv)
    runs = 1 if a.quick else a.runs
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        workdir, text = tiny_workdir(pathlib.Path(tmp))
        commands = {
            "import llama_jax.model": [py, "-c", "import llama_jax.model"],
            "import llama_jax": [py, "-c", "import llama_jax"],
            "sample --help": [py, "-m", "experiments.sample", "--help"],
            "sample (8 tokens)": [py, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=ROMEO:",
                                  "--max_new_tokens=8", "--temperature=0"],
            "eval_ppl (text file)": [py, "-m", "experiments.eval_ppl", f"--workdir={workdir}",
                                     f"--text_file={text}", "--seq_len=64"],
        }
        results = {}
        print(f"{'command':<24} {'first output (s)':>17} {'exit (s)':>9}   ({runs} run(s), median; "
              f"repo {a.repo})")
        for name, cmd in commands.items():
            times = [timed(cmd, a.repo) for _ in range(runs)]
            first, end = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
            results[name] = {"first_output_s": round(first, 2), "exit_s": round(end, 2)}
            print(f"{name:<24} {first:>17.2f} {end:>9.2f}", flush=True)
        probe = f"import sys, llama_jax.model; print([m for m in {HEAVY!r} if m in sys.modules])"
        loaded = subprocess.run([py, "-c", probe], cwd=a.repo, capture_output=True, text=True, check=True).stdout
        heavy = json.loads(loaded.strip().replace("'", '"'))
        print(f"import llama_jax.model loads: {heavy or 'none of ' + ', '.join(HEAVY)}")
    load = os.getloadavg()[0]
    print(f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores")
    print(json.dumps({"repo": a.repo, "runs": runs, "commands": results, "model_import_loads": heavy,
                      "load_average": round(load, 2)}))


if __name__ == "__main__":
    main()
