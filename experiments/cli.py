"""What every entry script shares: the error handler and the flags several scripts define.

    if __name__ == "__main__":
        cli.run(main)

A `LlamaJaxError` (a bad flag, a missing file, a workdir that cannot be used) prints one line,
`<script>: <message>`, and exits 1; its message already names the fix, so a traceback would only bury it.
`--traceback` shows it anyway. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags

from llama_jax.errors import Interrupted, LlamaJaxError

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of a usage error too.")

# One definition of the mesh flags; a script that reads them says what None (unset) means for it.
_MESH_DATA = flags.DEFINE_integer("mesh_data", None, "Mesh data axis size (-1: all remaining devices).")
_MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", 1, "Mesh fsdp axis size (params sharded over it; -1: all).")
_MESH_TENSOR = flags.DEFINE_integer("mesh_tensor", 1, "Mesh tensor axis size (tensor parallelism; -1: all).")


def mesh(default_data: int):
    """The --mesh_* flags as a mesh; `default_data` is the data axis when --mesh_data is unset."""
    from llama_jax.inference import inference_mesh  # here: --help and flag errors need no JAX or Orbax

    data = default_data if _MESH_DATA.value is None else _MESH_DATA.value
    return inference_mesh(data, _MESH_FSDP.value, _MESH_TENSOR.value)


def quiet_logs() -> None:
    """Our progress at INFO; Orbax/absl chatter only when it matters."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("llama_jax").setLevel(logging.INFO)


def skip_the_tpu_backend_without_a_tpu() -> None:
    """Use the CPU when libtpu is installed (the `tpu` extra) but no TPU chip is attached and no platform
    was asked for (JAX_PLATFORMS unset). Otherwise JAX initializes the TPU backend anyway, and libtpu
    (0.0.50 and newer) prints a screen of errors about TPU worker hostnames and the accelerator type on
    every command. Compiling for TPU slices (tools/tpu.py, the planner) needs no TPU backend. Leaves a
    machine with a GPU plugin installed as it is: its platform is not ours to guess."""
    import importlib.util
    import pkgutil

    import jax  # its import sets TPU_SKIP_MDS_QUERY=1 when no TPU chip is attached (jax's cloud_tpu_init)

    if (jax.config.jax_platforms or os.environ.get("JAX_FORCE_TPU_INIT")
            or os.environ.get("TPU_SKIP_MDS_QUERY") != "1" or importlib.util.find_spec("libtpu") is None):
        return
    if any(m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules()):
        return
    jax.config.update("jax_platforms", "cpu")


def default_compilation_cache_dir() -> str:
    """Where compiled programs persist between commands when JAX_COMPILATION_CACHE_DIR is unset."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "llama_jax", "jax_compilation_cache")


def use_compilation_cache() -> None:
    """Turn on jax's persistent compilation cache, so a second run of a config (a resumed run, a sweep's next
    seed, eval_ppl on the same shapes) loads its compiled steps instead of compiling them again: in
    default_compilation_cache_dir(), or where JAX_COMPILATION_CACHE_DIR says (jax's own variable, read at its
    import; a gs:// path on a pod, so every host and every new VM shares it, as MaxText's jax_cache_dir).
    JAX_ENABLE_COMPILATION_CACHE=false turns it off. jax's own thresholds apply (programs that compile in
    under jax_persistent_cache_min_compile_time_secs, 1 s, are not stored: reading them back costs about as
    much, more so from a bucket)."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", default_compilation_cache_dir())


def _script_name() -> str:
    return os.path.basename(sys.argv[0]).removesuffix(".py")


def _parse_flags(argv):
    """absl's parser; an unknown `--config.X` key (ml_collections raises KeyError/AttributeError from deep
    inside flag parsing) becomes one line instead of three chained tracebacks."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        text = str(e.args[0] if e.args else e)
        key = re.search(r"'(\w+)", text)
        hint = re.search(r"(Did you mean [^?]*\?)", text)
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        # The flag that holds the unknown name (a field or a section), not every --config flag given.
        bad = [f for f in given if key and key.group(1) in f.split(".")[1:]] or given
        print(f"{_script_name()}: no such config field {key.group(1) if key else text!r} (in "
              f"{', '.join(bad)}). {hint.group(1) + ' ' if hint else ''}The fields are those of the config "
              "file's sections (llama_jax/experiment.py lists them).", file=sys.stderr)
        sys.exit(1)


def run(main) -> None:
    """`absl.app.run(main)`, printing a LlamaJaxError as one line instead of a traceback."""

    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag (quote values).")
        skip_the_tpu_backend_without_a_tpu()  # after the flags: --help answers without importing JAX
        use_compilation_cache()
        try:
            return main(argv)
        except LlamaJaxError as e:
            if _TRACEBACK.value:
                raise
            name = _script_name()
            hint = "" if isinstance(e, Interrupted) else "\n(--traceback shows where it was raised)"
            print(f"{name}: {e}{hint}", file=sys.stderr, flush=True)
            sys.exit(130 if isinstance(e, Interrupted) else 1)  # 130: the shell's code for Ctrl-C

    app.run(wrapped, flags_parser=_parse_flags)
