"""The configuration reference, generated from the schema: every key with its type, default and
documentation, for `--help-config` and the README's table."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from pretrain.config.fields import field_types
from pretrain.config.root import Config


def type_name(ftype: Any) -> str:
    """How the reference writes a field's type: `int`, `list[str]`, `float | null`, and a choice as the
    type of its values with the values, `str (none, full, selective)`."""
    if typing.get_origin(ftype) is Literal:
        values = typing.get_args(ftype)
        return f"{type(values[0]).__name__} ({', '.join(map(str, values))})"
    if typing.get_origin(ftype) is list:
        return f"list[{type_name(typing.get_args(ftype)[0])}]"
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(ftype))
    return "null" if ftype is type(None) else ftype.__name__


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf: the config reference in README and `--help-config`."""
    rows = []
    hints = field_types(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            rows.extend(describe_fields(ftype, f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        value = getattr(default, f.name)
        rows.append((f"{prefix}{f.name}", type_name(ftype), json.dumps(value), f.metadata.get("doc", "")))
    return rows


def reference_markdown() -> str:
    """The README's config reference table."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tname, default, doc in describe_fields():
        lines.append(f"| `{key}` | {tname.replace(' | ', ' or ')} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)
