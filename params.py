"""Hyperparameter dataclasses filled from ``-p NAME=VALUE`` strings or TOML values, shared by the
orthogonality variants (``train/variants``) and the architectures (``train/archs``).

A config class is a dataclass whose fields have defaults; an optional ``ranges`` class attribute
maps field names to a range spec (see :func:`check_range`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string literal after each field), as
    one-line text: ``{field name: doc}``; fields without one are absent. This is how the CLI takes
    its help texts from the config classes, so each is written once."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # base classes first, so a subclass's doc wins
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:], strict=False):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split()).replace("``", "`")
    return docs


def field_defaults(cls: type) -> dict[str, Any]:
    """``{field name: default}`` of a dataclass (factories called; fields without a default absent)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def convert_param(owner: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (a CLI string or a TOML value) as the type of the field's ``default``.

    ``owner`` names the variant or architecture in error messages. Raises ``ConfigError``.
    """
    kind = type(default)
    where = f"-p {key}={value!r} ({owner})"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ConfigError(f"{where}: expected true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got a boolean")
        if isinstance(value, int | float) and not (kind is int and isinstance(value, float) and not value.is_integer()):
            out = kind(value)
        elif isinstance(value, str):
            try:
                out = kind(value) if kind is float else int(value, 10)
            except ValueError:
                raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}") from None
        else:
            raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(out):
            raise ConfigError(f"{where}: must be finite")
        return out
    if isinstance(default, str):
        if isinstance(value, list):  # a TOML array for a comma-separated field
            return ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    return value


def check_range(owner: str, key: str, value: Any, spec: str) -> None:
    """``spec``: ``>=x``, ``>x``, ``=x``, ``[a,b]`` / ``(a,b]`` / ``[a,b)`` intervals, ``{a,b,c}`` choices,
    or alternatives joined by ``|`` (``=-1|>=0``: the sentinel −1 or a non-negative value).

    A tuple or list is checked element by element.

    Raises ``ConfigError`` naming the parameter and the allowed values."""
    if isinstance(value, tuple | list):
        for v in value:
            check_range(owner, key, v, spec)
        return
    ok = True
    if "|" in spec:  # alternatives, e.g. "=-1|>=0": a sentinel or a range
        errors = []
        for alt in spec.split("|"):
            try:
                check_range(owner, key, value, alt)
                return
            except ConfigError as e:
                errors.append(str(e).rsplit("it must be ", 1)[-1])
        raise ConfigError(f"-p {key}={value!r} ({owner}) is out of range: it must be {' or '.join(errors)}")
    if spec.startswith("="):
        ok, allowed = value == float(spec[1:]), f"exactly {spec[1:]}"
    elif spec.startswith("{"):
        ok = value in spec[1:-1].split(",")
        allowed = "one of " + spec[1:-1].replace(",", ", ")
    elif spec.startswith(">="):
        ok, allowed = value >= float(spec[2:]), spec
    elif spec.startswith(">"):
        ok, allowed = value > float(spec[1:]), spec
    else:
        lo, hi = (float(v) for v in spec[1:-1].split(","))
        ok = (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)
        allowed = f"in {spec}"
    if not ok:
        raise ConfigError(f"-p {key}={value!r} ({owner}) is out of range: it must be {allowed}")


def build_params(cls: type, owner: str, params: dict[str, Any] | None = None) -> Any:
    """An instance of the config dataclass ``cls`` from its defaults overridden by ``params``.

    Strings are converted to each field's type and every value is checked against ``cls.ranges``.
    Raises ``ConfigError`` for an unknown key (listing the valid ones), a wrong type or a value out
    of range."""
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ranges = getattr(cls, "ranges", {})
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(f"{owner} has no parameter {key!r} (it has: {', '.join(fields) or 'none'})")
        default = fields[key].default
        kwargs[key] = convert_param(owner, key, value, default) if default is not dataclasses.MISSING else value
    for key in fields:
        if key in ranges:
            check_range(owner, key, kwargs.get(key, fields[key].default), ranges[key])
    return cls(**kwargs)
