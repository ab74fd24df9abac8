"""Typed parsing of plain YAML data into frozen dataclasses.

A dataclass declares each key with a field helper (num, prob, choice, pair, budgets,
num_or_auto) that records its allowed range or choices; `parse` builds the dataclass from
plain data and refuses unknown keys, wrong types and out-of-range values with the key's full
path (e.g. `train.lr`) and the allowed range in the message; `to_dict` turns it back into plain
data. pipeline.core.config declares the params.yaml sections with these.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.core.errors import PipelineError


def read_yaml(path: Path) -> Any:
    """A YAML file read as DVC reads it: YAML 1.2, so `5e-4` and `1e-05` are numbers (PyYAML's
    YAML 1.1 reads them as strings) and the pipeline never disagrees with `dvc status`."""
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def num(default: float, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False):
    """A number in [lo, hi] ((lo, hi] when open_lo); tuples are checked element-wise."""
    return field(default=default, metadata={"range": (lo, hi, open_lo)})


def budgets(default: tuple, lo: float | None = None, hi: float | None = None):
    """One number or a list of them, each in [lo, hi]: always read as a tuple."""
    return field(default=default, metadata={"range": (lo, hi, False), "one_or_more": True})


def num_or_auto(default: int | str, lo: int, hi: int):
    """A number in [lo, hi], or "auto": ingest chooses it from the images (pipeline.data.image_stats)
    and every later stage reads what it chose from the packed images (`with_image_shape`)."""
    return field(default=default, metadata={"range": (lo, hi, False), "auto": True})


AUTO = "auto"


def prob(default: float):
    return num(default, 0.0, 1.0)


def choice(default: str, *options: str):
    return field(default=default, metadata={"choices": (default, *options)})


def pair(default: tuple, lo: float | None = None, hi: float | None = None):
    """A (low, high) pair with low <= high, both in [lo, hi]."""
    return field(default=default, metadata={"range": (lo, hi, False), "ordered": True})


def parse(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from plain data, validating as it goes."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a mapping, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise PipelineError(
            f"{where}: unknown key {_join(where, unknown[0])!r}; allowed: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {
        name: _convert(hints[name], raw[name], _join(where, name), fields[name].metadata)
        for name in fields
        if name in raw
    }
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """Plain, JSON-friendly data from a config object (saved beside every artifact)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _convert(hint: Any, value: Any, where: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value, where, meta)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {_describe(value)}")
        return {
            _convert(key_type, k, where, {}): _convert(value_type, v, _join(where, str(k)), meta)
            for k, v in value.items()
        }
    if origin is tuple:
        args = typing.get_args(hint)
        if meta.get("one_or_more"):
            if not isinstance(value, list | tuple):
                return (_convert(args[0], value, where, meta),)
            if not value:
                raise PipelineError(f"{where}: expected at least one value, got []")
        if not isinstance(value, list | tuple):
            raise PipelineError(f"{where}: expected a list, got {_describe(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, f"{where}[{i}]", meta) for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise PipelineError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [
                _convert(a, v, f"{where}[{i}]", meta) for i, (a, v) in enumerate(zip(args, value))
            ]
        if meta.get("ordered") and items != sorted(items):
            raise PipelineError(f"{where}: expected [low, high] with low <= high, got {value}")
        return tuple(items)
    return _check_scalar(hint, value, where, meta)


def _check_scalar(hint: Any, value: Any, where: str, meta: typing.Mapping[str, Any]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise PipelineError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if meta.get("auto") and value == AUTO:
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            expected = "an integer or auto" if meta.get("auto") else "an integer"
            raise PipelineError(f"{where}: expected {expected}, got {_describe(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PipelineError(f"{where}: expected a number, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise PipelineError(f"{where}: expected a finite number, got {value}")
    elif hint is str:
        if not isinstance(value, str):
            raise PipelineError(f"{where}: expected a string, got {_describe(value)}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise PipelineError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    if "range" in meta:
        lo, hi, open_lo = meta["range"]
        below = lo is not None and (value <= lo if open_lo else value < lo)
        above = hi is not None and value > hi
        if below or above:
            low = "-inf" if lo is None else lo
            high = "inf" if hi is None else hi
            bracket = "(" if open_lo else "["
            raise PipelineError(
                f"{where}: {value} is out of range; allowed {bracket}{low}, {high}]"
            )
    return value


def _join(where: str, key: str) -> str:
    return key if where.endswith(".yaml") else f"{where}.{key}"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
