"""Reading YAML into typed values, with errors that point at the file, key and line.

``yaml.safe_load`` forgets where things were; this module keeps the line of every
mapping key so that a wrong value can be reported as ``agent.yaml:12:
collectors.health.interval: expected a duration such as 30s, 5m or 1h, got 'soon'``.
Each section parser takes a :class:`Section`, asks for typed values, and calls
:meth:`Section.finish` so unknown keys are reported too. Problems are collected,
not raised one at a time, so an administrator sees every mistake in one run.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.errors import ConfigError, ConfigProblem

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


class LineMap(dict[Any, Any]):
    """A mapping that remembers the line (1-based) of each of its keys."""

    lines: dict[Any, int]
    line: int | None


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result.lines:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> LineMap:
    """Read a YAML file whose top level is a mapping; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(ConfigProblem(path, "", "file not found")) from None
    except PermissionError:
        raise ConfigError(ConfigProblem(path, "", "permission denied reading the file")) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(ConfigProblem(path, "", f"not UTF-8 text ({exc.reason})")) from None
    except OSError as exc:
        raise ConfigError(ConfigProblem(path, "", f"cannot read: {exc.strerror}")) from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path) -> LineMap:
    """Parse YAML text into a :class:`LineMap`; ``path`` is used only in messages."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 -- _LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = f"invalid YAML: {exc.problem or exc.context}"
        raise ConfigError(ConfigProblem(path, "", reason, line)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(ConfigProblem(path, "", f"invalid YAML: {exc}")) from None
    if data is None:
        data = LineMap()
        data.lines, data.line = {}, None
    if not isinstance(data, LineMap):
        raise ConfigError(ConfigProblem(path, "", "the top level must be a mapping of keys", 1))
    return data


def parse_duration(value: object) -> float | None:
    """``'30s'`` → 30.0; a bare number is seconds. None when it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value)
    if m is None:
        return None
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int | None:
    """``'256MiB'`` → 268435456; a bare number is bytes. None when it is not a size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    m = _SIZE.match(value)
    if m is None:
        return None
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for display: 3600 → ``'1h'``."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


class Problems:
    """Collects configuration problems for one file."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.items: list[ConfigProblem] = []

    def add(self, key: str, reason: str, line: int | None = None) -> None:
        """Record one problem."""
        self.items.append(ConfigProblem(self.file, key, reason, line))

    def raise_if_any(self) -> None:
        """Raise a :class:`ConfigError` listing every problem, if there are any."""
        if self.items:
            raise ConfigError(list(self.items))


_MISSING = object()


class Section:
    """A typed view of one mapping in the configuration.

    Every getter records a problem and returns the default when the value is
    wrong, so that parsing continues and all problems are reported at once.
    """

    def __init__(
        self, data: object, path: builtins.str, problems: Problems, line: builtins.int | None = None
    ):
        self.where = path
        self.problems = problems
        self.line = line
        self._used: set[str] = set()
        if data is None:
            data = LineMap()
            data.lines, data.line = {}, line
        if not isinstance(data, dict):
            problems.add(
                path or "(top level)", f"expected a mapping of keys, got {_describe(data)}", line
            )
            data = LineMap()
            data.lines, data.line = {}, line
        self.data: dict[Any, Any] = data
        self.lines: dict[Any, builtins.int] = getattr(data, "lines", {})
        self.line = getattr(data, "line", None) or line

    @property
    def file(self) -> Path:
        """The configuration file this section came from."""
        return self.problems.file

    def key_path(self, key: builtins.str) -> builtins.str:
        """The dotted path of ``key`` inside this section."""
        return f"{self.where}.{key}" if self.where else key

    def line_of(self, key: builtins.str) -> builtins.int | None:
        """The line of ``key``, or of this section when the key is absent."""
        return self.lines.get(key, self.line)

    def has(self, key: builtins.str) -> builtins.bool:
        """Whether the key is present (and not null)."""
        return self.data.get(key) is not None

    def problem(self, key: builtins.str, reason: builtins.str) -> None:
        """Record a problem about ``key`` in this section."""
        self.problems.add(self.key_path(key), reason, self.line_of(key))

    def _raw(self, key: builtins.str, default: object) -> object:
        self._used.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(key, "is required")
            return _MISSING
        return value

    def raw(self, key: builtins.str) -> object:
        """The untyped value, or None; marks the key as known."""
        self._used.add(key)
        return self.data.get(key)

    def section(self, key: builtins.str) -> Section:
        """The sub-mapping ``key`` (empty when absent)."""
        self._used.add(key)
        return Section(self.data.get(key), self.key_path(key), self.problems, self.line_of(key))

    def _typed(
        self,
        key: builtins.str,
        default: T | object,
        convert: Callable[[object], T | None],
        expected: builtins.str,
    ) -> T:
        value = self._raw(key, default)
        if value is _MISSING:
            if default is _MISSING or default is None:
                return default  # type: ignore[return-value]
            return convert(default)  # type: ignore[return-value]
        converted = convert(value)
        if converted is None:
            self.problem(key, f"expected {expected}, got {_describe(value)}")
            return default  # type: ignore[return-value]
        return converted

    def str(
        self,
        key: builtins.str,
        default: object = _MISSING,
        *,
        pattern: builtins.str | None = None,
        hint: builtins.str = "",
    ) -> builtins.str:
        """A string; ``pattern`` (a full-match regex) restricts it."""
        value = self._typed(
            key, default, lambda v: v if isinstance(v, builtins.str) else None, "a string"
        )
        if isinstance(value, builtins.str) and pattern and re.fullmatch(pattern, value) is None:
            self.problem(key, f"{value!r} is not valid{': ' + hint if hint else ''}")
        return value

    def bool(self, key: builtins.str, default: object = _MISSING) -> builtins.bool:
        """A YAML boolean (true/false)."""
        return self._typed(
            key, default, lambda v: v if isinstance(v, builtins.bool) else None, "true or false"
        )

    def int(
        self,
        key: builtins.str,
        default: object = _MISSING,
        *,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
    ) -> builtins.int:
        """An integer within [min, max]."""
        value = self._typed(
            key,
            default,
            lambda v: (
                v if isinstance(v, builtins.int) and not isinstance(v, builtins.bool) else None
            ),
            "a whole number",
        )
        self._check_range(key, value, min, max, builtins.str)
        return value

    def duration(
        self,
        key: builtins.str,
        default: object = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
    ) -> float:
        """A duration in seconds, written ``30s``, ``5m``, ``1h``, ``7d`` or a number."""
        value = self._typed(key, default, parse_duration, "a duration such as 30s, 5m or 1h")
        self._check_range(key, value, min, max, format_duration)
        return value

    def size(
        self,
        key: builtins.str,
        default: object = _MISSING,
        *,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
    ) -> builtins.int:
        """A size in bytes, written ``64KiB``, ``256MiB``, ``1GiB`` or a number."""
        value = self._typed(key, default, parse_size, "a size such as 64KiB, 256MiB or 1GiB")
        self._check_range(key, value, min, max, lambda n: f"{n} bytes")
        return value

    def path(
        self, key: builtins.str, default: object = _MISSING, *, absolute: builtins.bool = True
    ) -> Path:
        """A filesystem path; absolute unless told otherwise."""
        value = self._typed(
            key, default, lambda v: Path(v) if isinstance(v, builtins.str) and v else None, "a path"
        )
        if isinstance(value, Path) and absolute and not value.is_absolute():
            self.problem(key, f"must be an absolute path, got {str(value)!r}")
        return value

    def str_list(self, key: builtins.str, default: object = _MISSING) -> tuple[builtins.str, ...]:
        """A list of strings (a single string is taken as a one-item list)."""

        def convert(v: object) -> tuple[builtins.str, ...] | None:
            if isinstance(v, builtins.str):
                return (v,)
            if isinstance(v, list) and all(isinstance(i, builtins.str) for i in v):
                return tuple(v)
            return None

        return self._typed(key, default, convert, "a list of strings")

    def path_list(self, key: builtins.str, default: object = _MISSING) -> tuple[Path, ...]:
        """A list of absolute paths."""
        items = self.str_list(key, default)
        paths = tuple(Path(i) for i in items)
        for p in paths:
            if not p.is_absolute():
                self.problem(key, f"must list absolute paths, got {str(p)!r}")
        return paths

    def choice(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: object = _MISSING
    ) -> builtins.str:
        """One string out of ``choices``."""
        value = self.str(key, default)
        if isinstance(value, builtins.str) and value not in choices:
            self.problem(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def _check_range(
        self, key: builtins.str, value: Any, lo: Any, hi: Any, fmt: Callable[[Any], builtins.str]
    ) -> None:
        if (
            value is None
            or isinstance(value, builtins.bool)
            or not isinstance(value, builtins.int | float)
        ):
            return
        if lo is not None and value < lo:
            self.problem(key, f"must be at least {fmt(lo)}, got {fmt(value)}")
        elif hi is not None and value > hi:
            self.problem(key, f"must be at most {fmt(hi)}, got {fmt(value)}")

    def keys(self) -> Iterator[builtins.str]:
        """The keys present in this section."""
        return iter(self.data)

    def finish(self) -> None:
        """Report every key of this section that no getter asked for."""
        for key in self.data:
            if key not in self._used:
                known = ", ".join(sorted(self._used)) or "none"
                self.problems.add(
                    self.key_path(str(key)),
                    f"unknown key (known here: {known})",
                    self.lines.get(key, self.line),
                )


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value!r}"
