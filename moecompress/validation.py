"""Checks for option values, shared by every config's ``validate()``.

Each check raises :class:`~moecompress.errors.MoeCompressError` with one line of the form
``--option-name must be ..., got X`` (the CLI spelling; a pipeline YAML field is the same name with
underscores). Floats must be finite: NaN and +-inf are refused everywhere, since a NaN slips through
every ordinary comparison (``nan < 0`` and ``nan > 0`` are both False).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from moecompress.errors import MoeCompressError


def fail(option: str, expected: str, got) -> None:
    raise MoeCompressError(f"{option} must be {expected}, got {got!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(option: str, value, minimum: int | None = None, maximum: int | None = None, expected: str | None = None) -> None:
    """``value`` is an integer in ``[minimum, maximum]`` (either bound optional)."""
    if expected is None:
        parts = []
        if minimum is not None:
            parts.append(f">= {minimum}")
        if maximum is not None:
            parts.append(f"<= {maximum}")
        expected = "an integer" + (" " + " and ".join(parts) if parts else "")
    if not _is_int(value):
        fail(option, expected, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(option, expected, value)


def check_float(
    option: str,
    value,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    expected: str | None = None,
) -> None:
    """``value`` is a finite number within the bounds (closed unless ``*_open``; either bound optional)."""
    if expected is None:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            expected = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            expected = "a finite number"
    if not _is_real(value) or not math.isfinite(value):
        fail(option, expected, value)
    if low is not None and (value <= low if low_open else value < low):
        fail(option, expected, value)
    if high is not None and (value >= high if high_open else value > high):
        fail(option, expected, value)


def check_choice(option: str, value, allowed: Iterable, expected: str | None = None) -> None:
    """``value`` is one of ``allowed`` (integers are compared as integers: 4.0 is not the width 4)."""
    allowed = tuple(allowed)
    ok = value in allowed and (not all(_is_int(a) for a in allowed) or _is_int(value))
    if not ok:
        fail(option, expected or "one of " + ", ".join(str(a) for a in allowed), value)
