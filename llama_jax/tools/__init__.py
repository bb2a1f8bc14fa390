"""Tools around the core: Hugging Face checkpoint conversion (hf) and ablation sweeps (sweep)."""

from llama_jax.tools.hf import (
    export_from_workdir,
    import_to_workdir,
    load_hf_llama,
    save_hf_llama,
)
from llama_jax.tools.hf_config import config_from_hf, config_to_hf
from llama_jax.tools.sweep import collect, commands, expand, markdown_table, parse_sweeps, report, run_local

__all__ = [
    "collect",
    "commands",
    "config_from_hf",
    "config_to_hf",
    "expand",
    "export_from_workdir",
    "import_to_workdir",
    "load_hf_llama",
    "markdown_table",
    "parse_sweeps",
    "report",
    "run_local",
    "save_hf_llama",
]
