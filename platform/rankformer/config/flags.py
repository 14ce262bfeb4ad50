"""Command-line flags and YAML config files from the typed config dataclasses, parsed by
jsonargparse, so every command behaves alike:

- one flag per leaf field, named after it (``read.gene_id_column`` -> ``--gene-id-column``), typed
  from its annotation (``list[float]`` takes ``--tune-lr 1e-5 1e-3``; a ``Literal`` lists and
  enforces its choices; fields without a default are marked required), with the field's trailing
  comment as its help;
- ``--config FILE.yaml``, nested as the dataclasses are; flags override it wherever they stand;
- every option also read from an environment variable (``RANKFORMER_PRETRAIN__OPTIM__LR``),
  listed under each flag in ``--help``;
- ``rankformer --print_completion shtab-bash`` (or ``shtab-zsh``) prints a shell completion script.

A wrong value is an error naming the flag; :func:`build` then makes the dataclass (its checks name
the field and the fix). Field names are unique across a config's nesting by construction; a clash
is a programming error caught here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace, set_parsing_settings

from rankformer.errors import InputError

set_parsing_settings(add_print_completion_argument=True)
__all__ = [
    "ActionYesNo",
    "Namespace",
    "add_config_arguments",
    "build",
    "command_parser",
    "gathered",
    "leaves",
]

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
    def dest(self) -> str:  # jsonargparse nests dotted destinations as the YAML nests
        return self.dotted

    @property
    def flag(self) -> str:
        return "--" + self.path[-1].replace("_", "-")


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


def command_parser(**options: Any) -> ArgumentParser:
    """A (sub)command's parser: environment variables as defaults, listed in ``--help``."""
    return ArgumentParser(default_env=True, exit_on_error=False, **options)


def _element(t: Any) -> Any:
    args = typing.get_args(t)
    return args[0] if args else str


def add_config_arguments(
    p: ArgumentParser, cls: type, positional: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> None:
    """One flag per leaf field of ``cls`` (``positional``: fields taken as positional arguments;
    ``skip``: fields the command declares itself), and ``--config``."""
    p.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML file of options, nested as the config (flags override it)",
    )
    seen: dict[str, str] = {}
    for leaf in leaves(cls):
        name = leaf.path[-1]
        if name in skip:
            continue
        if name in seen:
            raise RuntimeError(f"config field {leaf.dotted} clashes with {seen[name]} as a flag")
        seen[name] = leaf.dotted
        t, _ = _base(leaf.type)
        required = leaf.default is _MISSING
        kw: dict[str, Any] = {"dest": leaf.dest, "help": leaf.help}
        if not required:
            kw["default"] = leaf.default
        origin = typing.get_origin(t)
        if name in positional:
            # the positional words land apart (an empty list would override --config's value);
            # :func:`values_of` takes them when given. `--inputs` and the YAML key stay the field.
            p.add_argument(
                POSITIONAL + leaf.dest, nargs="*", type=_element(t), metavar=name.upper(), help=leaf.help
            )
            p.add_argument(leaf.flag, dest=leaf.dest, nargs="+", type=_element(t), help=leaf.help)
            continue
        if t is bool:
            kw["action"] = ActionYesNo(no_prefix="no-")  # --use-gpu / --no-use-gpu
        elif origin is list:
            # `--x a b` (and `--x a --x b`: :func:`gathered` joins repeats before parsing)
            kw.update(type=_element(t), nargs="+")
        else:
            kw["type"] = leaf.type  # Literal choices, int | None, dict[str, Any]: checked as typed
        if required:
            kw["required"] = True
        p.add_argument(leaf.flag, **kw)


def collection_flags(cls: type, skip: tuple[str, ...] = ()) -> tuple[set[str], set[str]]:
    """(flags of list fields, flags of mapping fields) of ``cls``: what :func:`gathered` joins."""
    lists: set[str] = set()
    maps: set[str] = set()
    for leaf in leaves(cls):
        if leaf.path[-1] in skip:
            continue
        origin = typing.get_origin(_base(leaf.type)[0])
        (lists if origin is list else maps if origin is dict else set()).add(leaf.flag)
    return lists, maps


def gathered(
    argv: Sequence[str], lists: set[str], maps: set[str], renames: frozenset[str] = frozenset()
) -> list[str]:
    """``argv`` with repeated list flags joined into one (``--labels a --labels b`` ->
    ``--labels a b``) and mapping flags' ``KEY=VALUE`` words (``--model num_hidden_layers=4``)
    written as the one mapping the parser takes (values read as YAML: ``4`` is a number);
    ``renames``: mapping flags of ``NAME[:NEW]`` words (``--carry celltype:cell_type donor``)."""
    maps = maps | renames
    out: list[str] = []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        flag, eq, inline = word.partition("=")
        if flag in lists or flag in maps:
            items = [inline] if eq else []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
                items.append(argv[i])
                i += 1
            if flag not in values:
                values[flag] = []
                out.append(flag)  # the joined values go where the flag first stood
            values[flag] += items
            continue
        out.append(word)
        i += 1
    joined: list[str] = []
    for word in out:
        joined.append(word)
        if word in values:
            if word in renames:
                joined.append(json.dumps({k: v or k for k, _, v in (w.partition(":") for w in values[word])}))
            else:
                joined += [_mapping(word, values[word])] if word in maps else values[word]
    return joined


def _mapping(flag: str, items: list[str]) -> str:
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        return items[0]  # already a mapping: {a: 1}
    doc: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(
                f"{flag}: expected KEY=VALUE words, got {item!r} (e.g. {flag} num_hidden_layers=4)"
            )
        doc[key] = yaml.safe_load(value)
    return json.dumps(doc)


POSITIONAL = "given_"  # the destination prefix of a field's positional words


def values_of(ns: Namespace) -> dict[str, Any]:
    """A parsed (sub)command's options as the nested mapping :func:`build` takes."""
    doc = ns.clone().as_dict()
    for key in ("config", "__path__", "print_completion"):
        doc.pop(key, None)
    for key in [k for k in doc if k.startswith(POSITIONAL)]:
        words = doc.pop(key)
        if words:
            doc[key[len(POSITIONAL) :]] = words
        elif doc.get(key[len(POSITIONAL) :]) is None:
            doc.pop(key[len(POSITIONAL) :], None)  # neither given: build() names it missing
    return doc


def merged_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` from a parsed command (config file, environment and flags, as
    jsonargparse laid them over each other), as a nested mapping."""
    values = getattr(args, "values", None)
    if values is None:
        raise TypeError("merged_values takes the namespace rankformer.cli.parse gives")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


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
