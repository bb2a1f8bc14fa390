"""Convert between Hugging Face Llama checkpoints and llama_jax workdirs.

    # HF dir (config.json + safetensors + tokenizer files) -> new workdir (params at step 0)
    python -m experiments.convert_hf --hf_dir=/models/Llama-3.2-1B --workdir=/runs/llama1b
    # workdir (latest checkpoint) -> new HF dir that transformers' from_pretrained loads
    python -m experiments.convert_hf --to_hf --workdir=/runs/llama1b --hf_dir=/models/llama1b-ft

Neither direction writes into an existing non-empty target; outputs appear only once complete. All the
logic lives in llama_jax.tools.hf (import_to_workdir / export_from_workdir); this file only parses flags.
"""

from __future__ import annotations

import logging

from absl import flags

from experiments import cli
from llama_jax.tools import hf

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF model directory: the source, or with --to_hf the target.")
_WORKDIR = flags.DEFINE_string("workdir", None, "llama_jax workdir: the target, or with --to_hf the source.")
_TO_HF = flags.DEFINE_bool("to_hf", False, "Export --workdir to --hf_dir instead of importing.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Import: the params' storage dtype (default: the checkpoint's). Export: the saved weights' dtype "
    "(default: the workdir's param_dtype).",
)
_STEP = flags.DEFINE_integer("step", None, "Export: the checkpoint step to export (default: the latest).")
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers", False, "Import: store params in the stacked scan_layers layout (and set it in the config)."
)
flags.mark_flags_as_required(["hf_dir", "workdir"])

log = logging.getLogger("llama_jax.convert_hf")  # under "llama_jax": kept at INFO by cli.quiet_logs


def main(argv):
    # Orbax logs ~60 INFO lines per save/restore through absl; only warnings and our result line remain.
    cli.quiet_logs()
    if _TO_HF.value:
        cfg = hf.export_from_workdir(_WORKDIR.value, _HF_DIR.value, dtype=_DTYPE.value, step=_STEP.value)
        log.info("exported %s (%d params) to %s", _WORKDIR.value, cfg.param_count(), _HF_DIR.value)
    else:
        cfg = hf.import_to_workdir(
            _HF_DIR.value, _WORKDIR.value, scan_layers=_SCAN_LAYERS.value, dtype=_DTYPE.value
        )
        log.info("imported %s (%d params) into %s", _HF_DIR.value, cfg.param_count(), _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
