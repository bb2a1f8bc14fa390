"""Config sections: frozen dataclasses built once from a ConfigDict (or config.json) section.

`Section.from_dict(d)` rejects unknown keys and values of the wrong type, naming the field, so a typo on
the command line or in a config file is one clear error instead of a silently ignored key. Each
subclass's field defaults are the only place that default is written; its `__post_init__` checks ranges.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from llama_jax.errors import ConfigError


def _freeze(v):
    """JSON lists -> tuples, recursively (config.json stores tuples as lists)."""
    return tuple(_freeze(x) for x in v) if isinstance(v, list | tuple) else v


def _coerce(section: str, name: str, kind: type, value):
    where = f"{section}.{name}" if section else name
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple:
        if value is None or isinstance(value, list | tuple):
            return _freeze(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}={value!r} must be of type {kind.__name__}, not {type(value).__name__}.")


class Section:
    """Mixin for frozen config dataclasses; subclasses set `SECTION` (the ConfigDict key) for messages."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None):
        d = d or {}
        if hasattr(d, "to_dict"):
            d = d.to_dict()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            where = f"{cls.SECTION} " if cls.SECTION else ""
            raise ConfigError(
                f"unknown {where}config field(s) {unknown}; valid fields are {sorted(fields)}."
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in d.items():
            kind = _base_type(hints[name])
            values[name] = value if kind is None else _coerce(cls.SECTION, name, kind, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw):
        """A copy with `kw` changed; built from `to_dict()`, so derived fields are derived again."""
        return type(self)(**{**self.to_dict(), **kw})

    def _check(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"invalid {self.SECTION or 'config'}: {msg}")


def _base_type(hint) -> type | None:
    """The one concrete type a field accepts (None when any value goes, e.g. `tuple | None`)."""
    if hint in (bool, int, float, str, tuple):
        return hint
    if typing.get_origin(hint) is tuple:
        return tuple
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1:
        return _base_type(args[0])
    return None
