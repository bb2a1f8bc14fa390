"""Every error a user can fix by changing a flag, a file or a command derives from `LlamaJaxError`.

Each message names what is wrong and the fix, so the command-line entry points print it as one line
(experiments/cli.py) instead of a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class LlamaJaxError(Exception):
    """Base class of the errors below; `except LlamaJaxError` catches every one of them."""


class ConfigError(LlamaJaxError, ValueError):
    """A config field (or a combination of fields) that cannot work; the message names the fields."""


class ShardingError(ConfigError):
    """A mesh, rule set or config that cannot shard this model."""


class DataError(LlamaJaxError, ValueError):
    """Bad data configuration or input: a missing file, an unknown dataset, text that cannot be read."""


class TokenizerError(LlamaJaxError, ValueError):
    """A tokenizer that cannot be loaded, or one that does not fit the model."""


class CheckpointError(LlamaJaxError, RuntimeError):
    """A workdir or checkpoint that cannot be used."""


class ConfigMismatchError(CheckpointError):
    """Resuming a workdir with a config that changes what is computed."""


class TrainingHalted(LlamaJaxError, RuntimeError):
    """Training diverged: non-finite steps in a row, or a loss spike."""


class NonFiniteResult(LlamaJaxError, ArithmeticError):
    """An evaluation whose loss is NaN or infinite: the params are damaged or diverged."""


class Interrupted(LlamaJaxError):
    """Ctrl-C: the run saved its step and stopped; the command-line scripts exit 130."""


class HFImportError(LlamaJaxError, ValueError):
    """A Hugging Face checkpoint that is not a Llama this project can read."""


class HFExportError(LlamaJaxError, ValueError):
    """A workdir that cannot be written as a Hugging Face checkpoint."""


class SweepError(LlamaJaxError, ValueError):
    """A sweep specification that cannot be expanded."""
