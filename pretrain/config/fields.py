"""What every section module of the schema shares: documented fields, choice lists taken from `Literal`
annotations, the type hints the loader and the reference walk, and the wording of the common checks."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def documented(
    text: str,
    default: Any = dataclasses.MISSING,
    legacy: tuple[tuple[Any, Any], ...] = (),
    **kwargs: Any,
) -> Any:
    """A dataclass field with its documentation attached (shown by `--help-config` and the README).
    `legacy`: (old value, today's value) pairs the loader translates, so configs and checkpoints
    written before a key changed type still load (e.g. parallel.offload_optimizer: true -> cpu)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(metadata={"doc": text, "legacy": legacy}, **kwargs)


def translate_legacy(field: dataclasses.Field[Any], value: Any) -> Any:
    """`value` in today's terms if it is one of `field`'s legacy values (compared with its type,
    so 1 is not taken for true), else unchanged."""
    for old, new in field.metadata.get("legacy", ()):
        if type(value) is type(old) and value == old:
            return new
    return value


def choices(literal: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` annotation allows, in the order written: the one list of choices."""
    return typing.get_args(literal)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field (the section modules postpone annotations as strings)."""
    return typing.get_type_hints(cls)


def positive(key: str, value: float) -> list[str]:
    return [f"{key} must be positive, got {value}"] if value <= 0 else []


def one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> list[str]:
    if value in allowed:
        return []
    return [f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}"]
