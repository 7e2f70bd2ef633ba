"""From a schema's ValidationError to the one line a user reads: ``file:line: field: message``.

pydantic reports where a value is wrong as a location (keys and list indexes); the YAML
loader recorded the line of each such path, so the first mistake in the file becomes one
`ConfigError` (exit 2). Checks that span several fields raise `fail(message, *at)`, naming
the field(s) below the model they check; the location is extended by `at`.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from harness.config.yaml import Lines, one_line
from harness.errors import ConfigError


def fail(message: str, *at: str | int) -> PydanticCustomError:
    """A schema error with our own wording, at the field path `at` below the checked value."""
    return PydanticCustomError("config", "{message}", {"message": message, "at": at})


M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """A mapping of a configuration file: unknown fields are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: how an unknown key is called in messages ("unknown field", "unknown rule")
    unknown_word: ClassVar[str] = "field"
    #: said after the allowed names of an unknown key's message
    unknown_note: ClassVar[str] = ""
    #: what the mapping must look like, for "must be ..." when something else is given
    shape: ClassVar[str] = "a mapping"


def _text(value: Any) -> str:
    """Free text: numbers and booleans written in YAML are kept as written."""
    if isinstance(value, dict | list):
        raise fail(f"must be text, got {value!r}")
    return "" if value is None else str(value)


#: a free-text field (description, ids)
Text = Annotated[str, BeforeValidator(_text)]


def choice(what: str, choices: tuple[str, ...]) -> Any:
    """A field type for one of `choices`: ``unknown kind 'x' (allowed: a, b)`` otherwise."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise fail(f"unknown {what} {value!r} (allowed: {', '.join(choices)})")
        return value

    return Annotated[str, BeforeValidator(check)]


class Checker:
    """Raises ConfigError with file:line: field: message (field: message without a file)."""

    def __init__(self, source: str | None, lines: Lines) -> None:
        self.source, self.lines = source, lines

    def line(self, path: tuple) -> int:
        """The line of `path`, or of the nearest enclosing path the file has."""
        path = tuple(path)
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def fail(self, path: tuple, message: str) -> ConfigError:
        """One line, whatever the file holds: control characters are escaped."""
        dotted = ".".join(str(p) for p in path) or "(top level)"
        where = f"{self.source}:{self.line(path)}: " if self.source else ""
        return ConfigError(one_line(f"{where}{dotted}: {message}"))


def validate(model: type[M], data: Any, check: Checker, prefix: tuple = ()) -> M:
    """`data` (found at `prefix` in the file) as a `model`, or the first mistake in the file
    as one ConfigError line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, model, check, prefix) from None


def first_error(
    exc: ValidationError, model: type[BaseModel], check: Checker, prefix: tuple = ()
) -> ConfigError:
    """The error nearest the top of the file (pydantic's order among those on one line);
    what is written wrong comes before what is missing (an unknown key is often a typo of
    the missing one)."""
    located = []
    for order, error in enumerate(exc.errors(include_url=False)):
        path = (*prefix, *error["loc"], *(error.get("ctx") or {}).get("at", ()))
        absent = tuple(path) not in check.lines
        located.append((absent, check.line(path), order, path, error))
    *_, path, error = min(located, key=lambda item: item[:3])
    return check.fail(path, _message(error, model, tuple(error["loc"])))


def _message(error: dict[str, Any], model: type[BaseModel], loc: tuple) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "config":
        return error["ctx"]["message"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        if owner is not None:
            names = ", ".join(f.alias or name for name, f in owner.model_fields.items())
            return f"unknown {owner.unknown_word} (allowed: {names}{owner.unknown_note})"
        return "unknown field"
    if kind == "missing":
        owner = _model_at(model, loc[:-1])
        field = owner.model_fields.get(str(loc[-1])) if owner is not None else None
        described = field.description if field is not None else None
        return f"missing (allowed: {described})" if described else "missing"
    if kind == "model_type":
        owner = _model_at(model, loc)
        return f"must be {owner.shape if owner is not None else 'a mapping'}, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"invalid value {value!r} (allowed: true or false)"
    if kind in ("string_type", "str_type"):
        return f"must be text, got {value!r}"
    return f"invalid value {value!r}: {error['msg'][:1].lower()}{error['msg'][1:]}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that validates the value at `loc` (None: not a model)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                by_alias = [f for f in current.model_fields.values() if f.alias == part]
                field = by_alias[0] if by_alias else None
            if field is None:
                return None
            current = field.annotation
        else:
            args = typing.get_args(current)
            origin = typing.get_origin(current)
            if origin in (dict, typing.Mapping) and len(args) == 2:
                current = args[1]
            elif origin in (list, tuple) and args:
                current = args[0]
            else:
                return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """`X` from Annotated[X, ...] and from `X | None`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation
