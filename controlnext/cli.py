"""Run configuration from the command line (STYLE.md §3): experiment file + `--field=value` overrides + `--dry_run`.

`python train.py [experiments/x.py] [--field=value | --field value]... [--dry_run]`. The experiment file is imported
(importlib, not exec) and must define `config = TrainConfig(...)`. Values are parsed with ast.literal_eval and checked
against the field's type hint; a `str` field also takes bare text (`--ablation=zero_conv`), a `bool` field alone
(`--gradient_checkpointing`) means True; a `tuple[X, ...]` field takes a literal (`--control_scale="(0.5, 1.0)"`) or
one item per flag, repeated flags appending (`--control=a.safetensors --control=b.safetensors`). Unknown fields are
errors. The resolved config round-trips through JSON
(config.json in the run folder and inside every checkpoint).
Left out: YAML, nested configs, environment-variable overrides.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path


def _matches(value: object, hint: object) -> bool:
    """Whether `value` (a literal) fits the type hint: int, float, str, bool, tuple[...], X | None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    return isinstance(value, hint)


def _coerce(value: object, hint: object) -> object:
    """JSON/literal value -> the field's type (lists -> tuples, ints -> floats for float fields)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return next(_coerce(value, a) for a in args if _matches(value, a))
    if origin is tuple:
        inner = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return tuple(_coerce(v, a) for v, a in zip(value, inner))
    return float(value) if hint is float else value


def _item_type(hint: object) -> object | None:
    """X for a variable-length tuple[X, ...] hint, else None."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def parse_value(cls: type, field: str, text: str | None) -> object:
    """The typed value of `--field=text` for dataclass `cls`; ValueError naming the field and its type otherwise."""
    hints = typing.get_type_hints(cls)
    if field not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"unknown option --{field}; {cls.__name__} fields are: {known}")
    hint = hints[field]
    if text is None:
        if hint is not bool:
            raise ValueError(f"--{field} needs a value (--{field}=...), its type is {hint}")
        return True
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare text: only valid for a str field (checked below)
    if not _matches(value, hint) and _matches(text, hint):
        value = text  # e.g. --experiment=123 for a str field
    item = _item_type(hint)
    if not _matches(value, hint) and item is not None:  # one item of a tuple[X, ...] field: --control=a.safetensors
        value = (value,) if _matches(value, item) else (text,) if _matches(text, item) else value
    if not _matches(value, hint):
        raise ValueError(f"--{field}={text}: expected {hint}, got {type(value).__name__} {value!r}")
    return _coerce(value, hint)


def load_experiment(path: str | Path, cls: type) -> object:
    """Import an experiment file and return its `config`, which must be a `cls` instance."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"experiment file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a normal import of the file as a module
    config = getattr(module, "config", None)
    if not isinstance(config, cls):
        raise ValueError(f"{path} must define `config = {cls.__name__}(...)`, found {type(config).__name__}")
    return config


def parse_args(cls: type, argv: list[str]) -> tuple[object, bool]:
    """argv (without the program name) -> (resolved config, dry_run). The first non-flag argument is the experiment."""
    config, overrides, dry_run, i, repeated = None, {}, False, 0, set()
    names = {f.name for f in dataclasses.fields(cls)}
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config is not None or overrides:
                raise ValueError(f"unexpected argument {arg!r}: the experiment file comes first, then --field=value")
            config = load_experiment(arg, cls)
        elif arg == "--dry_run":
            dry_run = True
        else:
            field, eq, text = arg[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--") and field in names \
                    and typing.get_type_hints(cls)[field] is not bool:
                i, text = i + 1, argv[i + 1]  # "--field value"
            value = parse_value(cls, field, text if (eq or text) else None)
            if field in repeated and _item_type(typing.get_type_hints(cls)[field]) is not None:
                value = overrides[field] + value  # a repeated tuple flag appends: --control=a --control=b
            overrides[field], repeated = value, repeated | {field}
        i += 1
    config = config if config is not None else cls()
    return dataclasses.replace(config, **overrides), dry_run


def to_dict(config: object) -> dict:
    """The config as plain JSON-able values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, d: dict) -> object:
    """Inverse of to_dict, with the same type checks; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields in saved config: {unknown}")
    for k, v in d.items():
        if not _matches(v, hints[k]):
            raise ValueError(f"saved config field {k}={v!r} does not match {hints[k]}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in d.items()})


def dumps(config: object) -> str:
    """One field per line, JSON: what --dry_run prints and config.json holds."""
    return json.dumps(to_dict(config), indent=1)
