"""Dataclasses to and from JSON, checked against their type annotations.

A recipe is read from files a user (or another tool) wrote, so every value is checked against the
field's annotation and a mistake is reported with its path (``soup.greedy_trace[2].kept: expected
a boolean, got the string 'false'``) instead of being coerced: ``bool("false")`` is true.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from hf_soups.errors import RecipeError

T = TypeVar("T")

RECORD_NULL = {"record_null": True}
"""Field metadata: write this field as ``null`` when it is ``None`` rather than leaving it out."""

_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def to_json(value: Any) -> Any:
    """A dataclass (or list/dict of them) as plain JSON data.

    ``None`` fields are left out, except those declared with :data:`RECORD_NULL` metadata, whose
    ``null`` says something (a local folder has no revision; a merge without a base).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None or f.metadata.get("record_null")
        }
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def from_json(cls: type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` (a dataclass) from JSON data, checking every field's type.

    Raises:
        RecipeError: naming the field's path, for unknown keys, missing required fields and
            values of the wrong type.
    """
    return _convert(cls, data, path or cls.__name__)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {str(value)[:40]}"


def _convert(annotation: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except RecipeError as error:
                errors.append(error)
        raise (
            errors[0] if len(errors) == 1 else RecipeError(f"{path}: unexpected {_describe(value)}")
        )
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_describe(value)}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_convert(item, element, f"{path}[{i}]") for i, element in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {_describe(value)}")
        _, item = typing.get_args(annotation) or (str, Any)
        return {key: _convert(item, element, f"{path}.{key}") for key, element in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _dataclass(annotation, value, path)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation in _NAMES:
        if type(value) is annotation:
            return value
    else:
        raise TypeError(f"{path}: unsupported annotation {annotation!r}")
    raise RecipeError(f"{path}: expected {_NAMES[annotation]}, got {_describe(value)}")


def _dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{path}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{path}: missing required key {name!r}")
    return cls(**kwargs)
