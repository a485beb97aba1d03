"""Reading a configuration: a YAML preset plus dotted overrides, `${...}` interpolation, and strict
building into `Config`: unknown keys (with a suggestion), values of the wrong type and impossible
values are collected and raised together in one `ConfigError`."""

from __future__ import annotations

import dataclasses
import difflib
import io
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config.fields import field_types, translate_legacy
from pretrain.config.root import Config, validate
from pretrain.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "configs"


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), world_size: int | None = None
) -> Config:
    """Read a YAML preset, apply dotted overrides, and return a validated `Config`.

    `world_size` enables the checks that need it (batch arithmetic, layout); None skips them.
    The split into pipeline stages, which needs the model, is checked by
    `pretrain.parallel.layout.check_layout`.
    """
    problems: list[str] = []
    raw = _read_preset(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(f"override {item!r} is not of the form key=value (for example optim.lr=3e-4)")
            continue
        try:
            raw = _merge(raw, _plain(OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as e:
            problems.append(_override_syntax_problem(item, e))
        except (OmegaConfBaseException, ValueError) as e:
            problems.append(f"override {item!r} cannot be parsed: {e}")
    try:
        raw = _plain(OmegaConf.create(raw), resolve=True)  # resolve ${...} interpolations
    except OmegaConfBaseException as e:
        problems.append(f"cannot resolve an interpolation: {e}")
    cfg = _build(Config, raw, "", problems)
    # Values that failed to parse keep their defaults, so value checks still run and report the rest;
    # the layout checks need every number right and wait until the rest is clean.
    problems.extend(validate(cfg, world_size if not problems else None))
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_preset(path: Path) -> dict[str, Any]:
    if not path.is_file():
        presets = sorted(p.name for p in PRESETS.glob("*.yaml"))
        raise ConfigError(
            [f"config file {str(path)!r} does not exist (presets in configs/: {', '.join(presets)})"]
        )
    try:
        text = path.read_text()
    except OSError as e:  # unreadable: permissions, a stale NFS handle, a device
        raise ConfigError(
            [f"config file {str(path)!r} cannot be read ({e}); check that it is readable"]
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file {str(path)!r} is not UTF-8 text ({e}); pass a YAML preset"]) from e
    try:
        raw = _plain(OmegaConf.load(io.StringIO(text)))
    except yaml.YAMLError as e:
        raise ConfigError([_file_syntax_problem(path, e)]) from e
    except OSError as e:  # read from memory, so not I/O: OmegaConf's word for a top-level scalar
        raise ConfigError([f"{path}: {_NOT_A_MAPPING} got a single value"]) from e
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError([f"{path}: cannot parse YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: {_NOT_A_MAPPING} got a {type(raw).__name__}"])
    if not raw:
        # An empty preset would silently train the built-in default model, not the one meant.
        raise ConfigError(
            [
                f"{path} holds no settings (it is empty, or only comments or null); write the preset's sections "
                f"in it (see configs/tiny.yaml; `python pretrain/main.py --help-config` lists every key), or "
                f"leave out --config to train the built-in defaults"
            ]
        )
    return raw


_NOT_A_MAPPING = (
    "the top level must be a mapping of sections (`model:`, `train:`, ... each with its `key: value` lines "
    "indented below it, as in configs/tiny.yaml), but it"
)
_YAML_FIX = (
    "indent the keys of one section alike, write lists as [a, b], and quote a value that holds ': ' or ' #'"
)


def _file_syntax_problem(path: Path, error: yaml.YAMLError) -> str:
    """The file, line and column PyYAML stopped at (1-based, as editors count), and a fix."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{path}: invalid YAML ({error}); {_YAML_FIX}"
    mark, what = error.problem_mark, str(error.problem)
    if error.context and error.context_mark is not None:
        start = error.context_mark
        what += f" ({error.context} that starts at line {start.line + 1}, column {start.column + 1})"
    fix = "keep one of them" if what.startswith("found duplicate key") else _YAML_FIX
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {what}; {fix}"


def _override_syntax_problem(item: str, error: yaml.YAMLError) -> str:
    """Where in the override PyYAML stopped: OmegaConf parses the text after the first '=' as YAML,
    so a mark's index into that value is shifted by the key and the '='."""
    key = item.split("=", 1)[0]
    offset = len(key) + 2  # 1-based characters of the whole override

    def at(mark: yaml.Mark) -> str:
        position = offset + mark.index
        return f"character {position}" + (", the end of it" if position > len(item) else "")

    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        what = f"{error.problem} at {at(error.problem_mark)}"
        if error.context and error.context_mark is not None:
            what += f" ({error.context} that starts at {at(error.context_mark)})"
    else:
        what = str(error)
    return (
        f"override {item!r} cannot be parsed: {what}; close its brackets and quotes, and quote the whole "
        f"override for the shell (for example data.paths='[a, b]')"
    )


def _plain(node: Any, resolve: bool = False) -> Any:
    return OmegaConf.to_container(node, resolve=resolve) if OmegaConf.is_config(node) else node


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'optim.lr'."""
    keys = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(key: str, path: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{path}{close[0]}'?"
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; it exists as {elsewhere[0]!r}"
    return f"; valid keys here: {', '.join(valid)}"


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Turn a plain dict into `cls`, recording unknown keys and type errors instead of stopping."""
    where = path.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    for key in raw:
        if key not in names:
            problems.append(f"unknown key '{path}{key}'" + _suggest(str(key), path, names))
    values = {}
    for name in names:
        if name not in raw:
            continue
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            values[name] = _build(ftype, raw[name], f"{path}{name}.", problems)  # type: ignore[arg-type]
        else:
            try:
                values[name] = _coerce(translate_legacy(fields[name], raw[name]), ftype)
            except (TypeError, ValueError) as e:
                problems.append(f"{path}{name}: {e}")
    return cls(**values)


def _coerce(value: Any, ftype: Any) -> Any:
    """`value` as `ftype`, or TypeError saying what was expected. A Literal field is coerced to the
    type of its choices only: whether the value is one of them is the section's check, whose message
    lists the choices (and is reported with the other impossible values)."""
    args = typing.get_args(ftype)
    if typing.get_origin(ftype) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (ftype,) = [a for a in args if a is not type(None)]
    if typing.get_origin(ftype) is Literal:
        (ftype,) = {type(choice) for choice in typing.get_args(ftype)}
    if typing.get_origin(ftype) is list:
        (item_type,) = typing.get_args(ftype)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # data.paths=shards/web means a list of one
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce(item, item_type) for item in value]
    return _coerce_scalar(value, ftype)


def _coerce_scalar(value: Any, ftype: type) -> Any:
    if ftype is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise TypeError(f"expected an integer, got {value!r}")
    if ftype is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '3e-4' as a string; we read it as the number it is
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if ftype is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {ftype}")  # a schema bug, not a user error
