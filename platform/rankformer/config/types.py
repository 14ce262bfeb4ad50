"""The option values a job accepts, as types: the command line offers them as choices and every
config checks them at the door (:func:`check_choices`), so the list is written once."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args

from rankformer.errors import InputError

Layout = Literal["v1", "v2"]  # v1: genes only; v2: <cls> genes <eos>
# the inference jobs' and endpoints' weights; training's spellings (fp32, bf16, fp16) mean the same
Precision = Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
TrainPrecision = Literal["auto", "bf16", "fp32", "float32", "bfloat16"]
Level = Literal["cell", "gene"]
Pooling = Literal["mean", "cls"]
GeneStat = Literal["mean", "median"]
PerturbKind = Literal["delete", "overexpress", "inhibit", "activate"]
PerturbMode = Literal["each", "together", "all"]
Missing = Literal["skip", "error"]
Schedule = Literal["linear", "cosine"]
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Peft = Literal["none", "lora"]
Quantize = Literal["none", "8bit", "4bit"]


def choices(t: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` type (also inside ``X | None``); None for any other type."""
    if typing.get_origin(t) is Literal:
        return get_args(t)
    for arg in get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else ():
        if typing.get_origin(arg) is Literal:
            return get_args(arg)
    return None


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value is not None and value not in allowed:
        *most, last = [str(a) for a in allowed]
        one_of = f"{', '.join(most)} or {last}" if most else last
        raise InputError(f"{name} {value!r} must be {one_of}")


def check_choices(cfg: Any) -> None:
    """Every ``Literal``-typed field of dataclass ``cfg`` holds one of its values."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        allowed = choices(hints[f.name])
        if allowed is not None:
            check_choice(f.name, getattr(cfg, f.name), allowed)


def as_layout(value: Any) -> Layout:
    """A layout read from a file (a model's or corpus's metadata), checked."""
    check_choice("layout", value, get_args(Layout))
    return typing.cast(Layout, value)
