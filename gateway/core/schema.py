"""Typed loading of plain data (parsed YAML) into frozen dataclasses.

Rules, applied recursively from the top-level dataclass:

* every key must name a field (unknown keys are errors, with a close-match hint);
* a field without a default is required; defaults are the dataclasses' own;
* ``int`` accepts integers only, ``float`` accepts integers and floats, ``bool`` only booleans;
* ``Literal[...]`` accepts exactly its values; ``X | None`` accepts null;
* ``list[X]`` / ``tuple[X, ...]`` become tuples, ``dict[str, X]`` becomes a dict;
* ``Secret`` accepts a string, usually ``${ENV_VAR}``, and masks itself in reprs;
* strings may reference the environment: ``${NAME}`` or ``${NAME:-default}``; a missing
  variable without default is an error naming the variable. Where ``NAME`` is not set but
  ``NAME_FILE`` is, the reference reads that file (Docker/Kubernetes secrets mounted as files;
  one trailing newline dropped);
* a field's ``metadata["check"]`` (a predicate and a description) validates the value; a
  predicate that raises counts as a failed check;
* a dataclass's ``__post_init__`` holds its cross-field rules and raises :class:`ConfigError`
  with paths relative to itself (they are prefixed with the dataclass's own path).

Validation does not stop at the first problem: every bad key of a file is collected and one
:class:`ConfigError` carries them all (``errors``), each a :class:`ConfigIssue` with the
dotted path of the bad key (``models.add_sub.batching.max_delay_ms``), what was expected and
what was found. Values shown in messages have URL credentials masked (:func:`mask_url`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_QUERY = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|pwd|token|secret|key|auth)[^=&]*=)[^&]*")


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem of a configuration: the dotted path of the bad key and what is wrong."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.problem}"


class ConfigError(ValueError):
    """Every problem found in a configuration (``errors``, in document order).

    ``ConfigError(path, problem)`` is one problem; :meth:`of` gathers several. ``path`` and
    ``problem`` are the first one's, for callers that show a single line.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.errors: tuple[ConfigIssue, ...] = (ConfigIssue(path, problem),)
        self.path = path
        self.problem = problem
        super().__init__(str(self.errors[0]))

    @classmethod
    def of(cls, issues: Iterable[ConfigIssue]) -> ConfigError:
        found = tuple(dict.fromkeys(issues))  # the same issue reached twice counts once
        if not found:
            raise ValueError("ConfigError.of needs at least one issue")
        error = cls(found[0].path, found[0].problem)
        error.errors = found
        if len(found) > 1:
            error.args = (f"{len(found)} problems:\n" +
                          "\n".join(f"  {issue}" for issue in found),)
        return error

    def under(self, prefix: str) -> ConfigError:
        """The same problems with paths relative to ``prefix`` made absolute."""
        if not prefix:
            return self
        return ConfigError.of(ConfigIssue(_join(prefix, i.path), i.problem) for i in self.errors)


def _join(prefix: str, path: str) -> str:
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def raise_issues(issues: list[ConfigIssue]) -> None:
    """Raise every issue found at once (cross-field rules in ``__post_init__``)."""
    if issues:
        raise ConfigError.of(issues)


def mask_url(value: str) -> str:
    """Credentials in a URL replaced by ``***``: ``http://user:pass@host`` →
    ``http://user:***@host``, ``http://token@host`` → ``http://***@host``; query parameters
    named like a secret (``?password=…``, ``?token=…``) too. Any other string is returned as
    is; never raises, whatever the string."""
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or any(c in scheme for c in "/?#@ "):
        return value
    end = len(rest)
    for stop in "/?#":
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        query = _SECRET_QUERY.sub(r"\1***", query) + hash_ + fragment
    return f"{scheme}://{netloc}{path}{qmark}{query}"


class Secret:
    """A string that never shows itself in reprs, logs or ``check-config`` output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def check(predicate: Callable[[Any], bool], expected: str) -> dict[str, Any]:
    """Field metadata: ``field(default=1, metadata=check(lambda v: v > 0, "> 0"))``."""
    return {"check": (predicate, expected)}


def positive() -> dict[str, Any]:
    return check(lambda v: v > 0, "a number > 0")


def non_negative() -> dict[str, Any]:
    return check(lambda v: v >= 0, "a number >= 0")


def fraction() -> dict[str, Any]:
    return check(lambda v: 0 <= v <= 1, "a number between 0 and 1")


def expand_env(value: str, path: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        file = env.get(f"{name}_FILE")
        if file:
            try:
                text = Path(file).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise ConfigError(path, f"cannot read {name}_FILE={file}: {reason}") from None
            return text[:-1] if text.endswith("\n") else text
        if default is not None:
            return default
        raise ConfigError(path, f"environment variable {name} is not set "
                          f"(nor {name}_FILE)")

    return _ENV_REF.sub(sub, value)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Secret):
        scheme, sep, _ = value.reveal().partition("://")
        return f"a secret URL with scheme {scheme!r}" if sep else "a secret string"
    if isinstance(value, str):
        return f"str {mask_url(value)!r}"
    return f"{type(value).__name__} {value!r}"


def describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Secret:
        return "a string (secret)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of string to {describe(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def build(cls: type[T], data: object, path: str = "", env: Mapping[str, str] | None = None) -> T:
    """Build dataclass ``cls`` from plain data, or raise :class:`ConfigError`."""
    return typing.cast(T, _convert(cls, data, path, os.environ if env is None else env))


def _convert(tp: Any, value: object, path: str, env: Mapping[str, str]) -> Any:
    origin = get_origin(tp)
    if isinstance(value, str) and "${" in value:
        value = expand_env(value, path, env)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"expected {describe(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, env)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {describe(tp)}, got {_kind(value)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, path, env)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(path, f"expected {describe(tp)}, got {_kind(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {describe(tp)}, got {_kind(value)}")
        (item,) = get_args(tp)[:1]
        issues = _Issues()
        items = tuple(issues.attempt(_convert, item, v, f"{path}[{i}]", env)
                      for i, v in enumerate(value))
        issues.raise_any()
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected {describe(tp)}, got {_kind(value)}")
        _, item = get_args(tp)
        issues = _Issues()
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                issues.add(ConfigIssue(path, f"keys must be strings, got {_kind(k)}"))
                continue
            out[k] = issues.attempt(_convert, item, v, f"{path}.{k}" if path else k, env)
        issues.raise_any()
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Secret:
        if isinstance(value, str):
            return Secret(value)
    else:  # pragma: no cover - a schema bug, not a config error
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    raise ConfigError(path, f"expected {describe(tp)}, got {_kind(value)}")


class _Issues:
    """Problems gathered while converting the children of one mapping or list."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        self.found: list[ConfigIssue] = []

    def add(self, issue: ConfigIssue) -> None:
        self.found.append(issue)

    def attempt(self, convert: Callable[..., Any], *args: Any) -> Any:
        try:
            return convert(*args)
        except ConfigError as exc:
            self.found.extend(exc.errors)
            return None

    def raise_any(self) -> None:
        raise_issues(self.found)


def _passes(predicate: Callable[[Any], bool], value: object) -> bool:
    try:
        return bool(predicate(value))
    except (ValueError, TypeError, ArithmeticError):
        return False


def _convert_dataclass(cls: type[Any], value: object, path: str, env: Mapping[str, str]) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    issues = _Issues()
    for key in value:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            issues.add(ConfigIssue(where, f"unknown key{extra}; "
                                   f"allowed: {', '.join(sorted(fields))}"))
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                issues.add(ConfigIssue(where, f"required key missing; "
                                       f"expected {describe(hints[name])}"))
            continue
        before = len(issues.found)
        converted = issues.attempt(_convert, hints[name], value[name], where, env)
        if len(issues.found) > before:
            continue
        rule = f.metadata.get("check")
        if rule is not None and converted is not None:
            predicate, expected = rule
            if not _passes(predicate, converted):
                issues.add(ConfigIssue(where, f"expected {expected}, got {_kind(converted)}"))
                continue
        kwargs[name] = converted
    # Cross-field rules (__post_init__) see only a fully converted dataclass.
    issues.raise_any()
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(path) from None
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def reference(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field, recursively: the configuration
    reference in docs/configuration.md is generated from (and checked against) this."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = "null" if f.default is None else repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = "(see below)"
        else:
            default = "required"
        rows.append((key, describe(tp), default, f.metadata.get("doc", "")))
        inner = _dataclass_in(tp)
        if inner is not None:
            origin = get_origin(tp)
            marker = ".*." if origin is dict else ("[]." if origin in (list, tuple) else ".")
            rows.extend(reference(inner, key + marker))
    return rows


def _dataclass_in(tp: Any) -> type[Any] | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
