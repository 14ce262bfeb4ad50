"""Command-line flags and YAML loading generated from the typed config dataclasses, so every
command behaves alike: `--config FILE.yaml` (nested as the dataclasses are), flags override it,
and a wrong value is an error naming the field.

Each leaf field becomes one flag named after it (`read.gene_id_column` -> `--gene-id-column`),
with its type, default and help (the field's trailing comment in the source). Field names are
unique across a config's nesting by construction; a clash is a programming error caught here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any

import yaml

from rankformer.config.types import choices
from rankformer.errors import InputError

_MISSING = dataclasses.MISSING


@dataclasses.dataclass
class Leaf:
    path: tuple[str, ...]  # field names from the root config down to this field
    type: Any
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each `name: type = default` line of a dataclass body (and of its
    dataclass bases, for fields a subclass inherits)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^\n#]+?#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += leaves(t, (*prefix, f.name))  # type: ignore[arg-type]
            continue
        default = f.default if f.default is not _MISSING else _MISSING
        if f.default_factory is not _MISSING:
            default = f.default_factory()
        out.append(Leaf((*prefix, f.name), t, default, _comments(cls).get(f.name, "")))
    return out


def _base(t: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return t, False


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def add_config_arguments(
    p: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> None:
    """One flag per leaf field of ``cls`` (``positional``: fields taken as positional arguments;
    ``skip``: fields the command parses itself)."""
    seen: dict[str, str] = {}
    for leaf in leaves(cls):
        name = leaf.path[-1]
        if name in skip:
            continue
        if name in seen:
            raise RuntimeError(f"config field {leaf.dotted} clashes with {seen[name]} as a flag")
        seen[name] = leaf.dotted
        t, _ = _base(leaf.type)
        # a None default whose help already says what stands in for it ("default ...", "unset: ...")
        # is not repeated
        said = leaf.default in (None, []) and ("default" in leaf.help or "unset" in leaf.help)
        default = "" if leaf.default is _MISSING or said else f" (default {leaf.default!r})"
        kw: dict[str, Any] = {"dest": leaf.dest, "default": None, "help": leaf.help + default}
        if t is not bool:
            allowed = choices(t)  # shown, not enforced by argparse: the config's check names the field
            kw["metavar"] = "{" + ",".join(map(str, allowed)) + "}" if allowed else name.upper()
        origin = typing.get_origin(t)
        if name in positional:
            p.add_argument(leaf.dest, nargs="*", metavar=name.upper(), help=leaf.help, default=None)
            continue
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kw.update(nargs="+", action="extend")  # `--x a b` and `--x a --x b` alike
        elif origin is dict:
            kw.update(action="append", type=_kv, metavar="KEY=VALUE")
        elif t in (int, float):
            kw["type"] = t
        p.add_argument("--" + name.replace("_", "-"), **kw)
    p.add_argument("--config", help="YAML file of options (nested as the config); flags override it")


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(doc.get(key), dict):
            doc[key] = {}
        doc = doc[key]
    doc[path[-1]] = value


def merged_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config file's values with the given flags laid over them (nested dict)."""
    doc: dict[str, Any] = {}
    if getattr(args, "config", None):
        from rankformer.config.corpus import load_yaml

        doc = load_yaml(args.config)
    for leaf in leaves(cls):
        value = getattr(args, leaf.dest, None)
        if value is None or value == []:
            continue
        if typing.get_origin(_base(leaf.type)[0]) is dict and isinstance(value, list):
            value = dict(value)
        _set(doc, leaf.path, value)
    return doc


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` from nested values, checking names and types; errors name the field and the fix."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown option(s) {[prefix + u for u in unknown]}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if f.name not in values:
            if f.default is _MISSING and f.default_factory is _MISSING:
                flag = "--" + f.name.replace("_", "-")
                raise InputError(f"missing {prefix + f.name!r}: give it as {flag} or in --config")
            continue
        v = values[f.name]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise InputError(f"{prefix + f.name} must be a mapping of options, got {v!r}")
            kwargs[f.name] = build(t, v, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _check_type(prefix + f.name, t, v)
    return cls(**kwargs)


def _check_type(name: str, t: Any, v: Any) -> Any:
    base, optional = _base(t)
    if v is None and optional:
        return None
    origin = typing.get_origin(base) or base
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, int | float) and not isinstance(v, bool),
        str: isinstance(v, str),
        list: isinstance(v, list),
        dict: isinstance(v, dict),
    }.get(origin, True)
    if not ok:
        want = getattr(origin, "__name__", str(origin))
        raise InputError(f"option {name!r} must be {want}, got {v!r} ({type(v).__name__})")
    return float(v) if origin is float else v
