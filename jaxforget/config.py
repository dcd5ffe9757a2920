"""Typed configs: dataclasses loaded from YAML, overridable by ``key=value`` on the command line.

Every key is checked against the dataclass (unknown key, wrong type -> ConfigError naming the file,
line and dotted field), so a typo stops a run before any work is done.

A file may start from another: ``extends: duge.yaml`` (a path relative to the file) loads that
file first and merges this one's keys over it, mappings key by key. Each file is checked on its
own, so an error names the file and line where it is.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, get_args, get_origin, get_type_hints

import yaml

from jaxforget.errors import ConfigError

T = TypeVar("T")


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers (for error messages);
    list items count as keys by index ("concepts.2.name")."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data, _key_lines(text)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, lines: Mapping[str, int] | None = None, source: str = "") -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (tuples, floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where, lines, source)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where, lines, source)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = get_args(tp)
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # 1e-5 in a YAML file (YAML 1.1 needs 1.0e-5)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "", lines: Mapping[str, int] | None = None,
              source: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            line = (lines or {}).get(dotted)
            loc = f"{source}:{line}: " if source and line else (f"{source}: " if source else "")
            raise ConfigError(f"{loc}unknown config key {dotted!r}")
        try:
            kwargs[key] = _coerce(value, hints[key], dotted, lines, source)
        except ConfigError as err:
            line = (lines or {}).get(dotted)
            if source and not str(err).startswith(source):
                loc = f"{source}:{line}" if line else source
                raise ConfigError(f"{loc}: {err}") from None
            raise
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source or where or cls.__name__}: {err}") from None


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; users mean a number
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


EXTENDS_KEY = "extends"


def _read_checked(cls: type, path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, int]]:
    """A config file's data merged over the file it ``extends`` (recursively), each file checked
    against ``cls`` on its own; (data, line numbers of this file's keys)."""
    data, lines = read_yaml(path)
    parent = data.pop(EXTENDS_KEY, None)
    from_dict(cls, data, lines=lines, source=str(path))  # file errors name the file and line
    if parent is None:
        return data, lines
    where = f"{path}:{lines.get(EXTENDS_KEY, 1)}"
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{where}: {EXTENDS_KEY}: expected the path of a YAML config, got {parent!r}")
    chain = seen + (path.resolve(),)
    target = (path.parent / parent).resolve()
    if target in chain:
        raise ConfigError(f"{where}: {EXTENDS_KEY}: {parent!r} extends this file again (a cycle)")
    if not target.is_file():
        raise ConfigError(f"{where}: {EXTENDS_KEY}: {parent!r} not found (looked for {target})")
    base, _ = _read_checked(cls, target, chain)
    return _merge(base, data), lines


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file (over the file it ``extends``, if any) <- command-line
    overrides; every key validated."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = ""
    if path is not None:
        data, lines = _read_checked(cls, Path(path))
        source = str(path)
    if overrides:
        over = apply_overrides({}, overrides)
        try:
            from_dict(cls, _merge(to_dict(cls()) if _has_defaults(cls) else {}, over))
        except ConfigError as err:
            raise ConfigError(f"command line: {err}") from None
        data = _merge(data, over)
    if _has_defaults(cls):  # mappings merge into their defaults (mesh.fsdp=2 keeps mesh.data)
        data = _merge(to_dict(cls()), data)
    return from_dict(cls, data, lines=lines, source=source)


def _has_defaults(cls) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (YAML/JSON-serializable) of a config dataclass."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
