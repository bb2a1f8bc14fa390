"""Tools around the core: Hugging Face checkpoint conversion (hf), ablation sweeps (sweep), and the TPU
planner (planner: compile a step for a TPU slice named as in tpu.py, read with hlo.py; plan_search: rank
meshes, remat policies and batches by the planner's estimates)."""

from llama_jax.tools.hf import (
    export_from_workdir,
    import_to_workdir,
    load_hf_llama,
    save_hf_llama,
)
from llama_jax.tools.hf_config import config_from_hf, config_to_hf
from llama_jax.tools.hlo import analyze as analyze_hlo
from llama_jax.tools.plan_search import Search, search, train_flags
from llama_jax.tools.planner import Report, plan
from llama_jax.tools.sweep import collect, commands, expand, markdown_table, parse_sweeps, report, run_local
from llama_jax.tools.tpu import TpuSlice, abstract_devices, parse_slice

__all__ = [
    "Report",
    "Search",
    "TpuSlice",
    "abstract_devices",
    "analyze_hlo",
    "collect",
    "commands",
    "config_from_hf",
    "config_to_hf",
    "expand",
    "export_from_workdir",
    "import_to_workdir",
    "load_hf_llama",
    "markdown_table",
    "parse_slice",
    "parse_sweeps",
    "plan",
    "report",
    "run_local",
    "save_hf_llama",
    "search",
    "train_flags",
]
