"""The generic validator: one mapping of the raw config, its key path and every problem."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

_MISSING: Any = object()
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
               "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"500GiB"`` (binary), ``"200GB"`` / ``"200G"`` (decimal)."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value if isinstance(value, str)
                     else "")
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r} (use e.g. 500GiB, 200GB or bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_fraction(value: object) -> float:
    """A fraction in [0, 1] from ``0.9`` or ``"90%"``."""
    if isinstance(value, bool):
        raise ValueError("expected a fraction such as 0.9 or 90%")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"invalid percentage {value!r}") from None
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("expected a fraction between 0 and 1, or a percentage such as 90%")
    return float(value)


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"45s"``, ``"10m"``, ``"1h30m"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite, non-negative number of seconds")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration such as 30s, 10m or 1h")
    text = value.strip()
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h)")
    return total


class _Section:
    """Reads one mapping of the raw config, remembering its key path and every problem."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem("", f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        where = self.key(name) if name else (self.path or "(root)")
        self.problems.append(f"{where}: {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is _MISSING:
                self.problem(name, "is required")
                return None
            return default
        return self.data[name]

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str) or not value:
            self.problem(name, "expected a non-empty string")
            return default if default is not _MISSING else None
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.problem(name, "expected true or false")
            return default
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int = 1 << 31) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, "expected an integer")
            return default
        if not minimum <= value <= maximum:
            self.problem(name, f"must be between {minimum} and {maximum}")
            return default
        return value

    def duration(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def size(self, name: str, default: int | None) -> int | None:
        value = self.raw(name, default)
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def fraction(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        try:
            return parse_fraction(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def str_list(self, name: str) -> tuple[str, ...]:
        value = self.raw(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(name, "expected a list of strings")
            return ()
        return tuple(value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if value not in choices:
            self.problem(name, f"expected one of {', '.join(choices)}")
            return default
        return str(value)

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name), self.key(name), self.problems)

    def items(self) -> Iterator[tuple[str, _Section]]:
        for name in self.data:
            self.used.add(name)
            yield name, _Section(self.data[name], self.key(name), self.problems)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                self.problem(name, "unknown key")
