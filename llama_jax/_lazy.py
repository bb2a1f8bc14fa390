"""Lazy package faces (PEP 562): `from llama_jax import Llama` imports llama_jax.model, and only that.

A package __init__ that imported every name's module eagerly made `import llama_jax.model` load the whole
project (TensorFlow Datasets, Orbax, jinja2) through the package face.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose public `names` live in the submodules named by `names`
    ({"Llama": "model", ...}); each is imported on first use and then kept in the package's namespace."""
    module = importlib.import_module(package)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *names})

    return __getattr__, __dir__
