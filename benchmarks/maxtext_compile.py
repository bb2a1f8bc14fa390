"""Per-chip HBM of MaxText's Llama-3-8B train step, compiled ahead of time for an abstract TPU topology.

benchmarks/tpu_plan.py puts our planner's peak HBM per chip next to MaxText's own AOT compile at equal
model, topology, global batch, sequence length, mesh and remat. No TPU is needed: libtpu's compiler runs on
the CPU against the devices of `jax.experimental.topologies.get_topology_desc`, through MaxText's
`train_compile` (the same path as `python -m maxtext.trainers.pre_train.train_compile`).

    /tmp/mt/venv/bin/python benchmarks/maxtext_compile.py --topology v5p-128 --global-batch 256 \\
        --seq-len 8192 --fsdp 64 --tensor 1 --remat full          # prints one JSON line

MaxText 0.2.5 needs Python 3.12, so it gets a venv of its own. A lean install, tested with jax 0.12.0.1 /
libtpu 0.0.50.1 (maxtext's `tpu` extra would pull ~235 packages; jax is named again so pip keeps its pin):

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/mt/venv
    V=/tmp/mt/venv/bin
    $V/pip install --upgrade pip
    $V/pip install "jax[tpu]==0.12.0.1"
    $V/pip install --no-deps maxtext==0.2.5
    $V/pip install "jax[tpu]==0.12.0.1" "flax>=0.12.9" "optax>=0.2.8" "orbax-checkpoint>=0.12.4" \\
        "ml-collections>=1.1.0" "omegaconf>=2.3.1" pyyaml "absl-py>=2.5.0" "pydantic>=2.13.5" tensorboardx \\
        pathwaysutils jinja2 "qwix>=0.1.8" "aqtp>=0.9.0" "tokamax>=0.0.14" huggingface_hub \\
        "transformers>=5.17.0" "grain>=0.2.18" "drjax>=0.2.1" pillow tiktoken sentencepiece sympy
    $V/pip install -e .    # optional: llama_jax too (adds tensorflow-cpu, ...), to run tpu_plan.py from it

(`aqtp`, not `aqt`: the latter is Anki. No torch is needed; transformers only warns that it is missing.)

Every call compiles in a fresh subprocess (MaxText's config and jax's global flags are per process) run
by `python`, by default this interpreter; callers outside the venv pass the venv's python. The model is
MaxText's `llama3-8b` with its defaults (bf16 activations, f32 weights, AdamW with f32 moments, scanned
layers, f32 logits); we set `attention=flash`. The mesh is ici_fsdp x ici_tensor within a slice (the rest of
the slice, if any, goes to ici_data) and data parallelism across slices.

Bytes are per device (one device is one chip on v4/v5p/v5e/v6e). peak_bytes is the compiler's own peak
(`memory_analysis().peak_memory_in_bytes`: arguments, outputs and live temporaries at the worst point), the
figure libtpu holds against HBM. On v5p-128 at seq 8192 with full remat it is 26.5 GiB at fsdp 64 and 29.7 GiB
at fsdp 16 x tensor 4 for global batch 256; at fsdp 64, batch 960 still compiles (peak 91.3 GiB, total_bytes
125.9 GiB, HBM 95.73 GiB) and 1024 is refused. total_bytes = arguments + outputs + temporaries - aliases is
what MaxText prints as "Total estimated memory size" (warning that it may over-estimate); temp_bytes,
argument_bytes, output_bytes and alias_bytes are its parts.
fits is libtpu's verdict: False when the compile fails with RESOURCE_EXHAUSTED, and then peak_bytes is the
requirement the error names and the other sizes are None. hbm_bytes is the per-device capacity libtpu's
compiler names in the out-of-memory error of a deliberately oversized allocation (rounded to 0.01 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time

_ENV = {
    "JAX_PLATFORMS": "cpu",  # the TPU is abstract: nothing runs, only libtpu's compiler
    "TPU_SKIP_MDS_QUERY": "1",  # no GCE metadata server to ask for the accelerator type
    # Another process holding /tmp/libtpu_lockfile (any jax[tpu] import) must not stop a compile-only run.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)([KMGT]?)i?B?"


def maxtext_memory(
    topology: str,
    *,
    global_batch: int,
    seq_len: int,
    fsdp: int,
    tensor: int,
    remat: str,
    num_slices: int = 1,
    hlo_out: str = "",
    python: str = sys.executable,
    timeout_s: float = 3600,
) -> dict:
    """Compile MaxText's Llama-3-8B train step for `topology` and return its per-chip memory.

    topology: MaxText's name (`v5p-128`, `v6e-256`) or generation:shape (`v5p:4x4x4`). remat: a MaxText
    `remat_policy` (full, minimal, save_qkv_proj, save_dot_except_mlp, ...). python: an interpreter of
    the MaxText venv. hlo_out: a path to write the compiled step's HLO text to (benchmarks/tpu_plan.py times
    it with the same HLO model as ours). Returns peak_bytes, total_bytes, temp_bytes, argument_bytes, output_bytes, alias_bytes,
    fits, compile_s (MaxText's lower + compile, seconds) and hbm_bytes; see the module docstring.
    """
    flags = {
        "topology": topology,
        "global-batch": global_batch,
        "seq-len": seq_len,
        "fsdp": fsdp,
        "tensor": tensor,
        "remat": remat,
        "num-slices": num_slices,
        "hlo-out": hlo_out,
    }
    cmd = [python, os.path.abspath(__file__), "--in-process"]
    for flag, value in flags.items():
        cmd += [f"--{flag}", str(value)]
    proc = subprocess.run(
        cmd, env={**os.environ, **_ENV}, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"MaxText compile failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_topology(topology: str) -> tuple[str, int]:
    """MaxText's compile_topology name for `topology`, and its devices per slice."""
    from maxtext.utils.accelerator_to_spec_map import UserFacingNameToSystemCharacteristics as specs

    if ":" in topology:
        gen, shape = topology.split(":")
        names = [
            n for n, s in specs.items() if n.split("-")[0] == gen and s.topology_name.endswith(":" + shape)
        ]
        if len(names) != 1:
            raise ValueError(f"no single MaxText topology matches {topology!r}: {names}")
        topology = names[0]
    return topology, specs[topology].devices_per_slice


def _bytes(size: str, unit: str) -> int:
    return round(float(size) * _UNITS[unit])


def _hbm_capacity(device) -> int:
    """Per-device HBM as libtpu's compiler sees it: the figure its out-of-memory error names."""
    import jax
    import jax.numpy as jnp

    too_big = jax.jit(
        lambda: jnp.zeros(1 << 50, jnp.int8), out_shardings=jax.sharding.SingleDeviceSharding(device)
    )
    try:
        too_big.lower().compile()
    except Exception as e:  # the error is the answer
        m = re.search(r"available HBM \(" + _SIZE + r"\)", str(e))
        if m:
            return _bytes(*m.groups())
        raise
    raise RuntimeError("a 1 PiB allocation compiled: cannot read the HBM capacity")


def _required_bytes(message: str) -> int | None:
    """The requirement named by a RESOURCE_EXHAUSTED compile error, if it names one."""
    m = re.search(r"memory required for [^(]*\(" + _SIZE + r"\)", message)
    return _bytes(*m.groups()) if m else None


def _compile_here(
    topology: str, *, global_batch: int, seq_len: int, fsdp: int, tensor: int, remat: str, num_slices: int,
    hlo_out: str,
) -> dict:
    """The compile itself; MaxText's globals make this one call per process."""
    from maxtext.trainers.pre_train import train_compile
    from maxtext.utils.globals import MAXTEXT_CONFIGS_DIR

    name, per_slice = _compile_topology(topology)
    chips = per_slice * num_slices
    if per_slice % (fsdp * tensor):
        raise ValueError(
            f"fsdp * tensor = {fsdp * tensor} does not divide the {per_slice} devices of a slice"
        )
    argv = [
        "train_compile",
        os.path.join(MAXTEXT_CONFIGS_DIR, "base.yml"),
        "model_name=llama3-8b",
        f"compile_topology={name}",
        f"compile_topology_num_slices={num_slices}",
        f"per_device_batch_size={global_batch / chips}",
        f"max_target_length={seq_len}",
        f"remat_policy={remat}",
        f"ici_fsdp_parallelism={fsdp}",
        f"ici_tensor_parallelism={tensor}",
        f"ici_data_parallelism={per_slice // (fsdp * tensor)}",
        "dcn_data_parallelism=-1",
        "attention=flash",
        "dtype=bfloat16",
        "enable_checkpointing=false",
        "run_name=maxtext_compile",
        "base_output_directory=/tmp/maxtext_compile",
    ]

    compiled, seen = {}, {}
    jit_and_compile = train_compile.jit_and_compile

    def timed(*args, **kwargs):  # captures what MaxText's main compiles, and how long it took
        seen["mesh"] = args[3]
        t = time.perf_counter()
        try:
            compiled["step"] = jit_and_compile(*args, **kwargs)
        finally:
            seen["compile_s"] = time.perf_counter() - t
        return compiled["step"]

    train_compile.jit_and_compile = timed
    try:
        train_compile.main(argv)
    except Exception as e:  # only an out-of-memory compile is an answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(e, file=sys.stderr)
        sizes = dict.fromkeys(("total_bytes", "temp_bytes", "argument_bytes", "output_bytes", "alias_bytes"))
        out = {"peak_bytes": _required_bytes(str(e)), **sizes, "fits": False}
    else:
        if hlo_out:
            with open(hlo_out, "w") as f:
                f.write(compiled["step"].as_text())
        stats = compiled["step"].memory_analysis()
        total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        out = {
            "peak_bytes": stats.peak_memory_in_bytes,
            "total_bytes": total - stats.alias_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes,
            "argument_bytes": stats.argument_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes,
            "alias_bytes": stats.alias_size_in_bytes,
            "fits": True,
        }
    return {**out, "compile_s": seen["compile_s"], "hbm_bytes": _hbm_capacity(seen["mesh"].devices.flat[0])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p-128", help="v5p-128, v5p:4x4x4, v6e-256, ...")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--fsdp", type=int, default=64)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--remat", default="full", help="MaxText remat_policy")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--hlo-out", default="", help="write the compiled step's HLO text here")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the subprocess side
    a = p.parse_args(argv)
    kw = dict(
        global_batch=a.global_batch,
        seq_len=a.seq_len,
        fsdp=a.fsdp,
        tensor=a.tensor,
        remat=a.remat,
        num_slices=a.num_slices,
        hlo_out=a.hlo_out,
    )
    if a.in_process:
        os.environ.update(_ENV)
        with contextlib.redirect_stdout(sys.stderr):  # MaxText prints; stdout carries only the JSON line
            out = _compile_here(a.topology, **kw)
    else:
        out = maxtext_memory(a.topology, **kw)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
